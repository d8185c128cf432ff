"""The Gluon kernels built by two ptxas binaries: Triton's bundled one and another (TRITON_PTXAS_PATH), each in
fresh processes with their own Triton cache, alternated. Times the sm90 forward and backward (do_bench median,
L2 flushed) on training-suite rows.

    python benchmarks/ptxas_ab.py --other /path/to/ptxas [--rounds 2] [--rows 128:16384:0,64:16384:0,...]
    python benchmarks/ptxas_ab.py --find      # list the ptxas binaries on this machine with their versions
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, torch
from triton import knobs
from triton.testing import do_bench
from fa4.kernels import sm90
from fa4.kernels.sm90 import backward as bwd
out = {"ptxas": f"{knobs.nvidia.ptxas.path} ({knobs.nvidia.ptxas.version})"}
for row in sys.argv[1].split(","):
    d, s, c = (int(x) for x in row.split(":"))
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if c else -1, softcap=0.0, sink=None)
    f = lambda: sm90.forward(q, k, v, **opts)
    o, lse = f()
    g = lambda: bwd.backward(do, q, k, v, o, lse, None, **opts)
    flops = 4 * b * h * s * s * d / (2 if c else 1)
    tf = do_bench(f, warmup=25, rep=100, return_mode="median")
    tb = do_bench(g, warmup=25, rep=100, return_mode="median")
    out[row] = (round(flops / tf / 1e9, 1), round(2.5 * flops / tb / 1e9, 1))
print("RESULT " + json.dumps(out), flush=True)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", help="the second ptxas binary")
    ap.add_argument("--find", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", default="128:16384:0,64:16384:0,256:16384:1,128:4096:1")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.find:
        for path in sorted(set(glob.glob("/usr/local/cuda*/bin/ptxas") + glob.glob("/usr/**/ptxas", recursive=True)
                               + glob.glob("/opt/**/ptxas", recursive=True))):
            ver = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            print(path, ver[-1] if ver else "?")
        return
    for r in range(args.rounds):
        for name, path in (("bundled", None), ("other", args.other)):
            env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="tc-"), PYTHONPATH=root)
            env.pop("TRITON_PTXAS_PATH", None)
            if path:
                env["TRITON_PTXAS_PATH"] = path
            proc = subprocess.run([sys.executable, "-c", CHILD, args.rows], capture_output=True, text=True, env=env,
                                  timeout=900)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[0][7:]) if line else {"error": proc.stderr[-800:]}
            print(f"round {r} {name}: " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
