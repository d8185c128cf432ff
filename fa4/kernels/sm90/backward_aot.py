"""Ahead-of-time compilation of the Hopper backward for sm_90a, without a GPU (CPU CI and register checks).

`compile_config` builds the main kernel's launch arguments as a real call would, on small CPU tensors, and
compiles it for GPUTarget("cuda", 90, 32) (tile=dict(d256=True): backward_d256's kernel); `aot.sass_report`
(the forward's) summarises the cubin. Run it in a subprocess: a failing Gluon compile can abort the whole
process.
"""
import torch
import triton
from triton.experimental.gluon._runtime import GluonASTSource

from . import backward, configs
from ..triton.backward import aligned_length
from .aot import SAMPLE_BATCH, SAMPLE_KV_HEADS, SAMPLE_SEQLEN, TARGET, _sig, sample_inputs


def compile_config(d, dv, dtype=torch.bfloat16, *, causal=False, window=(-1, -1), softcap=0.0, varlen=False,
                   gqa=1, seqused=False, deterministic=False, tile=None, sink_partials=False, dq_chain=False):
    """Compile one configuration of attn_bwd_kernel for sm_90a; returns triton's CompiledKernel.
    deterministic: the build without dQ (the ordered pass gives it); dq_chain: the in-kernel ordered dQ build."""
    b, s, hq = SAMPLE_BATCH, SAMPLE_SEQLEN, SAMPLE_KV_HEADS * gqa
    q, k, v, cu = sample_inputs(d, dv, dtype, varlen=varlen, gqa=gqa)
    lse = torch.zeros((hq, b * s) if varlen else (b, hq, s), dtype=torch.float32)
    dout = torch.zeros(*q.shape[:-1], dv, dtype=dtype)
    left, right = window
    if causal:
        right = 0
    tile_obj = None
    if tile:
        tile_obj = backward.get_tile(configs.tile_dim(d), configs.tile_dim(dv),
                                     **tile)
        assert tile_obj is not None, f"no tile for ({d}, {dv}) with {tile}"
    else:
        tile_obj = backward.default_tile(configs.tile_dim(d), configs.tile_dim(dv),
                                         left, softcap, window_right=right, deterministic=deterministic or dq_chain,
                                         varlen=varlen)
    # A separate_dq tile launches the main kernel without the dQ reduce-add, as the deterministic call does.
    deterministic = deterministic or tile_obj.separate_dq
    # The default's unordered reduce-add whose first link stores (backward_checked's first_only), and the first link's
    # store where backward_checked would let it (an unzeroed accumulator).
    first_only, store_first = backward.dq_store_routes(tile_obj, dq_chain, deterministic, left, right, varlen,
                                                       seqused or None, s, s)
    _, args, constexprs = backward.launch_plan(
        dout, q, k, v, None if deterministic else torch.zeros(q.shape, dtype=torch.float32),
        torch.zeros_like(k), torch.zeros_like(v), lse, lse.clone(), softmax_scale=d ** -0.5, window_left=left,
        window_right=right, softcap=softcap, cu_seqlens_q=cu, cu_seqlens_k=cu,
        seqused_k=torch.full((b, ), s, dtype=torch.int32) if seqused else None,
        max_seqlen_q=s if varlen else None, max_seqlen_k=s if varlen else None, deterministic=deterministic,
        tile=tile_obj, sink=torch.zeros(hq) if sink_partials else None,
        dsink_part=torch.zeros(b * hq, 8, 2) if sink_partials else None,
        dq_chain=backward.dq_chain_counters(tile_obj, b, hq, s, "cpu") if dq_chain or first_only else None,
        dq_store_first=store_first,
        dq_first_only=first_only,
        # Packed calls read lse2 / Delta by TMA from the preprocess's aligned copies (backward_checked).
        stats_al=(tuple(torch.zeros(hq, aligned_length(b * s, b)) for _ in range(2))
                  if varlen and backward.stats_tma_serves(tile_obj, varlen) else None),
        # The chain's last links write dQ itself where backward_checked would have them (DQ_CAST).
        dq_out=torch.zeros(q.shape, dtype=dtype) if dq_chain and backward.dq_cast_serves(
            tile_obj, store_first, configs.tile_dim(d), right) else None)
    signature = {name: _sig(val) for name, val in args.items()}
    signature.update({name: "constexpr" for name in constexprs})
    kernel = backward.kernel_for(tile_obj)
    # Pointers 16-byte aligned, as a launch specialises them (torch's allocations): pointer loads and stores compile
    # to the vectors a real launch gets (without it, to scalar accesses).
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, val in args.items() if isinstance(val, torch.Tensor)}
    src = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": 4})


def sass_report(compiled):
    """aot.sass_report plus 'utmaredg' (TMA reduce-adds) and 'loop_ldl_stl': local-memory instructions
    between the first and the last wgmma / TMA reduce of a partition (its main loop). Spills outside that
    span (a few values kept across the loop for the epilogue) cost a handful of instructions per CTA."""
    import re
    import subprocess
    import tempfile

    from .aot import _tool, sass_report as base_report
    rep = base_report(compiled)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    rep["utmaredg"] = len(re.findall(r"\bUTMAREDG", sass))
    loop = 0
    # Partitions are separated by register reallocations (USETMAXREG).
    for region in re.split(r"USETMAXREG", sass):
        lines = region.splitlines()
        marks = [i for i, line in enumerate(lines) if re.search(r"\b(HGMMA|UTMAREDG)", line)]
        if marks:
            span = lines[marks[0]:marks[-1] + 1]
            loop += sum(1 for line in span if re.search(r"\b(LDL|STL)\b", line))
    rep["loop_ldl_stl"] = loop
    return rep
