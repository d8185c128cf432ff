"""fa4 and the peers it is measured against, each called the way its users call it.

Every backend turns a case into a callable: `training(causal)` -> f(q, k, v) -> out with q, k, v (B, S, H, D)
as models hold them (SDPA and Flex get `.transpose(1, 2)` views, not copies), and `decode(case)` ->
f(inputs) -> out on a `DecodeInputs` cache. A backend that cannot serve a case raises `NotApplicable` (shown as
"n/a", not an error); any other exception is recorded as a failure of that row.

Backend names are those of the JSON schema: fa4, sdpa_flash, sdpa_cudnn, sdpa_efficient, flex, flashattn4.
FlashAttention-4 (`flash_attn.cute`) is imported here only, as an optional peer; fa4 itself never imports it.
"""
import inspect
from dataclasses import dataclass

import torch

PEER_NAMES = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flashattn4")


class NotApplicable(Exception):
    """The backend has no way to express this case (e.g. SDPA and a paged KV cache)."""


def load_fa4():
    """fa4's public API module (the tests replace this to run the bench without kernels)."""
    import fa4
    return fa4


def backend_kwargs(fn, backend):
    """{"backend": backend} when fn takes that argument and one was asked for, else {}."""
    if backend is None or "backend" not in inspect.signature(fn).parameters:
        return {}
    return {"backend": backend}


def first(result):
    """The attention output of a call that may also return lse."""
    return result[0] if isinstance(result, (tuple, list)) else result


@dataclass
class DecodeInputs:
    """One decode step's tensors. The paged pool is the contiguous cache viewed as pages, and the page
    table hands each sequence its pages in shuffled order, as a serving system's allocator would."""
    q: torch.Tensor            # (B, 1, Hq, D)
    k: torch.Tensor            # (B, L, Hkv, D)
    v: torch.Tensor
    k_pages: torch.Tensor      # (B·L/page, page, Hkv, D), a view of k
    v_pages: torch.Tensor
    page_table: torch.Tensor   # (B, L/page) int32
    seqlens: torch.Tensor      # (B,) int32, every sequence uses its whole cache
    cu_seqlens_q: torch.Tensor  # (B+1,) int32, one query token per sequence


def make_decode_inputs(case, dtype, device="cuda", generator=None):
    q = torch.randn(case.B, 1, case.Hq, case.D, device=device, dtype=dtype)
    k = torch.randn(case.B, case.L, case.Hkv, case.D, device=device, dtype=dtype)
    v = torch.randn_like(k)
    n_pages = case.B * case.L // case.page_size
    pool_shape = (n_pages, case.page_size, case.Hkv, case.D)
    order = torch.randperm(n_pages, generator=generator).to(device=device, dtype=torch.int32)
    return DecodeInputs(
        q=q, k=k, v=v, k_pages=k.view(pool_shape), v_pages=v.view(pool_shape),
        page_table=order.view(case.B, case.L // case.page_size),
        seqlens=torch.full((case.B,), case.L, device=device, dtype=torch.int32),
        cu_seqlens_q=torch.arange(case.B + 1, device=device, dtype=torch.int32))


class Fa4:
    name = "fa4"

    def __init__(self, backend=None):
        self.backend = backend

    def available(self):
        try:
            api = load_fa4()
            api.flash_attn_func  # noqa: B018  (an API without it is not importable for our purpose)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def training(self, causal):
        api = load_fa4()
        return lambda q, k, v: first(api.flash_attn_func(q, k, v, causal=causal, backend=self.backend))

    def decode(self, case):
        api = load_fa4()
        if not hasattr(api, "flash_attn_with_kvcache"):
            raise RuntimeError("fa4.flash_attn_with_kvcache is not available")
        kw = backend_kwargs(api.flash_attn_with_kvcache, self.backend)
        if case.paged:
            return lambda x: first(api.flash_attn_with_kvcache(
                x.q, x.k_pages, x.v_pages, cache_seqlens=x.seqlens, page_table=x.page_table, **kw))
        return lambda x: first(api.flash_attn_with_kvcache(x.q, x.k, x.v, cache_seqlens=x.seqlens, **kw))


def _gqa_kwargs(q, k):
    """enable_gqa=True where K / V have fewer heads than Q ((B, S, H, D) tensors), else nothing."""
    return {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}


class Sdpa:
    """torch's scaled_dot_product_attention pinned to one of its kernels."""
    _KERNELS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                "sdpa_efficient": "EFFICIENT_ATTENTION"}

    def __init__(self, name):
        self.name = name

    def available(self):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
            getattr(SDPBackend, self._KERNELS[self.name])
        except Exception as exc:  # ImportError, AttributeError, or a library failing to load (OSError, ...)
            return f"{type(exc).__name__}: {exc}"
        return None

    def _call(self):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = getattr(SDPBackend, self._KERNELS[self.name])

        def attend(q, k, v, **kw):
            # (B, S, H, D) -> (B, H, S, D) views: SDPA's layout without a copy, as models call it.
            with sdpa_kernel([kernel]):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
            return out.transpose(1, 2)
        return attend

    def training(self, causal):
        attend = self._call()
        # GQA rows: K / V with fewer heads, natively (enable_gqa, only then: it narrows SDPA's kernel choice).
        return lambda q, k, v: attend(q, k, v, is_causal=causal, **_gqa_kwargs(q, k))

    def decode(self, case):
        if case.paged:
            raise NotApplicable("SDPA has no paged KV cache")
        attend = self._call()
        # GQA natively (enable_gqa): a serving user would not expand K/V to 32 heads.
        return lambda x: attend(x.q, x.k, x.v, enable_gqa=True)


class Flex:
    """FlexAttention compiled once per shape (dynamic=False), with a causal block mask when causal."""
    name = "flex"

    def __init__(self):
        self._compiled = None
        self._masks = {}

    def available(self):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        except Exception as exc:  # ImportError, or a library failing to load
            return f"{type(exc).__name__}: {exc}"
        return None

    def _flex(self):
        if self._compiled is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention
            # Every shape is its own graph: past dynamo's recompile limit torch silently runs eager Flex,
            # which materialises the S×S scores (out of memory at 16k tokens, 15-30 TFLOP/s elsewhere).
            for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 1 << 16)
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def _causal_mask(self, s, device):
        from torch.nn.attention.flex_attention import create_block_mask
        if (s, device) not in self._masks:
            self._masks[(s, device)] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, s, s,
                                                         device=device)
        return self._masks[(s, device)]

    def training(self, causal):
        flex = self._flex()

        def attend(q, k, v):
            mask = self._causal_mask(q.shape[1], q.device) if causal else None
            return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                        **_gqa_kwargs(q, k)).transpose(1, 2)
        return attend

    def decode(self, case):
        raise NotApplicable("Flex is not in the decode suite")


class FlashAttn4:
    """FlashAttention-4 (CuTe DSL), when `flash_attn.cute` imports; called with its defaults."""
    name = "flashattn4"

    def available(self):
        try:
            from flash_attn.cute import flash_attn_func, flash_attn_varlen_func  # noqa: F401
        except Exception as exc:  # its import can fail in many ways (CUDA libraries, DSL versions)
            return f"{type(exc).__name__}: {str(exc)[:200]}"
        return None

    def training(self, causal):
        from flash_attn.cute import flash_attn_func
        return lambda q, k, v: first(flash_attn_func(q, k, v, causal=causal))

    def decode(self, case):
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
        if not case.paged:
            return lambda x: first(flash_attn_func(x.q, x.k, x.v))
        # Its paged path is the varlen function: one query token per sequence, seqused_k keys each.
        return lambda x: first(flash_attn_varlen_func(
            x.q.view(case.B, case.Hq, case.D), x.k_pages, x.v_pages, cu_seqlens_q=x.cu_seqlens_q, max_seqlen_q=1,
            seqused_k=x.seqlens, page_table=x.page_table))


def make_peer(name):
    if name.startswith("sdpa_"):
        return Sdpa(name)
    return {"flex": Flex, "flashattn4": FlashAttn4}[name]()


def resolve(names):
    """(usable peers in the given order, {name: why not} for those that cannot be used here)."""
    usable, missing = [], {}
    for name in names:
        peer = make_peer(name)
        reason = peer.available()
        if reason is None:
            usable.append(peer)
        else:
            missing[name] = reason
    return usable, missing
