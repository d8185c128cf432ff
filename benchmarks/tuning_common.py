"""What the tuning scripts (tune_forward.py, tune_backward.py) share: the suite rows, the options of a row,
and the per-architecture resource limits used to predict occupancy from a compiled kernel."""
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.bench.suites import training_cases  # noqa: E402

# Shared memory per block (opt-in maximum) and registers per SM, by compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
REGS_PER_SM = 65536
# Triton signature names of the tensor dtypes the kernels take.
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}


def smem_limit(cc):
    return SMEM_LIMIT.get(cc, 101376)


def programs_per_sm(cc, threads, regs, smem):
    """Resident programs per SM allowed by registers and shared memory (1 KiB reserved per block)."""
    return min(REGS_PER_SM // (threads * max(regs, 1)), (smem_limit(cc) + 1024) // max(smem + 1024, 1))


def training_suite(dims, causals):
    """(D, S, B, H, causal) rows of DESIGN.md's training suite, restricted to the given head dims / causal flags."""
    return [(c.D, c.S, c.B, c.H, c.causal) for c in training_cases()
            if c.D in dims and int(c.causal) in {int(x) for x in causals}]


def suite_options(d, causal):
    """The canonical backend keywords of a training-suite row (default scale, causal as window (-1, 0))."""
    return dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                sink=None)


def _loop_spills(sass):
    """Local-memory loads/stores (LDL/STL) inside loops: between a backward branch's target and the branch.

    Spills of loop-invariant values outside the loops cost a few instructions per program; these cost every
    iteration."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, ins in code:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    return sum(1 for addr, ins in code if re.search(r"\b(?:LDL|STL)\b", ins)
               and any(lo <= addr <= hi for lo, hi in loops))


def resource_usage(compiled):
    """Registers, spill (stack) bytes, spill instructions inside loops, shared memory and tensor-core
    instruction counts, from the cubin."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), smem=compiled.metadata.shared,
                hgmma=sass.count("HGMMA"), hmma=sass.count("HMMA"),
                ldl_stl=len(re.findall(r"\b(?:LDL|STL)\b", sass)), loop_spills=_loop_spills(sass))
