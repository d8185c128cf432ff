"""The loop the GPU fuzz scripts share: draw, check, report, until the time budget is spent.

    run(seed, seconds, one_draw)

`one_draw(rng, cfg)` draws one configuration from `rng` (random.Random(seed)), records what it drew in the dict
`cfg` as it goes, and checks it, raising on a failure. A failure prints one `FAIL seed=... {cfg}: ...` line (and a
short traceback when it is not an assertion), and the loop goes on; a `SUMMARY` line ends the run. `main` is the
scripts' command line, whose exit status says whether any draw failed.
"""
import random
import time
import traceback


def run(seed, seconds, one_draw):
    rng = random.Random(seed)
    t0 = time.time()
    n = fails = 0
    while time.time() - t0 < seconds:
        cfg = {}
        try:
            one_draw(rng, cfg)
        except Exception as exc:  # noqa: BLE001 -- every failure is reported, none stops the run
            fails += 1
            msg = str(exc).splitlines()[0][:300] if str(exc) else ""
            print(f"FAIL seed={seed} {cfg}: {type(exc).__name__}: {msg}", flush=True)
            if not isinstance(exc, AssertionError):
                traceback.print_exc(limit=3)
        n += 1
    print(f"SUMMARY seed={seed}: {n} configs, {fails} failed, {time.time() - t0:.0f} s", flush=True)
    return fails


def main(one_draw, usage):
    """The fuzzers' command line: `SEED SECONDS [script options]`; exit status 1 when any draw failed (a dozen
    seeds run side by side are judged by their statuses), 2 on a usage error or without a CUDA device."""
    import sys

    import torch
    if len(sys.argv) < 3:
        print(f"usage: {usage}", file=sys.stderr)
        sys.exit(2)
    try:
        seed, seconds = int(sys.argv[1]), float(sys.argv[2])
    except ValueError:
        print(f"usage: {usage} (SEED an int, SECONDS a number)", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("no CUDA device: the fuzzers run fa4's GPU kernels", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if run(seed, seconds, one_draw) else 0)
