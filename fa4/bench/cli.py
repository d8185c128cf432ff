"""`fa4 bench`: fa4 against its peers on one card, correctness first. See `fa4 bench --help`."""
import argparse
import os
import subprocess
import sys

from . import suites
from .peers import PEER_NAMES

# SDPA's efficient kernel has no GQA decode (it raises "No available kernel" on every decode row) and Flex is not
# a decode kernel: both stay selectable with --peers but are left out of the decode suite by default.
DEFAULT_PEERS = {"training": PEER_NAMES, "gqa": PEER_NAMES, "decode": ("sdpa_flash", "sdpa_cudnn", "flashattn4")}
# A decode step streams the KV cache once. Cleared by do_bench's memset, L2 holds up to 50 MB of dirty lines, and
# their write-back would be charged to the step: ~15% of the traffic of a 268 MB step, a ceiling of ~2,570 GB/s
# for any kernel on an H100. In a model, the kernels before the attention mostly read weights, so the step meets
# clean lines: the read flush. Training calls keep the anchors' memset.
DEFAULT_L2_FLUSH = {"training": "memset", "gqa": "memset", "decode": "read"}

DESCRIPTION = """\
Benchmark fa4 against every peer importable in this process, on this card, after checking fa4's output
against fa4.reference. Progress goes to stderr, one line per (row, backend); the table goes to stdout.

Correctness first: fa4 is checked against fa4.reference under docs/DESIGN.md's numerics rule (max error at most
2x that of the reference computed in the input dtype, plus rounding noise): training B=2 S=512 H=4, and
B=1 S=4096 when a selected row is that long (the long rows' kernel routes), for each head dim, mask and GQA
group among the selected rows (GQA: the row's group on one kv head; out, and dq dk dv unless --fwd-only);
decode B=4 L=1024 with sequences of different lengths, B=1 L=16384 and B=8 L=4096 (the timed rows' split
shapes), in each selected cache layout. If any check fails, nothing is timed.

Suites (docs/DESIGN.md):
  training  B*S = 16384 tokens, H*D = 2048, D in {64, 128, 256}, S in {1024 (D=128 only), 4096, 16384},
            causal and not. Forward and backward TFLOP/s: forward FLOPs = 4*B*H*S^2*D (halved when causal),
            backward = 2.5 x forward.
  decode    one query token, Hq 32, Hkv 8, D 128, (B, L) in {(1,8192), (1,65536), (8,8192), (32,4096),
            (64,8192), (128,2048)}, contiguous and paged (page 128, pages in shuffled order). GB/s of K+V read
            per step: 2*B*L*Hkv*D*2 bytes / time.
  gqa       fa4's own addition: the training suite's D = 128 rows at S in {4096, 16384} with H = 16 query heads
            sharing Hkv in {4, 2, 1} kv heads, causal and not; the same FLOP counts (per query head); its rows
            carry Hkv. Peers get K / V with Hkv heads (SDPA and Flex with enable_gqa=True).

Peers: sdpa_flash, sdpa_cudnn, sdpa_efficient (torch SDPA pinned to its FLASH_ATTENTION / CUDNN_ATTENTION /
EFFICIENT_ATTENTION kernel, q/k/v passed as .transpose(1, 2) views of (B, S, H, D) tensors; decode uses
enable_gqa=True), flex (FlexAttention under torch.compile(dynamic=False), one graph per shape, recompile
limits lifted, a causal block mask), flashattn4 (FlashAttention-4 with its default arguments, when
`flash_attn.cute` imports; paged decode through its flash_attn_varlen_func(page_table=...)). A peer
that cannot be imported is listed and skipped; a peer that fails on a row is recorded as missing (null in
the JSON, "--" in the table) with the reason in the log; one that cannot express a row (SDPA and a paged
cache) is shown as n/a. fa4's ratio is its figure over the best peer's on the same row (decode: the best
peer at the same (B, L) in either cache layout).

Timing: medians of per-call CUDA-event times after warm-up, L2 cleared before every timed call: training by
triton.testing.do_bench (a 256 MB memset), decode by reading a 256 MB buffer (--l2-flush); warmup/rep budgets 50/200 ms
(training) and 20/100 ms (decode), --quick 10/40 and 5/25. The forward is timed with inputs that require
grad (it saves what its backward needs, as in training). The backward is timed alone: one forward builds
the graph, then torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) is timed. Decode caches under
100 MB are rotated among several copies. matmul_tflops (a bf16 8192^3 product) and copy_gbps (a 1 GiB
device copy, read + write bytes) are measured in the same run as the card's ceilings.

Extra memory (fwd_extra_mib, bwd_extra_mib): after a warm-up call, torch.cuda.reset_peak_memory_stats();
base = torch.cuda.memory_allocated(); one call; then torch.cuda.max_memory_allocated() - base - (bytes of
the storages of the tensors the call returned: out for the forward, dq/dk/dv for the backward), in MiB. It
counts workspaces and what the forward saves for the backward (e.g. lse); inputs were allocated before.
Good to about 1 MiB (the caching allocator rounds blocks).

Without a CUDA device: sets TRITON_INTERPRET=1 before fa4's kernels are imported, runs fa4's Triton kernels
(backend 'triton' unless --backend says otherwise) in fp16 on a tiny shape of the suite against
fa4.reference, prints each max error with its bound and PASS/FAIL, says that timing needs a GPU, and exits
0 when everything passes (1 otherwise).

Exit status: 0 done; 1 fa4 could not be imported or the CPU check failed; 2 fa4 failed its correctness
check on the GPU (nothing is timed).
"""

EXAMPLES = """\
examples:
  fa4 bench --suite training --out bench-out
  fa4 bench --suite decode --json decode.json --peers sdpa_cudnn,flashattn4
  fa4 bench --rows D=128,S=16384 --rows D=64,causal=1 --fwd-only --quick
"""


def build_parser():
    p = argparse.ArgumentParser(prog="fa4 bench", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(suites.SUITES), default="training",
                   help="which suite to run (default: training)")
    p.add_argument("--out", metavar="DIR",
                   help="write DIR/<card>-<suite>-<date>.json (the --json document plus details: driver, "
                        "versions, per-row times in ms, failure reasons, the correctness checks), a .png "
                        "plot (grouped bars, one group per row; needs matplotlib) and a .md table")
    p.add_argument("--json", metavar="PATH",
                   help="write docs/DESIGN.md's JSON document: card, torch, triton, date, suite, matmul_tflops, "
                        "copy_gbps, rows (training: backend, D, S, B, H, causal, fwd_tflops, bwd_tflops, "
                        "fwd_extra_mib, bwd_extra_mib; gqa: the same with Hkv after H; decode: backend, B, L, paged, "
                        "gbps)")
    p.add_argument("--peers", metavar="LIST",
                   help="comma-separated peers to run beside fa4, from: " + ", ".join(PEER_NAMES)
                        + "; 'none' for fa4 alone (default: training and gqa all; decode sdpa_flash, sdpa_cudnn, "
                        "flashattn4)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                   help="input dtype on the GPU (default bf16; the CPU check always uses fp16, since the "
                        "Triton 3.6 interpreter multiplies bf16 wrongly)")
    p.add_argument("--rows", metavar="FILTER", action="append", default=[],
                   help="run only the rows matching KEY=VALUE[,KEY=VALUE...]; keys for training: D, S, B, H, "
                        "causal; for gqa: those and Hkv; for decode: B, L, paged (booleans as 1/0 or true/false). Repeat to take the "
                        "union, e.g. --rows D=128,S=16384 --rows D=64,causal=1")
    p.add_argument("--fwd-only", action="store_true",
                   help="training: time the forward only (bwd figures are null)")
    p.add_argument("--backend", metavar="NAME", choices=("reference", "triton", "sm90"),
                   help="fa4's backend, passed through as flash_attn_func(..., backend=NAME): reference, "
                        "triton, sm90 (training suites only: sm90 has no KV-cache kernel) (default: fa4 picks; in "
                        "the CPU check: triton)")
    p.add_argument("--l2-flush", choices=("memset", "read"), default=None,
                   help="how L2 is cleared before each timed call: memset (triton do_bench's 256 MB zeroing, the "
                        "anchors' method; it leaves up to the L2's size of dirty lines for the timed call to write "
                        "back) or read (a 256 MB read: the L2 holds clean lines of other data, as a decode step "
                        "finds it after the model's other kernels). Default: memset for training, read for "
                        "decode, where the memset's write-back would be ~15%% of a 268 MB step's traffic")
    p.add_argument("--page-tables", type=int, default=1, metavar="N",
                   help="decode: each paged row rotates over at least N caches, each with its own random page table "
                        "(the table drawn moves a 268 MB paged row by about 1%% on an H100; default 1, the "
                        "recorded runs' setting)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions (do_bench budgets 10/40 ms training, 5/25 ms decode): noisier")
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.filters = [suites.parse_row_filter(text, args.suite) for text in args.rows]
    except ValueError as exc:
        parser.error(str(exc))
    if args.peers is None:
        args.peer_names = list(DEFAULT_PEERS[args.suite])
    elif args.peers.strip().lower() in ("", "none"):
        args.peer_names = []
    else:
        args.peer_names = list(dict.fromkeys(n.strip() for n in args.peers.split(",") if n.strip()))
        unknown = [n for n in args.peer_names if n not in PEER_NAMES]
        if unknown:
            parser.error(f"--peers: unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEER_NAMES)}")
    if args.l2_flush is None:
        args.l2_flush = DEFAULT_L2_FLUSH[args.suite]
    if args.fwd_only and not suites.is_training(args.suite):
        parser.error("--fwd-only applies to the training and gqa suites only")
    if args.page_tables < 1:
        parser.error(f"--page-tables must be at least 1; got {args.page_tables}")
    if args.page_tables > 1 and suites.is_training(args.suite):
        parser.error("--page-tables applies to the decode suite only")
    # Output paths are checked before anything runs: a bad one found after the suite would lose every timing.
    for flag, path, want_dir in (("--out", args.out, True), ("--json", args.json, False)):
        if path is None:
            continue
        if want_dir and os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"{flag} {path}: exists and is not a directory")
        if not want_dir and os.path.isdir(path):
            parser.error(f"{flag} {path}: is a directory; give a file path")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):  # the nearest existing ancestor must be a directory
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            parser.error(f"{flag} {path}: {parent} is not a directory")
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the console script is `fa4`; its one command is `bench`
        argv = argv[1:]
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        saved = os.environ.get("TRITON_INTERPRET")
        try:
            return _run_without_gpu(args, argv)
        finally:  # a caller of main() in-process gets its environment back
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
    from .gpu import run_gpu
    return run_gpu(args)


def _run_without_gpu(args, argv):
    """The CPU check: fa4's Triton kernels under the interpreter (TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads the switch when a function is decorated with @triton.jit, its own library
        # (tl.max, tl.sum, ...) included, and importing fa4 (which runs before this function) already
        # imports triton.language. So start again in a process that has the switch set from the start.
        os.environ["TRITON_INTERPRET"] = "1"
        if any(name == "triton" or name.startswith("triton.") for name in sys.modules):
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            return subprocess.call([sys.executable, "-m", "fa4.bench.cli", *argv],
                                   env=dict(os.environ, PYTHONPATH=path))
    from .cpu import run_cpu
    return run_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
