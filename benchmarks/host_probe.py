"""Where a short training call's time goes: the kernels, or the Python that launches them.

    python benchmarks/host_probe.py                       # D = 128 S = 1024 and 4096, both backends
    python benchmarks/host_probe.py --rows 128:1024,64:4096 --backends triton

For each (backend, D, S, causal) of the training suite (bf16, B = 16384 / S, H = 2048 / D) it prints:
  api    ms of the call as `fa4 bench` times it (do_bench, L2 flushed before each call, inputs require grad);
         the backward is torch.autograd.grad(out, (q, k, v), dout) of one saved forward
  graph  ms of the same call captured in a CUDA graph and replayed under do_bench: the GPU's own time (the
         backward's: a captured forward + backward less the captured forward)
  host   µs of Python per call, back to back without synchronising
do_bench enqueues a ~85 µs memset before each timed call; when host > graph + ~85 µs the GPU waits for Python
and `api` exceeds `graph`. That is the test of whether a row is bound by its host path.
"""
import argparse
import traceback

import torch

import fa4
# The same do_bench, host-time and CUDA-graph helpers as the forward probe's.
from sm90_probe import _bench, _graph_ms, _host_us  # noqa: E402


def _flops(b, h, s, d, causal):
    f = 4.0 * b * h * s * s * d
    return f / 2 if causal else f


def probe(backend, d, s, causal):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def fwd():
        return fa4.flash_attn_func(q, k, v, causal=causal, backend=backend)
    out = fwd()

    def bwd():
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    def fwd_bwd():
        o = fa4.flash_attn_func(q, k, v, causal=causal, backend=backend)
        return torch.autograd.grad(o, (q, k, v), dout)
    res = {}
    for name, fn in (("fwd", fwd), ("bwd", bwd)):
        res[name + "_api"] = _bench(fn)
        res[name + "_host"] = _host_us(fn)
    # The backward runs on its forward's stream, so it is captured together with a forward: the graph time of
    # the backward is (forward + backward) - forward.
    # Known to fail on the H100 image of 2026-11-26 (torch 2.11): the forward + backward capture after the eager
    # retain_graph backward calls above ends in cudaErrorStreamCaptureImplicit, for SDPA's own attention too
    # (benchmarks/graph_capture_check.py sequence sdpa 1); benchmarks/NOTES.md, session 6.
    res["fwd_graph"] = _graph_ms(fwd)
    res["bwd_graph"] = _graph_ms(fwd_bwd) - res["fwd_graph"]
    f = _flops(b, h, s, d, causal)
    print(f"{backend:7s} {d:4d} {s:6d} {int(causal):6d} | "
          f"fwd {f / res['fwd_api'] / 1e9:6.1f} api {f / res['fwd_graph'] / 1e9:6.1f} graph "
          f"{res['fwd_host']:6.0f} us | bwd {2.5 * f / res['bwd_api'] / 1e9:6.1f} api "
          f"{2.5 * f / res['bwd_graph'] / 1e9:6.1f} graph {res['bwd_host']:6.0f} us", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="128:1024,128:4096", help="comma-separated D:S")
    ap.add_argument("--backends", default="triton,sm90")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "| TFLOP/s: api (bench path), graph (GPU only); host µs per call")
    print("backend    D      S causal | forward ... | backward ...")
    for backend in args.backends.split(","):
        for row in args.rows.split(","):
            d, s = (int(x) for x in row.split(":"))
            for causal in (False, True):
                try:
                    probe(backend, d, s, causal)
                except Exception as exc:
                    print(f"{backend} D={d} S={s} causal={causal}: {exc!r}"[:300], flush=True)
                    traceback.print_exc()
                    return  # a failed capture leaves the CUDA RNG state unusable for the rest of the process


if __name__ == "__main__":
    main()
