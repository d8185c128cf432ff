"""Eager PyTorch attention: the oracle of every test and the CPU backend.

Every feature of fa4, computed with plain tensor operations, chunked over queries and keys so memory stays
O(S·D) plus one (chunk_q × chunk_k) score tile per head: a 32k-token sequence never allocates 32k² scores.
The semantics are those of docs/INTERNALS.md; `forward` and `backward` have the backend signature.

Two passes per query chunk: the first accumulates the log-sum-exp over key chunks, the second forms the
exactly normalised probabilities P = exp(s - lse) and accumulates P·V. Statistics are kept in fp32.
`compute_dtype` sets the precision of the products (scores, P, P·V): fp32 for the oracle, the input dtype
for the "low precision" run of the numerics rule, which rounds scores and P as a bf16/fp16 kernel would.
"""
import math

import torch

# Elements of one (batch·heads, chunk_q, chunk_k) score tile; bounds the working memory of both passes.
_TILE_ELEMENTS = 1 << 22


def _chunk_sizes(bh, sq, sk):
    ck = min(max(sk, 1), 1024)
    cq = max(16, min(max(sq, 1), _TILE_ELEMENTS // max(1, bh * ck)))
    return cq, ck


def _visible(i, j, sk_len, sq_len, window_left, window_right):
    """Bool (cq, ck): query rows i see key columns j (bottom-right aligned window, -1 = unbounded)."""
    off = sk_len - sq_len
    vis = (j[None, :] < sk_len) & (i[:, None] < sq_len)
    if window_left >= 0:
        vis &= j[None, :] >= i[:, None] + off - window_left
    if window_right >= 0:
        vis &= j[None, :] <= i[:, None] + off + window_right
    return vis


def _scores(qc, kc, scale, softcap, cd):
    """s = scale·q·kᵀ, or softcap·tanh(scale·q·kᵀ/softcap); also returns tanh for the softcap gradient."""
    s = torch.matmul(qc.to(cd), kc.to(cd).transpose(-1, -2)).float() * scale
    if softcap > 0:
        t = torch.tanh(s / softcap)
        return (softcap * t).to(cd).float(), t
    return s.to(cd).float(), None


def _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table):
    """Yield (q_b, k_b, v_b, q_slice) with q_b (1, Sq_b, Hq, D) etc. for each sequence of the batch."""
    varlen = cu_seqlens_q is not None
    batch = (cu_seqlens_q.numel() - 1) if varlen else q.shape[0]
    cu_q = cu_seqlens_q.tolist() if varlen else None
    cu_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else None
    used = seqused_k.tolist() if seqused_k is not None else None
    for b in range(batch):
        if varlen:
            qs = slice(cu_q[b], cu_q[b + 1])
            q_b = q[qs].unsqueeze(0)
        else:
            qs = b
            q_b = q[b:b + 1]
        if page_table is not None:
            page_size = k.shape[1]
            n_keys = used[b] if used is not None else page_table.shape[1] * page_size
            n_pages = (n_keys + page_size - 1) // page_size
            pages = page_table[b, :n_pages].long()
            k_b = k[pages].reshape(-1, *k.shape[2:])[:n_keys].unsqueeze(0)
            v_b = v[pages].reshape(-1, *v.shape[2:])[:n_keys].unsqueeze(0)
        elif cu_k is not None:
            start, end = cu_k[b], cu_k[b + 1]
            if used is not None:
                end = start + used[b]
            k_b, v_b = k[start:end].unsqueeze(0), v[start:end].unsqueeze(0)
        else:
            end = used[b] if used is not None else k.shape[1]
            k_b, v_b = k[b:b + 1, :end], v[b:b + 1, :end]
        yield q_b, k_b, v_b, qs


def _heads_first(x, group=1):
    """(1 or B, S, H, D) -> (B, H·group, S, D): kv heads repeated for their query-head group."""
    x = x.transpose(1, 2)
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _forward_one(q, k, v, scale, window_left, window_right, softcap, sink, cd):
    """q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> out (B, Sq, Hq, Dv) fp32, lse (B, Hq, Sq)."""
    bsz, sq, hq, _ = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    qh, kh, vh = _heads_first(q), _heads_first(k, group), _heads_first(v, group)
    out = torch.zeros(bsz, hq, sq, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((bsz, hq, sq), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = _chunk_sizes(bsz * hq, sq, sk)
    dev = q.device
    for q0 in range(0, sq, cq):
        qc = qh[:, :, q0:q0 + cq]
        rows = torch.arange(q0, q0 + qc.shape[2], device=dev)
        # Pass 1: log-sum-exp over all visible keys (and the sink).
        acc = lse[:, :, q0:q0 + cq].clone()
        for k0 in range(0, sk, ck):
            cols = torch.arange(k0, min(k0 + ck, sk), device=dev)
            vis = _visible(rows, cols, sk, sq, window_left, window_right)
            if not vis.any():
                continue
            s, _ = _scores(qc, kh[:, :, k0:k0 + ck], scale, softcap, cd)
            s = s.masked_fill(~vis, float("-inf"))
            acc = torch.logaddexp(acc, torch.logsumexp(s, dim=-1))
        if sink is not None:
            acc = torch.logaddexp(acc, sink.float()[None, :, None].expand_as(acc))
        lse[:, :, q0:q0 + cq] = acc
        # Pass 2: P = exp(s - lse), exactly normalised; empty rows (lse = -inf) contribute nothing.
        safe = torch.where(torch.isfinite(acc), acc, torch.zeros_like(acc))[..., None]
        for k0 in range(0, sk, ck):
            cols = torch.arange(k0, min(k0 + ck, sk), device=dev)
            vis = _visible(rows, cols, sk, sq, window_left, window_right)
            if not vis.any():
                continue
            s, _ = _scores(qc, kh[:, :, k0:k0 + ck], scale, softcap, cd)
            p = torch.exp(s - safe).masked_fill(~vis, 0.0)
            out[:, :, q0:q0 + cq] += torch.matmul(p.to(cd), vh[:, :, k0:k0 + ck].to(cd)).float()
    return out.transpose(1, 2), lse


def _backward_one(do, q, k, v, o, lse, dlse, scale, window_left, window_right, softcap, sink, cd):
    """Gradients of one batched problem; returns dq, dk, dv (fp32, input layouts) and per-head dsink."""
    bsz, sq, hq, d = q.shape
    sk, hkv, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    qh, kh, vh = _heads_first(q), _heads_first(k, group), _heads_first(v, group)
    doh, oh = _heads_first(do), _heads_first(o)
    # Delta_i = rowsum(dO_i · O_i) - dlse_i: the softmax Jacobian's diagonal correction (and lse's own gradient).
    delta = (doh.float() * oh.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    finite = torch.isfinite(lse)
    lse_safe = torch.where(finite, lse, torch.zeros_like(lse))
    dq = torch.zeros(bsz, hq, sq, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(bsz, hq, sk, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(bsz, hq, sk, dv_dim, dtype=torch.float32, device=q.device)
    cq, ck = _chunk_sizes(bsz * hq, sq, sk)
    dev = q.device
    for q0 in range(0, sq, cq):
        sl = slice(q0, q0 + cq)
        qc, doc = qh[:, :, sl], doh[:, :, sl]
        rows = torch.arange(q0, q0 + qc.shape[2], device=dev)
        for k0 in range(0, sk, ck):
            cols = torch.arange(k0, min(k0 + ck, sk), device=dev)
            vis = _visible(rows, cols, sk, sq, window_left, window_right)
            vis = vis & finite[:, :, sl, None]
            if not vis.any():
                continue
            kc, vc = kh[:, :, k0:k0 + ck], vh[:, :, k0:k0 + ck]
            s, t = _scores(qc, kc, scale, softcap, cd)
            p = torch.exp(s - lse_safe[:, :, sl, None]).masked_fill(~vis, 0.0).to(cd)
            dv[:, :, k0:k0 + ck] += torch.matmul(p.transpose(-1, -2), doc.to(cd)).float()
            dp = torch.matmul(doc.to(cd), vc.to(cd).transpose(-1, -2)).float()
            ds = p.float() * (dp - delta[:, :, sl, None])
            if t is not None:
                ds = ds * (1.0 - t * t)  # d(c·tanh(x/c))/dx
            ds = ds.to(cd)
            dq[:, :, sl] += torch.matmul(ds, kc.to(cd)).float() * scale
            dk[:, :, k0:k0 + ck] += torch.matmul(ds.transpose(-1, -2), qc.to(cd)).float() * scale
    dsink = None
    if sink is not None:
        p_sink = torch.exp(sink.float()[None, :, None] - lse_safe) * finite
        dsink = -(p_sink * delta).sum(dim=(0, 2))
    # Sum dK/dV over each kv head's query-head group.
    dk = dk.view(bsz, hkv, group, sk, d).sum(2)
    dv = dv.view(bsz, hkv, group, sk, dv_dim).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dsink


def _lse_slice(lse, qs, varlen):
    """The (1, Hq, Sq_b) view of lse for one sequence."""
    return lse[:, qs].unsqueeze(0) if varlen else lse[qs:qs + 1]


def forward(q, k, v, *, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, sink=None,
            cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
            page_table=None, compute_dtype=None):
    """Attention forward per docs/INTERNALS.md -> (out in q's dtype, lse fp32)."""
    cd = compute_dtype or torch.float32
    varlen = cu_seqlens_q is not None
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    for q_b, k_b, v_b, qs in _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table):
        if q_b.shape[1] == 0:
            continue
        o_b, l_b = _forward_one(q_b, k_b, v_b, softmax_scale, window_left, window_right, softcap, sink, cd)
        if varlen:
            out[qs] = o_b[0].to(q.dtype)
            lse[:, qs] = l_b[0]
        else:
            out[qs] = o_b[0].to(q.dtype)
            lse[qs] = l_b[0]
    return out, lse


def backward(dout, q, k, v, out, lse, dlse, *, softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
             sink=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None,
             max_seqlen_k=None, page_table=None, deterministic=False, compute_dtype=None):
    """Attention backward per docs/INTERNALS.md -> (dq, dk, dv, dsink). Always deterministic."""
    if page_table is not None:
        raise NotImplementedError("the backward of a paged KV cache is not supported (inference only)")
    cd = compute_dtype or torch.float32
    varlen = cu_seqlens_q is not None
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dsink = torch.zeros(q.shape[-2], dtype=torch.float32, device=q.device) if sink is not None else None
    cu_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else None
    seqs = _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, None)
    for b, (q_b, k_b, v_b, qs) in enumerate(seqs):
        if q_b.shape[1] == 0 or (k_b.shape[1] == 0 and sink is None):
            continue  # nothing to differentiate: the gradients stay zero
        pick = (lambda t: t[qs].unsqueeze(0)) if varlen else (lambda t: t[qs:qs + 1])
        do_b, o_b = pick(dout), pick(out)
        lse_b = _lse_slice(lse, qs, varlen)
        dlse_b = _lse_slice(dlse, qs, varlen) if dlse is not None else None
        g = _backward_one(do_b, q_b, k_b, v_b, o_b, lse_b, dlse_b, softmax_scale, window_left, window_right,
                          softcap, sink, cd)
        dq_b, dk_b, dv_b, ds_b = g
        n_keys = k_b.shape[1]
        if varlen:
            dq[qs] = dq_b[0]
            dk[cu_k[b]:cu_k[b] + n_keys] = dk_b[0]
            dv[cu_k[b]:cu_k[b] + n_keys] = dv_b[0]
        else:
            dq[qs] = dq_b[0]
            dk[qs, :n_keys] = dk_b[0]
            dv[qs, :n_keys] = dv_b[0]
        if ds_b is not None:
            dsink += ds_b
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink


def default_scale(head_dim):
    return 1.0 / math.sqrt(head_dim)
