"""What the consumer partitions' warpgroup barriers cost the sm90 backward: an upper bound, from the PTX.

Gluon (Triton 3.6) lowers each mbarrier arrive to one elected thread behind a `bar.sync 0, 128` of its 4-warp partition,
and its shared-memory barrier analysis puts more `bar.sync 0, 128` before mbarrier waits and after arrives: ~9 a step in
each D = 128 consumer's key loop, where FlashAttention-4's loop has one named-barrier meeting (benchmarks/NOTES.md,
sessions 16 and 36). This probe removes some of them from the backward kernels' PTX (a Triton stages hook, so the
shipped source is untouched) and times the backward in a fresh process with its own Triton cache:

    --mode none       the shipped PTX (the baseline)
    --mode post       the bar.sync right after an mbarrier arrive (nothing after it reads what the arrive wrote)
    --mode prewait    also the bar.sync right before an mbarrier wait loop
    --mode prearrive  also the bar.sync right before an arrive: NOT SAFE (the elected thread may then signal before
                      the other warps are done), so only the timing of this mode means anything: it bounds what
                      per-warp arrives (no partition barrier) could buy.

Each process prints one JSON line per row (µs per backward call, do_bench median, and a checksum of dQ, dK, dV so
the driver can see whether a mode changed the results). run_ptx_barrier_probe.sh alternates the modes.

    python benchmarks/ptx_barrier_probe.py --mode post --rows 128:4096:1,128:16384:0
"""
import argparse
import json
import os
import re
import sys
import tempfile

BAR = re.compile(r"^\s*bar\.sync\s+0,\s*128;\s*$")
ARRIVE = re.compile(r"mbarrier\.arrive\.")
WAIT_BLOCK = re.compile(r"^\s*\{\s*$")


def _code(lines, i, step):
    """Index of the next line from i (step +1 / -1) that is an instruction, not a .loc, a comment or blank."""
    i += step
    while 0 <= i < len(lines):
        text = lines[i].strip()
        if text and not text.startswith(".loc") and not text.startswith("//") and not text.startswith("$L__tmp"):
            return i
        i += step
    return None


def _is_wait(lines, i):
    """Whether line i opens Triton's mbarrier wait loop ({ .reg .pred complete; waitLoop: mbarrier.try_wait ...)."""
    if i is None or not WAIT_BLOCK.match(lines[i]):
        return False
    window = " ".join(lines[i:i + 6])
    return "mbarrier.try_wait" in window


def strip_barriers(ptx, mode):
    """The PTX with the chosen partition barriers removed; returns (text, how many removed)."""
    if mode == "none":
        return ptx, 0
    lines = ptx.split("\n")
    drop = set()
    for i, line in enumerate(lines):
        if not BAR.match(line):
            continue
        prev, nxt = _code(lines, i, -1), _code(lines, i, 1)
        after_arrive = prev is not None and ARRIVE.search(lines[prev])
        before_wait = _is_wait(lines, nxt)
        before_arrive = nxt is not None and ARRIVE.search(lines[nxt])
        if after_arrive or (mode in ("prewait", "prearrive") and before_wait) or (mode == "prearrive" and before_arrive):
            drop.add(i)
    return "\n".join(line for i, line in enumerate(lines) if i not in drop), len(drop)


def install(mode, name_part="attn_bwd"):
    """A Triton stages hook that rewrites the PTX of kernels whose name contains name_part."""
    from triton import knobs
    removed = {}

    def hook(backend, stages, options, language, capability):
        make_ptx = stages.get("ptx")
        if make_ptx is None:
            return

        def ptx(src, metadata):
            text = make_ptx(src, metadata)
            if name_part in metadata.get("name", ""):
                text, n = strip_barriers(text, mode)
                removed[metadata["name"]] = removed.get(metadata["name"], 0) + n
            return text

        stages["ptx"] = ptx

    knobs.runtime.add_stages_inspection_hook = hook
    return removed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="none", choices=["none", "post", "prewait", "prearrive"])
    ap.add_argument("--rows", default="128:4096:1,128:16384:1,128:16384:0,64:4096:0",
                    help="D:S:causal, comma-separated (B·S = 16384, H·D = 2048, bf16)")
    ap.add_argument("--deterministic", action="store_true")
    args = ap.parse_args()
    # A fresh Triton cache: the hook is not part of Triton's cache key.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"ptxbar-{args.mode}-")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    from triton.testing import do_bench
    removed = install(args.mode)
    from fa4.kernels import sm90
    from fa4.kernels.sm90 import backward as bwd
    for row in args.rows.split(","):
        d, s, causal = (int(x) for x in row.split(":"))
        b, h = 16384 // s, 2048 // d
        torch.manual_seed(0)
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
        q, k, v, dout = (torch.randn((b, s, h, d), device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, lse = sm90.forward(q, k, v, **opts)
        fn = lambda: bwd.backward(dout, q, k, v, out, lse, None, **opts,  # noqa: E731
                                  deterministic=args.deterministic)
        grads = fn()
        us = do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
        again = fn()
        sums = [float(g.double().abs().sum()) for g in grads[:3]]
        drift = max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads[:3], again[:3]))
        flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
        print(json.dumps(dict(mode=args.mode, d=d, s=s, causal=causal, us=round(us, 1),
                              tflops=round(flops / us / 1e6, 1), sums=sums, repeat_drift=drift,
                              removed=sum(removed.values()))), flush=True)


if __name__ == "__main__":
    main()
