"""Packed (varlen) training calls: fa4.flash_attn_varlen_func forward and forward + backward against
FlashAttention-4's varlen function when `flash_attn.cute` imports, with the host synchronisations a call.

    python benchmarks/varlen_train_probe.py [--rows 128:16:8x2048:1,...] [--reps 3] [--dynamic]

A row is D:H:lengths:causal, lengths either NxL (N sequences of L tokens) or L1+L2+... (bf16, Hq = Hkv = H,
B·S = 16384 tokens as the training suite). cu_seqlens is built once and reused, as a model reuses it for every
layer. TFLOP/s over the visible pairs (4·D·H a pair forward, 2.5x that for the backward), do_bench median.
"""
import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fa4  # noqa: E402


def parse_lengths(text):
    if "x" in text:
        n, length = text.split("x")
        return [int(length)] * int(n)
    return [int(x) for x in text.split("+")]


def visible_pairs(lengths, causal):
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def host_syncs(fn):
    """Host synchronisations of one steady-state call of fn (torch's sync debug mode warns on each)."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="128:16:8x2048:1,64:32:4x4096:1,128:16:2048+1024+512+4608+8192:1,"
                                      "128:16:8x2048:0")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dynamic", action="store_true", help="also time the sm90 forward with the DYNAMIC unit "
                    "handout against its static stride")
    args = ap.parse_args()
    try:
        from flash_attn.cute import flash_attn_varlen_func as peer
    except Exception as exc:  # noqa: BLE001 - the kit may be absent
        peer = None
        print(f"# FlashAttention-4 not importable: {type(exc).__name__}: {str(exc)[:120]}")
    print(f"# {torch.cuda.get_device_name()}; bf16; TFLOP/s fwd / fwd+bwd, do_bench median, median of {args.reps}")
    for row in args.rows.split(","):
        d, heads, lens_text, causal = row.split(":")
        d, heads, causal = int(d), int(heads), causal == "1"
        lengths = parse_lengths(lens_text)
        total = sum(lengths)
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
        longest = max(lengths)
        q, k, v = (torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16)
        calls = {"fa4": lambda: fa4.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=causal)}
        if peer is not None:
            calls["FA4"] = lambda: peer(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                        max_seqlen_k=longest, causal=causal)
        flops = 4 * d * heads * visible_pairs(lengths, causal)
        line = []
        if args.dynamic:
            # The sm90 forward alone, static stride against the DYNAMIC unit handout (both through the FAST
            # plans; the public call picks one by attention_fwd.dynamic_units).
            from fa4.kernels import sm90
            opts = dict(softmax_scale=d ** -0.5, window_right=0 if causal else -1, cu_seqlens_q=cu,
                        cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest)
            for tag, variant in (("static", dict(DYNAMIC=False)), ("dynamic", dict(DYNAMIC=True))):
                def fwd_only(variant=variant):
                    return sm90.forward(q.detach(), k.detach(), v.detach(), variant=variant, **opts)
                t = statistics.median(do_bench(fwd_only, warmup=10, rep=50, return_mode="median")
                                      for _ in range(args.reps))
                line.append(f"sm90 fwd {tag} {flops / t / 1e9:4.0f}")
        for name, call in calls.items():
            def fwd(call=call):
                with torch.no_grad():
                    out = call()
                return out[0] if isinstance(out, tuple) else out

            def train(call=call):
                out = call()
                out = out[0] if isinstance(out, tuple) else out
                torch.autograd.grad(out, (q, k, v), dout)
            try:
                syncs = (host_syncs(fwd), host_syncs(train))
                t_f = statistics.median(do_bench(fwd, warmup=10, rep=50, return_mode="median")
                                        for _ in range(args.reps))
                t_t = statistics.median(do_bench(train, warmup=10, rep=50, return_mode="median")
                                        for _ in range(args.reps))
            except Exception as exc:  # noqa: BLE001 - report and go on
                line.append(f"{name} {type(exc).__name__}: {str(exc)[:100]}")
                continue
            line.append(f"{name} {flops / t_f / 1e9:4.0f} / {3.5 * flops / t_t / 1e9:4.0f} "
                        f"(syncs {syncs[0]} / {syncs[1]})")
        print(f"D={d} H={heads} {lens_text} causal={int(causal)} | " + " | ".join(line), flush=True)


if __name__ == "__main__":
    main()
