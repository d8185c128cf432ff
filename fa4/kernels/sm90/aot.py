"""Ahead-of-time compilation of the Hopper forward for sm_90a, without a GPU (CPU CI and register checks).

`compile_config` builds the same launch arguments as a real call, on small CPU tensors, and compiles the
kernel with GluonASTSource for GPUTarget("cuda", 90, 32). `sass_report` summarises what a reviewer checks:
registers, spills (local memory), wgmma (HGMMA) and TMA loads (UTMALDG). Run it in a subprocess: a failing
Gluon compile can abort the whole process.
"""
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

from . import attention_fwd

TARGET = GPUTarget("cuda", 90, 32)
_TORCH_TO_SIG = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                 torch.int64: "i64"}


def _sig(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_SIG[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32"
    if isinstance(value, float):
        return "fp32"
    return mangle_type(value)  # tensor descriptors carry their block and shared layout


SAMPLE_BATCH, SAMPLE_SEQLEN, SAMPLE_KV_HEADS = 2, 256, 2


def sample_inputs(d, dv, dtype, *, varlen, gqa):
    """Small CPU q, k, v (batched or packed) and cu_seqlens (None when batched) with which a configuration
    is compiled: the kernels specialise on dtypes, head dims and stride divisibility, not on sizes."""
    b, s, hkv = SAMPLE_BATCH, SAMPLE_SEQLEN, SAMPLE_KV_HEADS
    rows = (b * s,) if varlen else (b, s)
    q = torch.zeros(*rows, hkv * gqa, d, dtype=dtype)
    k = torch.zeros(*rows, hkv, d, dtype=dtype)
    v = torch.zeros(*rows, hkv, dv, dtype=dtype)
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32) if varlen else None
    return q, k, v, cu


def compile_config(d, dv, dtype=torch.bfloat16, *, causal=False, window=(-1, -1), softcap=0.0, sink=False,
                   varlen=False, gqa=1, variant=None, page_size=0):
    """Compile one configuration for sm_90a; returns triton's CompiledKernel. page_size > 0: a paged prefill
    (packed queries, k / v as (num_pages, page_size, Hkv, D) pools, seqused_k, a page table)."""
    b, s, hq = SAMPLE_BATCH, SAMPLE_SEQLEN, SAMPLE_KV_HEADS * gqa
    q, k, v, cu = sample_inputs(d, dv, dtype, varlen=varlen or page_size > 0, gqa=gqa)
    paged = {}
    if page_size:
        varlen = True
        k, v = (t.view(-1, page_size, *t.shape[1:]) for t in (k, v))
        paged = dict(seqused_k=torch.full((b,), s, dtype=torch.int32),
                     page_table=torch.arange(k.shape[0], dtype=torch.int32).view(b, -1))
    out = torch.zeros(*q.shape[:-1], dv, dtype=dtype)
    lse = torch.zeros(hq, b * s, dtype=torch.float32)
    left, right = window
    if causal:
        right = 0
    _, args, constexprs = attention_fwd.launch_plan(
        q, k, v, out, lse, softmax_scale=d ** -0.5, window_left=left, window_right=right, softcap=softcap,
        sink=torch.zeros(hq, dtype=torch.float32) if sink else None, cu_seqlens_q=cu,
        cu_seqlens_k=None if page_size else cu, max_seqlen_q=s if varlen else None, variant=variant, **paged)
    signature = {name: _sig(val) for name, val in args.items()}
    signature.update({name: "constexpr" for name in constexprs})
    src = GluonASTSource(fn=attention_fwd.attn_fwd_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=TARGET, options={"num_warps": 4})


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_report(compiled):
    """{'regs', 'spill_bytes' (local memory), 'hgmma', 'utmaldg', 'utmastg', 'ldl_stl', 'smem'} of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    return dict(regs=regs, spill_bytes=local, hgmma=len(re.findall(r"\bHGMMA\.", sass)),
                utmaldg=len(re.findall(r"\bUTMALDG", sass)), utmastg=len(re.findall(r"\bUTMASTG", sass)),
                ldl_stl=len(re.findall(r"\b(?:LDL|STL)\b", sass)), smem=compiled.metadata.shared)
