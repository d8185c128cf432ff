"""The loop the GPU fuzz scripts share: draw, check, report, until the time budget is spent.

    run(seed, seconds, one_draw)

`one_draw(rng, cfg)` draws one configuration from `rng` (random.Random(seed)), records what it drew in the dict
`cfg` as it goes, and checks it, raising on a failure. A failure prints one `FAIL seed=... {cfg}: ...` line (and a
short traceback when it is not an assertion), and the loop goes on; a `SUMMARY` line ends the run.
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
