"""Does a TMA tiled load fault when its innermost start coordinate is not 16-byte aligned? (Session 12: lse2 / Delta
of packed sequences by TMA crashed with an illegal instruction on sequences starting at odd tokens.)

    python benchmarks/tma_inner_offset_probe.py

A (4, 2000) fp32 tensor; one CTA loads a [1, 64] box at (1, start) into shared memory and copies it out, for starts
0, 4, 1, 2, 3, 301. Each start runs in its own process (a fault kills the CUDA context)."""
import subprocess
import sys

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma


@gluon.jit
def _load_box(desc, out, start):
    smem = gl.allocate_shared_memory(gl.float32, desc.block_type.shape, desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [1, start], bar, smem)
    mbarrier.wait(bar, 0)
    layout: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [4, 1], [1, 0])
    vals = smem.load(layout)
    offs = (gl.expand_dims(gl.arange(0, 1, gl.SliceLayout(1, layout)), 1) * 64
            + gl.expand_dims(gl.arange(0, 64, gl.SliceLayout(0, layout)), 0))
    gl.store(out + offs, vals)


def child(start):
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    t = torch.arange(8000, device="cuda", dtype=torch.float32).view(4, 2000)
    block = [1, 64]
    desc = TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=block,
                            layout=gl.NVMMASharedLayout.get_default_for(block, gl.float32))
    out = torch.zeros(64, device="cuda")
    _load_box[(1, )](desc, out, start, num_warps=4)
    torch.cuda.synchronize()
    ok = torch.equal(out, t[1, start:start + 64])
    print(f"start {start}: {'ok' if ok else 'WRONG ' + str(out[:4].tolist())}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(int(sys.argv[1]))
    else:
        for start in (0, 4, 1, 2, 3, 301):
            r = subprocess.run([sys.executable, __file__, str(start)], capture_output=True, text=True, timeout=120)
            line = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
            err = [l for l in r.stderr.splitlines() if "rror" in l][-1:] if r.returncode else []
            print(line if r.returncode == 0 else f"start {start}: rc {r.returncode} {err}", flush=True)
