"""The benchmark suites of DESIGN.md: their shapes, FLOP and byte counts, and the `--rows` filter.

training: bf16, B·S = 16384 tokens, H·D = 2048, D ∈ {64, 128, 256}, S ∈ {1024 (D=128 only), 4096, 16384},
causal and not. decode: one query token, Hq 32, Hkv 8, D 128, six (B, L) pairs, paged (page 128) and not.
gqa (beyond DESIGN.md's two): the training suite's D = 128 rows at S = 4096 and 16384 with 16 query heads sharing
4, 2 or 1 kv heads (groups of 4, 8, 16), causal and not; its rows carry Hkv besides the training schema.
"""
from dataclasses import asdict, dataclass

TRAINING_TOKENS = 16384      # B·S: every training row processes the same number of tokens
TRAINING_WIDTH = 2048        # H·D: the model width is fixed, so small heads come in larger numbers
DECODE_HQ, DECODE_HKV, DECODE_D = 32, 8, 128
DECODE_PAGE = 128
DECODE_SIZES = ((1, 8192), (1, 65536), (8, 8192), (32, 4096), (64, 8192), (128, 2048))


@dataclass(frozen=True)
class TrainingCase:
    D: int
    S: int
    B: int
    H: int
    causal: bool
    Hkv: int = 0        # kv heads (GQA suite); 0: H of them, and the row has no Hkv field (training schema)

    @property
    def kv_heads(self):
        return self.Hkv or self.H

    @property
    def fwd_flops(self):
        # Two products of S×S×D per head, 2 FLOP per multiply-add; causal visits half the score matrix.
        flops = 4 * self.B * self.H * self.S * self.S * self.D
        return flops // 2 if self.causal else flops

    @property
    def bwd_flops(self):
        # Five products (S recomputed, dP, dV, dQ, dK) against the forward's two.
        return 2.5 * self.fwd_flops

    def label(self):
        kv = f" Hkv={self.Hkv}" if self.Hkv else ""
        return f"D={self.D} S={self.S} B={self.B} H={self.H}{kv} {'causal' if self.causal else 'full'}"

    def key(self):
        key = asdict(self)
        if not self.Hkv:
            del key["Hkv"]
        return key


@dataclass(frozen=True)
class DecodeCase:
    B: int
    L: int
    paged: bool
    Hq: int = DECODE_HQ
    Hkv: int = DECODE_HKV
    D: int = DECODE_D
    page_size: int = DECODE_PAGE

    @property
    def kv_bytes(self):
        # One decode step reads every cached key and value once: 2 tensors × B·L·Hkv·D elements × 2 bytes.
        return 2 * self.B * self.L * self.Hkv * self.D * 2

    def label(self):
        return f"B={self.B} L={self.L} {'paged' if self.paged else 'contiguous'}"

    def key(self):
        return {"B": self.B, "L": self.L, "paged": self.paged}


def training_cases():
    cases = []
    for d in (64, 128, 256):
        for s in (1024, 4096, 16384):
            if s == 1024 and d != 128:
                continue
            for causal in (False, True):
                cases.append(TrainingCase(D=d, S=s, B=TRAINING_TOKENS // s, H=TRAINING_WIDTH // d, causal=causal))
    return cases


def gqa_cases():
    d = 128
    return [TrainingCase(D=d, S=s, B=TRAINING_TOKENS // s, H=TRAINING_WIDTH // d, causal=causal, Hkv=hkv)
            for s in (4096, 16384) for hkv in GQA_KV_HEADS for causal in (False, True)]


def decode_cases():
    return [DecodeCase(B=b, L=l, paged=paged) for b, l in DECODE_SIZES for paged in (False, True)]


GQA_KV_HEADS = (4, 2, 1)
SUITES = {"training": training_cases, "decode": decode_cases, "gqa": gqa_cases}
FILTER_KEYS = {"training": ("D", "S", "B", "H", "causal"), "decode": ("B", "L", "paged"),
               "gqa": ("D", "S", "B", "H", "Hkv", "causal")}


def is_training(suite):
    """Whether a suite's rows are training rows (forward and backward TFLOP/s): training and gqa."""
    return suite in ("training", "gqa")


_TRUE, _FALSE = ("1", "true", "yes", "y", "causal", "paged"), ("0", "false", "no", "n", "full", "contiguous")


def parse_row_filter(text, suite):
    """'D=128,S=16384' -> {'D': 128, 'S': 16384}. Raises ValueError naming the bad part."""
    allowed = FILTER_KEYS[suite]
    filt = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip().lower()
        if not sep or name not in allowed:
            raise ValueError(f"--rows: {part!r} is not KEY=VALUE with KEY one of {', '.join(allowed)} "
                             f"(suite {suite})")
        if name in ("causal", "paged"):
            if value not in _TRUE + _FALSE:
                raise ValueError(f"--rows: {name} must be true/false (or 1/0), got {value!r}")
            filt[name] = value in _TRUE
        else:
            try:
                filt[name] = int(value)
            except ValueError:
                raise ValueError(f"--rows: {name} must be an integer, got {value!r}") from None
    return filt


def select(cases, filters):
    """Cases matching any of the filters (each a dict of required field values); all cases if none."""
    if not filters:
        return list(cases)
    return [c for c in cases if any(all(getattr(c, k) == v for k, v in f.items()) for f in filters)]
