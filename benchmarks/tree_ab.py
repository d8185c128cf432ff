"""A/B of two fa4 source trees on the Hopper backward (or forward): each round runs one child process per tree,
alternated, that times the sm90 call on the training suite's rows with do_bench; prints µs per row and tree, and
the ratio of medians over the rounds.

    python benchmarks/tree_ab.py OTHER_ROOT [--rounds 3] [--rows 128:1024,128:4096,128:16384] [--causal both]
                                 [--fwd]

OTHER_ROOT is a directory holding another `fa4` package (e.g. the last commit's:
`mkdir -p /tmp/head && git archive HEAD fa4 | tar -x -C /tmp/head`); this checkout is "new". Use it for changes
that have no switch to flip in one process (a kernel edit whose old form is gone).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, torch
from triton.testing import do_bench
from fa4.kernels import sm90
from fa4.kernels.sm90 import backward as bwd
rows, causal_modes, fwd = json.loads(sys.argv[1])
res = {}
for d, s in rows:
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for causal in causal_modes:
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                    sink=None)
        out, lse = sm90.forward(q, k, v, **opts)
        if fwd:
            fn = lambda: sm90.forward(q, k, v, **opts)
        else:
            fn = lambda: bwd.backward(dout, q, k, v, out, lse, None, **opts)
        fn()
        res[f"{d}:{s}:{int(causal)}"] = do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
print("RESULT " + json.dumps(res))
"""


def run(root, spec):
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child in {root} failed:\n{proc.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("other")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="128:1024,128:4096,128:16384")
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--fwd", action="store_true")
    args = ap.parse_args()
    rows = [[int(x) for x in r.split(":")] for r in args.rows.split(",")]
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    spec = [rows, modes, args.fwd]
    trees = {"old": os.path.abspath(args.other), "new": ROOT}
    times = {name: {} for name in trees}
    for rnd in range(args.rounds):
        for name, root in (trees.items() if rnd % 2 == 0 else reversed(list(trees.items()))):
            for key, us in run(root, spec).items():
                times[name].setdefault(key, []).append(us)
        print(f"round {rnd + 1}: " + " | ".join(f"{k} old {times['old'][k][-1]:.1f} new {times['new'][k][-1]:.1f}"
                                                for k in times["new"]), flush=True)
    print(f"{'D:S:causal':>14} | {'old µs':>9} {'new µs':>9} | old/new (median; per round)")
    for key in times["new"]:
        o, n = times["old"][key], times["new"][key]
        ratios = " ".join(f"{a / b:.3f}" for a, b in zip(o, n))
        print(f"{key:>14} | {statistics.median(o):9.1f} {statistics.median(n):9.1f} | "
              f"{statistics.median(o) / statistics.median(n):.3f}; {ratios}")


if __name__ == "__main__":
    main()
