"""Steady-state SM clock, board power and work per clock of fa4's forward and the peers' (is the card power-bound?).

    python benchmarks/clock_probe.py                                  # the rows below, fa4 / cuDNN / FlashAttention-4
    python benchmarks/clock_probe.py --rows 256:16384:0 --backends fa4,flashattn4 --seconds 4
    python benchmarks/clock_probe.py --matmul --rows 256:16384:0 --backends fa4,flashattn4   # cuBLAS's GEMM first

Session 9's trace put fa4's non-causal D = 256 key loop at 95% of the tensor cores' peak per cycle, at an SM
clock of 1.60-1.63 GHz where the card boosts to 1.98: past that point a kernel is faster only by drawing less
power per FLOP, which lets the clock rise. This probe tests that account against the peers. Each backend's
forward (inputs as `fa4 bench` gives them: bf16, B·S = 16384, H·D = 2048, inputs that require grad) runs back to
back for --seconds while `nvidia-smi -lms` samples the SM clock, the board power and the throttle reasons. Per
(row, backend) it prints:

  TFLOP/s     over the timed loop (CUDA events around the whole loop, so no L2 flush: a steady-state figure,
              not `fa4 bench`'s)
  MHz, W      medians of the samples taken while the loop ran
  FLOP/clk    per SM and cycle: TFLOP/s / (SMs x MHz); the tensor cores' dense bf16 peak is 4096
  of peak     FLOP/clk / 4096
  throttle    the throttle-reason bits seen (0x4 = software power cap, 0x20 = SW thermal, ...), or-ed

If FlashAttention-4 leads at a higher clock and equal work per clock, the gap is power; at equal clocks and more
work per clock, it is the kernel. `--matmul` adds a first row measured the same way: cuBLAS's bf16 8192³ product
(torch.matmul), the card's dense-GEMM reference for "work per clock" under the same power cap. The FA4 kit must be
installed for flashattn4 (benchmarks/NOTES.md, "FA4 kit").
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fa4.bench import peers  # noqa: E402

DEFAULT_ROWS = "256:16384:0,256:16384:1,128:16384:0,128:16384:1,64:16384:0"
PEAK_FLOP_PER_CLK = 4096  # dense bf16 per SM and cycle on sm_90 (989.4 TFLOP/s at 1.83 GHz x 132 SMs)
QUERY = "clocks.sm,power.draw.instant,clocks_throttle_reasons.active"


def parse_rows(text):
    rows = []
    for item in text.split(","):
        d, s, c = item.split(":")
        rows.append((int(d), int(s), bool(int(c))))
    return rows


def inputs(d, s):
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return q, k, v, b, h


def forward_flops(b, h, s, d, causal):
    return 4 * b * h * s * s * d / (2 if causal else 1)


def sample_while(run, interval_ms=50):
    """Runs run() while nvidia-smi samples the GPU; returns (run's result, [(MHz, W, throttle bits)])."""
    index = torch.cuda.current_device()
    smi = subprocess.Popen(["nvidia-smi", "-i", str(index), f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                            f"-lms={interval_ms}"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # nvidia-smi's first sample
        result = run()
    finally:
        smi.terminate()
        out, _ = smi.communicate(timeout=10)
    samples = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            samples.append((float(parts[0]), float(parts[1]), int(parts[2], 16)))
        except (ValueError, IndexError):
            continue
    skip = int(300 / interval_ms) + 1  # the samples of the sleep before run() (idle)
    return result, samples[skip:]


def per_call_s(fn):
    """Seconds of one call after a first one (compile, autotune) outside any measurement."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return max(time.perf_counter() - t0, 1e-5)


def steady_loop(fn, seconds, per_call):
    """(calls, ms per call) of fn run back to back for about `seconds`, timed by CUDA events around the loop."""
    calls = max(10, int(seconds / per_call))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fn()
        if i % 64 == 63:
            end.record()
            end.synchronize()  # keep the host within a few calls of the GPU
    end.record()
    torch.cuda.synchronize()
    return calls, start.elapsed_time(end) / calls


def measure_row(d, s, causal, name, fn, flops, sms, seconds):
    """Prints one row: fn's steady-state TFLOP/s and the clock, power and throttle bits sampled meanwhile."""
    # Compile and warm up first: nvidia-smi samples only the timed loop (session 10's first run sampled the fa4
    # rows' JIT compile and read idle clocks and power).
    per_call = per_call_s(fn)
    (calls, ms), samples = sample_while(lambda: steady_loop(fn, seconds, per_call))
    tflops = flops / ms / 1e9
    if not samples:
        print(f"{d:>4} {s:>6} {int(causal):>2} {name:>11} | {tflops:8.1f}  (no nvidia-smi samples)", flush=True)
        return
    mhz = statistics.median(x[0] for x in samples)
    watts = statistics.median(x[1] for x in samples)
    bits = 0
    for x in samples:
        bits |= x[2]
    per_clk = tflops * 1e12 / (sms * mhz * 1e6)
    print(f"{d:>4} {s:>6} {int(causal):>2} {name:>11} | {tflops:8.1f} {mhz:6.0f} {watts:6.0f} "
          f"{per_clk:8.0f} {per_clk / PEAK_FLOP_PER_CLK:7.2f} {bits:#8x} {len(samples):>7}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="D:S:causal,... (default %(default)s)")
    ap.add_argument("--backends", default="fa4,sdpa_cudnn,flashattn4")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--matmul", action="store_true", help="first a row for cuBLAS's bf16 8192^3 matmul")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    print(f"# {props.name}, {sms} SMs, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    backends = {}
    for name in args.backends.split(","):
        peer = peers.Fa4() if name == "fa4" else peers.make_peer(name)
        reason = peer.available()  # None when usable
        if reason is not None:
            print(f"# {name}: skipped ({reason})", flush=True)
            continue
        backends[name] = peer
    print(f"{'D':>4} {'S':>6} {'c':>2} {'backend':>11} | {'TFLOP/s':>8} {'MHz':>6} {'W':>6} {'FLOP/clk':>8} "
          f"{'of peak':>7} {'throttle':>8} {'samples':>7}", flush=True)
    if args.matmul:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b_mat = torch.randn_like(a)
        measure_row("gemm", 8192, False, "matmul", lambda: a @ b_mat, 2 * 8192 ** 3, sms, args.seconds)
        a = b_mat = None
    for d, s, causal in parse_rows(args.rows):
        q, k, v, b, h = inputs(d, s)
        flops = forward_flops(b, h, s, d, causal)
        for name, peer in backends.items():
            try:
                fn_qkv = peer.training(causal)
            except peers.NotApplicable:
                continue

            measure_row(d, s, causal, name, lambda: fn_qkv(q, k, v), flops, sms, args.seconds)
        q = k = v = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
