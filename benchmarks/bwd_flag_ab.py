"""A/B of a module switch of the sm90 backward (fa4/kernels/sm90/backward.py), e.g. STATS_TMA: the whole backend
`backward` call on training-suite shapes (B·S = 16384, H·D = 2048, bf16), do_bench median µs, the switch off and on
alternated over several rounds in one process; the best round of each side is compared.

    python benchmarks/bwd_flag_ab.py --flag STATS_TMA [--rounds 3] [--rows 128:1024,128:4096,64:4096] [--varlen]
    python benchmarks/bwd_flag_ab.py --tile-field persistent [--causal-only] ...

--on NAME=INT (repeatable): instead of --flag, the 'on' side sets each of these module switches (0 / 1 for the
boolean ones, any level for an int one such as CHAIN_FENCE); the 'off' side is the shipped state of all of them.

--set NAME=INT (repeatable): module switches set on both sides before anything else (the state the A/B starts from;
--on's 'off' side is then this state).

--tile-field NAME: instead of a module switch, a boolean field of the call's default tile (backward.default_tile)
set False, then True. --causal-only / --full-only: only the causal / non-causal rows. Each row prints the ratio of
the best rounds and of the medians (alternated rounds: a slow spell of the card hits both sides).

--window L: a left window of L keys on every row (window_left = L; the D = 256 kernel's dQ reduce-add runs in the
main kernel only under a window). --deterministic: deterministic=True calls.

--varlen: the same tokens as packed sequences (flash_attn_varlen_func's layout): B sequences of S tokens, of
lengths S − 64·(i mod 4) so that they do not all end on a block boundary.

Session 12 first ran it (as fused_fills_ab.py) for a switch since removed: the dQ accumulator's zero fill inside the
preprocess kernel (FUSED_FILLS; benchmarks/NOTES.md).
"""
import argparse
import statistics

import torch
from triton.testing import do_bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flag", help="a boolean module attribute of fa4.kernels.sm90.backward")
    ap.add_argument("--on", action="append", default=[], metavar="NAME=INT",
                    help="module switches set together on the 'on' side (instead of --flag)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=INT", help="module switches on both sides")
    ap.add_argument("--tile-field", help="a boolean field of the default BwdTile")
    ap.add_argument("--on-value", type=int, help="--tile-field's value on the 'on' side (an int field such as poly; "
                    "the 'off' side is the tile's own)")
    ap.add_argument("--causal-only", action="store_true")
    ap.add_argument("--full-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="128:1024,128:4096,128:16384,64:4096")
    ap.add_argument("--varlen", action="store_true")
    ap.add_argument("--window", type=int, default=-1)
    ap.add_argument("--deterministic", action="store_true")
    args = ap.parse_args()
    from fa4.kernels import sm90
    import dataclasses

    from fa4.kernels.sm90 import backward as bwd
    for item in args.set:
        sw, lv = item.split("=")
        setattr(bwd, sw, type(getattr(bwd, sw))(int(lv)))
    assert sum((args.flag is not None, args.tile_field is not None, bool(args.on))) == 1, \
        "one of --flag, --tile-field, --on"
    switches = {args.flag: 1} if args.flag else {sw: int(lv) for sw, lv in (item.split("=") for item in args.on)}
    shipped = {sw: getattr(bwd, sw) for sw in switches}
    # --flag: off is 0 whatever ships; --on: off is what ships.
    off_state = {args.flag: type(shipped[args.flag])(0)} if args.flag else dict(shipped)
    name = "+".join(f"{sw}={lv}" for sw, lv in switches.items()) if switches else f"tile.{args.tile_field}"
    print(torch.cuda.get_device_name(), f"| us per backward call (median of do_bench), {name} off -> on",
          f"(from {', '.join(args.set)})" if args.set else "")
    for row in args.rows.split(","):
        d, s = (int(x) for x in row.split(":"))
        b, h = 16384 // s, 2048 // d
        flops = 2.5 * 4 * b * h * s * s * d
        for causal in ((True, ) if args.causal_only else (False, ) if args.full_only else (False, True)):
            torch.manual_seed(0)
            opts = dict(softmax_scale=d ** -0.5, window_left=args.window, window_right=0 if causal else -1,
                        softcap=0.0, sink=None)
            if args.varlen:
                lens = [s - 64 * (i % 4) for i in range(b)]
                cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
                opts.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s)
                shape = (sum(lens), h, d)
                flops = 2.5 * 4 * h * d * sum(n * n for n in lens)
            else:
                shape = (b, s, h, d)
            q, k, v, dout = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            out, lse = sm90.forward(q, k, v, **opts)
            times = {False: [], True: []}
            grads = {}
            for _ in range(args.rounds):
                for on in (False, True):
                    extra = {}
                    if switches:
                        for sw, level in switches.items():
                            setattr(bwd, sw, type(shipped[sw])(level) if on else off_state[sw])
                    else:
                        base = bwd.default_tile(d, d, opts["window_left"], window_right=opts["window_right"],
                                                varlen=args.varlen, deterministic=args.deterministic, seqlen_q=s)
                        value = (args.on_value if on else getattr(base, args.tile_field)) if args.on_value is not None \
                            else on
                        extra = dict(tile=dataclasses.replace(base, **{args.tile_field: value}))
                    if args.deterministic:
                        extra["deterministic"] = True
                    fn = lambda: bwd.backward(dout, q, k, v, out, lse, None, **opts, **extra)  # noqa: E731
                    grads[on] = fn()
                    times[on].append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
            for sw, level in shipped.items():
                setattr(bwd, sw, level)
            # dK and dV do not depend on the switch's timing (each CTA owns its keys): bitwise equal, unless the
            # switch changes a key block's walk order (the persistent grid's chain walks top-down, so a route onto
            # it sums dK and dV in another order).
            same = all(torch.equal(a, b) for a, b in zip(grads[False][1:3], grads[True][1:3]))
            off, on = min(times[False]), min(times[True])
            med = statistics.median(times[False]) / statistics.median(times[True])
            tf = flops / (2 if causal else 1) / 1e6
            print(f"D={d:3d} S={s:5d} causal={int(causal)}{' varlen' if args.varlen else ''}{f' window={args.window}' if args.window >= 0 else ''}{' det' if args.deterministic else ''}: {off:8.1f} -> {on:8.1f} us ({off / on:.3f}x, median {med:.3f}x; "
                  f"{tf / off:5.0f} -> {tf / on:5.0f} TFLOP/s) dk,dv bitwise {'equal' if same else 'DIFFER'}; "
                  f"rounds {[round(t, 1) for t in times[False]]} / {[round(t, 1) for t in times[True]]}", flush=True)


if __name__ == "__main__":
    main()
