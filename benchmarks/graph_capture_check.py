"""CUDA-graph capture of fa4's Triton path, forward and forward + backward, lean kernel on and off, and on sm_90
the Gluon backward with deterministic=True: replays must equal eager calls. Prints the full traceback of a
failing capture.

    python benchmarks/graph_capture_check.py
"""
import traceback

import torch

import fa4
from fa4.kernels.triton import forward as fwd
from sm90_probe import _capture  # benchmarks/ is this script's directory


def capture(fn):
    """fn captured (sm90_probe's recipe, one side-stream warm-up) and replayed once -> the captured outputs."""
    graph, res = _capture(fn, warmups=1)
    graph.replay()
    torch.cuda.synchronize()
    return res


def main():
    for lean in (True, False):
        fwd.USE_LEAN = lean
        # D = 256 causal backward: its dV pass runs on a side stream (backward.CONCURRENT_LAUNCHES), which the
        # capture must follow; deterministic so that replay and eager agree bitwise (no dQ atomics).
        for s, causal, grad, d in ((1024, False, False, 128), (4096, False, False, 128), (1024, True, False, 128),
                                   (1024, False, True, 128), (1024, True, True, 256)):
            b, h = 16384 // s, 2048 // d
            torch.manual_seed(0)
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
                       for _ in range(3))
            dout = torch.randn_like(q)

            def call():
                out = fa4.flash_attn_func(q, k, v, causal=causal, backend="triton", deterministic=True)
                if grad:
                    return torch.autograd.grad(out, (q, k, v), dout)
                return (out, )
            name = f"lean={lean} D={d} S={s} causal={causal} backward={grad}"
            try:
                eager = [t.clone() for t in call()]
                got = capture(call)
                diff = max((a.float() - e.float()).abs().max().item() for a, e in zip(got, eager))
                print(f"{name}: captured, replay vs eager max|diff| {diff:.1e}", flush=True)
            except Exception:
                print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
                return


def sm90_deterministic():
    """The sm90 backward with deterministic=True under CUDA-graph capture: D = 128 takes the main kernel's ordered
    dQ chain (its counters zeroed by a memset inside the graph, so every replay starts the chain afresh; causal from
    2,048 rows on the persistent grid, whose tile counter shares that buffer), D = 64 the keys-as-rows chain. Replays
    must equal eager calls bitwise, twice in a row."""
    for d, s, causal in ((128, 1024, True), (128, 4096, True), (128, 4096, False), (64, 4096, True)):
        b, h = 16384 // s, 2048 // d
        torch.manual_seed(1)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)

        def call():
            out = fa4.flash_attn_func(q, k, v, causal=causal, deterministic=True)
            return torch.autograd.grad(out, (q, k, v), dout)
        name = f"sm90 deterministic D={d} S={s} causal={causal} backward=True"
        try:
            eager = [t.clone() for t in call()]
            graph, res = _capture(call, warmups=1)
            diffs = []
            for _ in range(2):
                graph.replay()
                torch.cuda.synchronize()
                diffs.append(max((a.float() - e.float()).abs().max().item() for a, e in zip(res, eager)))
            print(f"{name}: captured, two replays vs eager max|diff| {diffs[0]:.1e} {diffs[1]:.1e}", flush=True)
        except Exception:
            print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
            return


def sm90_chunked():
    """The default sm90 backward of batched causal calls, whose CTAs run on the chunked 3-D grid (backward.cta_chunk,
    session 15), under CUDA-graph capture: dK and dV equal eager calls bitwise (each CTA owns its keys), dQ (TMA
    reduce-adds in any order) within fp32 rounding. Also non-causal D = 128, whose shared-dQ tile runs on the
    persistent grid (session 18; its tile counter is zeroed with the dQ accumulator, inside the graph)."""
    from fa4.kernels.sm90 import backward as bwd
    for d, s, causal in ((64, 4096, True), (128, 1024, True), (256, 4096, True), (128, 1024, False),
                         (128, 4096, False)):
        b, h = 16384 // s, 2048 // d
        right = 0 if causal else -1
        tile = bwd.default_tile(d, d, -1, 0.0, window_right=right)
        chunk = bwd.cta_chunk(tile, b * h, s, d, -1, right, False, False)
        torch.manual_seed(2)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)

        def call():
            out = fa4.flash_attn_func(q, k, v, causal=causal)
            return torch.autograd.grad(out, (q, k, v), dout)
        grid = "persistent" if bwd.persistent_tiles(tile) else f"grid chunk {chunk}"
        name = f"sm90 {'causal' if causal else 'full'} D={d} S={s} ({grid}) backward=True"
        try:
            eager = [t.clone() for t in call()]
            graph, res = _capture(call, warmups=1)
            graph.replay()
            torch.cuda.synchronize()
            same_kv = all(torch.equal(a, e) for a, e in zip(res[1:], eager[1:]))
            dq = (res[0].float() - eager[0].float()).abs().max().item()
            print(f"{name}: captured, dK/dV {'bitwise equal' if same_kv else 'DIFFER'}, dQ max|diff| {dq:.1e}",
                  flush=True)
        except Exception:
            print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
            return


def sm90_packed():
    """Packed calls of mixed lengths on sm_90 under CUDA-graph capture: the forward draws its units from a counter
    that a small kernel zeroes (with the longest-first order) inside the graph, so every replay starts afresh
    (session 20: DYNAMIC by default there); the backward runs on the chunked grid. Two replays: out and dK / dV
    equal eager calls bitwise, dQ within fp32 rounding."""
    lens = [2048, 0, 1024, 77, 4608, 512]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    torch.manual_seed(3)
    q, k, v = (torch.randn(sum(lens), 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def call():
        out = fa4.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        return (out.detach(), ) + torch.autograd.grad(out, (q, k, v), dout)
    name = "sm90 packed mixed lengths D=128 causal (DYNAMIC forward) backward=True"
    try:
        eager = [t.clone() for t in call()]
        graph, res = _capture(call, warmups=1)
        for i in range(2):
            graph.replay()
            torch.cuda.synchronize()
            same = all(torch.equal(a, e) for a, e in zip((res[0], ) + tuple(res[2:]), (eager[0], ) + tuple(eager[2:])))
            dq = (res[1].float() - eager[1].float()).abs().max().item()
            print(f"{name}: captured, replay {i}: out/dK/dV {'bitwise equal' if same else 'DIFFER'}, dQ max|diff| "
                  f"{dq:.1e}", flush=True)
    except Exception:
        print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)


def sequence(backend, lean, sm90_first=False):
    """host_probe's order: eager forward and backward, a forward-only capture with grad-requiring inputs, then a
    forward + backward capture."""
    fwd.USE_LEAN = lean
    b, s, h, d = 16, 1024, 16, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    def attn():
        if backend == "sdpa":  # PyTorch's own attention: is the failure fa4's or the sequence's?
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return fa4.flash_attn_func(q, k, v, backend=backend)
    out = attn()
    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    steps = [("forward only", lambda: (attn(), )),
             ("forward + backward", lambda: torch.autograd.grad(attn(), (q, k, v), dout))]
    for name, fn in steps:
        try:
            capture(fn)
            print(f"sequence backend={backend} lean={lean}: {name} captured", flush=True)
        except Exception:
            print(f"sequence backend={backend} lean={lean}: {name} FAILED\n{traceback.format_exc()[-1500:]}",
                  flush=True)
            return False
    return True


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1 and sys.argv[1] == "sequence":
        sequence(sys.argv[2], sys.argv[3] == "1")
        raise SystemExit
    main()
    if torch.cuda.get_device_capability() == (9, 0):
        sm90_deterministic()
        sm90_chunked()
        sm90_packed()
