import dataclasses, statistics, sys, torch
from triton.testing import do_bench
sys.path.insert(0, ".")
from fa4.kernels import sm90
from fa4.kernels.sm90 import backward as bwd
print(torch.cuda.get_device_name(), "| non-causal D=128 backward us: shared-dQ (shipped) / kt / kt persistent, best of 7 rounds")
kt = dataclasses.replace(bwd.D128_CAUSAL_TILE, persistent=False)
ktp = bwd.D128_CAUSAL_TILE
for s in (1024, 2048, 4096):
    d = 128; b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=-1, softcap=0.0, sink=None)
    out, lse = sm90.forward(q, k, v, **opts)
    tiles = {"shared": None, "kt": kt, "ktp": ktp}
    times = {n: [] for n in tiles}; grads = {}
    for _ in range(7):
        for n, t in tiles.items():
            extra = {} if t is None else dict(tile=t)
            fn = lambda: bwd.backward(dout, q, k, v, out, lse, None, **opts, **extra)
            grads[n] = fn()
            times[n].append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
    base = min(times["shared"])
    err = max((grads["ktp"][i].float() - grads["shared"][i].float()).abs().max().item() for i in range(3))
    print(f"S={s}: " + " | ".join(f"{n} {min(v):.1f} (x{base / min(v):.3f}, median x{statistics.median(times['shared']) / statistics.median(v):.3f})" for n, v in times.items()) + f" | max grad diff ktp vs shared {err:.1e}", flush=True)
