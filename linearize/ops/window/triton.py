"""LoLCATs window hybrid in Triton: forward, backward, decoding step.

Same math, layout and GQA convention as `reference.window_attn_chunked`: query i takes exact
softmax weights f e^(s_ij - m_i) over keys i - window < j <= i (m_i their max score) and
linear weights (1 - f) fq_i·fk_j over older keys, under one normalizer; the linear terms are not
rescaled by e^(-m_i).

One fused pass: a program owns one (batch, query head, block of value columns) and walks the
query blocks in order. For the block at c0 the keys older than L = c0 - window + 1 (rounded
down to a block) are linear for every query in it and live in the fp32 state (S, z); the keys
in [L, c0 + BT) are visited tile by tile with masks by distance, the softmax part with an
online max (so m_i comes out exact over the window) and the linear part in its own
accumulators. A decoding cache (initial_state) is laid before the sequence (the host
concatenates it); queries then start at position P = its length.

Backward, two Triton passes that recompute what they need: ``_bwd_dq`` (forward in time,
rebuilding S) gives dq, dfq and two per-row sums; ``_bwd_dkv`` (backward in time, with the
state gradient dS = Σ fqᵀ dN over the queries for which a key is old) gives dk, dfk, dv.
With dN = dy / den and dD = -(dy·y) / den, da_ij = dN_i·v_j + dD_i. The max m_i is part of the
function (the linear terms are not divided by e^(m_i)), so its gradient, dm_i = -f Σ_win P da,
goes to the argmax key, which the forward records; the host adds that gather/scatter, the
window factor's gradient (a sum of per-row terms) and the initial state's (two matmuls).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.ops.common import _check_one_token, _check_positive, expand_kv
from linearize.ops.triton_common import (
    NUM_WARPS, contiguous, kv_sum, mm, no_grad_step, pow2, put, tile, time_block, unify, value_block,
)  # fmt: skip
from linearize.ops.window.reference import WindowState, _check_window, _mix_factor, _window_state


@triton.jit
def _old_before(c0, W, BT: tl.constexpr):
    """Keys before this position are old (linear) for every query of the block at c0. Per block
    it grows by 0 or BT, so each block adds at most one key block to the state."""
    return (tl.maximum(c0 - W + 1, 0) // BT) * BT


@triton.jit
def _add_keys(s, z, fk, v, cols, N, rf, F, rv, D, DT: tl.constexpr):
    """(S, z) plus the keys at cols (those outside [0, N) add nothing)."""
    bfk, bv = tile(fk, cols, N, rf, F, F), tile(v, cols, N, rv, D, D)
    return s + mm(tl.trans(bfk), bv, DT), z + tl.sum(bfk.to(tl.float32), 0)


@triton.jit(do_not_specialize=["T", "N", "P", "W"])
def _fwd(q, k, v, fq, fk, fw, s0, z0, o, den, mx, arg, T, N, P, H, G, W, scale, eps,
         DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
         BF: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    q, fq, o = q + bh * T * DK, fq + bh * T * F, o + bh * T * D
    den, mx, arg = den + bh * T, mx + bh * T, arg + bh * T
    k, v, fk = k + bkv * N * DK, v + bkv * N * D, fk + bkv * N * F
    DT: tl.constexpr = q.dtype.element_ty
    rk, rf, rv, rt = tl.arange(0, BK), tl.arange(0, BF), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    f = tl.load(fw + bh % H)
    s = tl.zeros([BF, BV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    if HAS_S0:
        s += tile(s0 + bh * F * D, rf, F, rv, D, D)
        z += tl.load(z0 + bh * F + rf, mask=rf < F, other=0.0)
    # a cache holds < W keys (P < W), so none is old for the first query block
    for c0 in range((P // BT) * BT, N, BT):  # query blocks, in sequence positions
        hi = _old_before(c0, W, BT)  # keys before hi are old for every query here
        s, z = _add_keys(s, z, fk, v, hi - BT + rt, N, rf, F, rv, D, DT)  # the block that just became old
        rows = c0 + rt
        bq, bfq = tile(q, rows - P, T, rk, DK, DK), tile(fq, rows - P, T, rf, F, F)
        m = tl.full([BT], float("-inf"), dtype=tl.float32)
        am = tl.zeros([BT], dtype=tl.int32)
        acc_s, l_s = tl.zeros([BT, BV], dtype=tl.float32), tl.zeros([BT], dtype=tl.float32)
        acc_l, l_l = mm(bfq, s, DT), tl.sum(bfq.to(tl.float32) * z[None, :], 1)
        for kb in range(hi, c0 + BT, BT):
            cols = kb + rt
            bk, bv, bfk = tile(k, cols, N, rk, DK, DK), tile(v, cols, N, rv, D, D), tile(fk, cols, N, rf, F, F)
            dist = rows[:, None] - cols[None, :]
            sc = tl.where((dist >= 0) & (dist < W), mm(bq, tl.trans(bk), DT) * scale, float("-inf"))
            bm = tl.max(sc, 1)
            am = tl.where(bm > m, tl.argmax(sc, 1) + kb, am)
            m_new = tl.maximum(m, bm)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no window key yet
            alpha = tl.exp(m - m_use)
            p = tl.exp(sc - m_use[:, None])
            acc_s = acc_s * alpha[:, None] + mm(p, bv, DT)
            l_s = l_s * alpha + tl.sum(p, 1)
            m = m_new
            la = tl.where(dist >= W, mm(bfq, tl.trans(bfk), DT), 0.0)
            acc_l += mm(la, bv, DT)
            l_l += tl.sum(la, 1)
        d = f * l_s + (1 - f) * l_l + eps
        put(o, (f * acc_s + (1 - f) * acc_l) / d[:, None], rows - P, T, rv, D, D)
        if iv == 0:
            qm = (rows >= P) & (rows < N)
            tl.store(den + rows - P, d, mask=qm)
            tl.store(mx + rows - P, m, mask=qm)
            tl.store(arg + rows - P, am, mask=qm)


@triton.jit(do_not_specialize=["T", "N", "P", "W"])
def _bwd_dq(q, k, v, fq, fk, fw, s0, z0, do, den, delta, mx, dq, dfq, sw, r, T, N, P, H, G, W, BHT, scale,
            DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
            BF: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    q, fq, do = q + bh * T * DK, fq + bh * T * F, do + bh * T * D
    den, delta, mx = den + bh * T, delta + bh * T, mx + bh * T
    k, v, fk = k + bkv * N * DK, v + bkv * N * D, fk + bkv * N * F
    part = iv * BHT + bh * T  # this program's partial sums over its value columns
    dq, dfq, sw, r = dq + part * DK, dfq + part * F, sw + part, r + part
    DT: tl.constexpr = q.dtype.element_ty
    rk, rf, rv, rt = tl.arange(0, BK), tl.arange(0, BF), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    f = tl.load(fw + bh % H)
    first = (iv == 0).to(tl.float32)  # dD enters da once, not once per value block
    s = tl.zeros([BF, BV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    if HAS_S0:
        s += tile(s0 + bh * F * D, rf, F, rv, D, D)
        z += tl.load(z0 + bh * F + rf, mask=rf < F, other=0.0)
    for c0 in range((P // BT) * BT, N, BT):
        hi = _old_before(c0, W, BT)
        s, z = _add_keys(s, z, fk, v, hi - BT + rt, N, rf, F, rv, D, DT)  # the block that just became old
        rows = c0 + rt
        qm = (rows >= P) & (rows < N)
        bq, bfq = tile(q, rows - P, T, rk, DK, DK), tile(fq, rows - P, T, rf, F, F)
        rden = 1.0 / tl.load(den + rows - P, mask=qm, other=1.0)
        dd = -tl.load(delta + rows - P, mask=qm, other=0.0) * rden * first
        dy = tile(do, rows - P, T, rv, D, D)  # (BT, BV), as given: exact in the dots' dtype
        dn = dy.to(tl.float32) * rden[:, None]
        m = tl.load(mx + rows - P, mask=qm, other=0.0)
        gfq = (1 - f) * (mm(dn, tl.trans(s), DT) + dd[:, None] * z[None, :])  # (BT, BF)
        gr = -(tl.sum(dn * mm(bfq, s, DT), 1) + dd * tl.sum(bfq.to(tl.float32) * z[None, :], 1))
        gw = tl.zeros([BT], dtype=tl.float32)
        gq = tl.zeros([BT, BK], dtype=tl.float32)
        for kb in range(hi, c0 + BT, BT):
            cols = kb + rt
            bk, bv, bfk = tile(k, cols, N, rk, DK, DK), tile(v, cols, N, rv, D, D), tile(fk, cols, N, rf, F, F)
            dist = rows[:, None] - cols[None, :]
            win = (dist >= 0) & (dist < W) & qm[:, None]
            p = tl.where(win, tl.exp(mm(bq, tl.trans(bk), DT) * scale - m[:, None]), 0.0)
            da = mm(dy, tl.trans(bv), DT) * rden[:, None] + dd[:, None]  # (BT, BT)
            pda = p * da
            gq += mm(pda * f, bk, DT) * scale
            gw += tl.sum(pda, 1)
            lin = dist >= W
            la = tl.where(lin, mm(bfq, tl.trans(bfk), DT), 0.0)
            gfq += (1 - f) * mm(tl.where(lin, da, 0.0), bfk, DT)
            gr -= tl.sum(la * da, 1)
        put(dq, gq, rows - P, T, rk, DK, DK)
        put(dfq, gfq, rows - P, T, rf, F, F)
        tl.store(sw + rows - P, gw, mask=qm)
        tl.store(r + rows - P, gr + gw, mask=qm)


@triton.jit(do_not_specialize=["T", "N", "P", "W"])
def _bwd_dkv(q, k, v, fq, fk, fw, do, den, delta, mx, dk, dfk, dv, T, N, P, H, G, W, BHN, scale,
             DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
             BF: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    q, fq, do = q + bh * T * DK, fq + bh * T * F, do + bh * T * D
    den, delta, mx = den + bh * T, delta + bh * T, mx + bh * T
    k, v, fk = k + bkv * N * DK, v + bkv * N * D, fk + bkv * N * F
    part = iv * BHN + bh * N
    dk, dfk, dv = dk + part * DK, dfk + part * F, dv + bh * N * D  # dk, dfk: partials; dv: per query head
    DT: tl.constexpr = q.dtype.element_ty
    rk, rf, rv, rt = tl.arange(0, BK), tl.arange(0, BF), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    f = tl.load(fw + bh % H)
    first = (iv == 0).to(tl.float32)
    ds = tl.zeros([BF, BV], dtype=tl.float32)  # Σ fqᵀ dN over queries for which every key here is old
    dz = tl.zeros([BF], dtype=tl.float32)
    n_blocks = tl.cdiv(N, BT)
    for n in range(0, n_blocks):
        c0 = (n_blocks - 1 - n) * BT  # this key block
        # queries from up on see every key here as old; up falls by 0 or BT per block, so the
        # query block [up, up + BT) is the one new to (ds, dz) (none while up is the end: masked)
        up = tl.minimum(tl.cdiv(c0 + BT - 1 + W, BT) * BT, n_blocks * BT)
        rows = up + rt
        qm = (rows >= P) & (rows < N)
        rden = 1.0 / tl.load(den + rows - P, mask=qm, other=1.0)
        dn = tile(do, rows - P, T, rv, D, D).to(tl.float32) * rden[:, None]
        dd = -tl.load(delta + rows - P, mask=qm, other=0.0) * rden
        bfq = tile(fq, rows - P, T, rf, F, F)
        ds += mm(tl.trans(bfq), dn, DT)
        dz += tl.sum(bfq.to(tl.float32) * dd[:, None], 0)
        cols = c0 + rt
        bk, bv, bfk = tile(k, cols, N, rk, DK, DK), tile(v, cols, N, rv, D, D), tile(fk, cols, N, rf, F, F)
        gk = tl.zeros([BT, BK], dtype=tl.float32)
        gfk = (1 - f) * (mm(bv, tl.trans(ds), DT) + dz[None, :] * first)  # (BT, BF)
        gv = (1 - f) * mm(bfk, ds, DT)  # (BT, BV)
        for qb in range(c0, up, BT):  # queries before c0 see none of these keys
            rows = qb + rt
            qm = (rows >= P) & (rows < N)
            bq, bfq = tile(q, rows - P, T, rk, DK, DK), tile(fq, rows - P, T, rf, F, F)
            rden = 1.0 / tl.load(den + rows - P, mask=qm, other=1.0)
            dy = tile(do, rows - P, T, rv, D, D)
            dn = dy.to(tl.float32) * rden[:, None]
            dd = -tl.load(delta + rows - P, mask=qm, other=0.0) * rden * first
            m = tl.load(mx + rows - P, mask=qm, other=0.0)
            dist = rows[None, :] - cols[:, None]  # (keys, queries)
            win = (dist >= 0) & (dist < W) & qm[None, :]
            pt = tl.where(win, tl.exp(mm(bk, tl.trans(bq), DT) * scale - m[None, :]), 0.0)
            dat = mm(bv, tl.trans(dy), DT) * rden[None, :] + dd[None, :]  # da transposed
            gk += mm(pt * dat * f, bq, DT) * scale
            lin = (dist >= W) & qm[None, :]
            lt = tl.where(lin, mm(bfk, tl.trans(bfq), DT), 0.0)
            gv += mm(f * pt + (1 - f) * lt, dn, DT)
            gfk += (1 - f) * mm(tl.where(lin, dat, 0.0), bfq, DT)
        put(dk, gk, cols, N, rk, DK, DK)
        put(dfk, gfk, cols, N, rf, F, F)
        put(dv, gv, cols, N, rv, D, D)


class _WindowAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, fw, s0, z0, window: int, scale: float, eps: float, bt: int):
        q, k, v, fq, fk = contiguous(q, k, v, fq, fk)
        b, h, t, dk = q.shape
        n_keys, f, d = k.shape[2], fq.shape[-1], v.shape[-1]
        n = dict(T=t, N=n_keys, P=n_keys - t, H=h, G=h // k.shape[1], W=window)
        blocks = dict(DK=dk, F=f, D=d, BT=bt, BK=pow2(dk), BF=pow2(f), BV=value_block(d))
        fw = fw.float().contiguous()
        o = torch.empty(b, h, t, d, device=q.device, dtype=torch.float32)  # fp32: the backward's dy·y feeds the window factor's gradient, a sum that cancels
        den, mx = (q.new_empty(b, h, t, dtype=torch.float32) for _ in range(2))
        arg = q.new_empty(b, h, t, dtype=torch.int32)
        has_s0 = s0 is not None
        s0c, z0c = (s0.float().contiguous(), z0.float().contiguous()) if has_s0 else (den, den)
        grid = (triton.cdiv(d, blocks["BV"]), b * h)
        _fwd[grid](q, k, v, fq, fk, fw, s0c, z0c, o, den, mx, arg, *n.values(), scale, eps,
                   *blocks.values(), has_s0, num_warps=NUM_WARPS)  # fmt: skip
        ctx.save_for_backward(q, k, v, fq, fk, fw, s0c if has_s0 else None, z0c if has_s0 else None, o, den, mx, arg)
        ctx.args = (scale, n, blocks)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, fq, fk, fw, s0, z0, o, den, mx, arg = ctx.saved_tensors
        scale, n, blocks = ctx.args
        b, h, t, dk = q.shape
        n_keys, f, d, n_kv = k.shape[2], fq.shape[-1], v.shape[-1], k.shape[1]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # (B, H, T): dy · y
        nv = triton.cdiv(d, blocks["BV"])
        f32 = dict(device=q.device, dtype=torch.float32)
        dq, dfq = torch.empty(nv, b, h, t, dk, **f32), torch.empty(nv, b, h, t, f, **f32)
        sw, r = torch.empty(nv, b, h, t, **f32), torch.empty(nv, b, h, t, **f32)
        dkx, dfk = torch.empty(nv, b, h, n_keys, dk, **f32), torch.empty(nv, b, h, n_keys, f, **f32)
        dv = torch.empty(b, h, n_keys, d, **f32)
        has_s0 = s0 is not None
        grid = (nv, b * h)
        _bwd_dq[grid](q, k, v, fq, fk, fw, s0 if has_s0 else den, z0 if has_s0 else den, do, den, delta, mx,
                      dq, dfq, sw, r, *n.values(), b * h * t, scale, *blocks.values(), has_s0,
                      num_warps=NUM_WARPS)  # fmt: skip
        _bwd_dkv[grid](q, k, v, fq, fk, fw, do, den, delta, mx, dkx, dfk, dv, *n.values(), b * h * n_keys, scale,
                       *blocks.values(), num_warps=NUM_WARPS)  # fmt: skip
        dq, dkx, dfq, dfk = dq.sum(0), dkx.sum(0), dfq.sum(0), dfk.sum(0)
        # the max m_i's gradient, dm_i = -f Σ_win P da, reaches the score of its argmax key
        fh = fw.view(1, h, 1)
        dm = (-scale * fh * sw.sum(0)).unsqueeze(-1)  # (B, H, T, 1)
        idx = arg.long().unsqueeze(-1)
        dq += dm * expand_kv(k, h).gather(2, idx.expand(-1, -1, -1, dk)).float()
        dkx.scatter_add_(2, idx.expand(-1, -1, -1, dk), dm * q.float())
        dfw = r.sum((0, 1, 3))  # (H,)
        ds0 = dz0 = None
        if has_s0 and (ctx.needs_input_grad[6] or ctx.needs_input_grad[7]):
            dn = do.float() / den.unsqueeze(-1)  # (B, H, T, D)
            ds0 = (1 - fh.unsqueeze(-1)) * (fq.float().mT @ dn)
            dz0 = (1 - fh) * (fq.float() * (-delta / den).unsqueeze(-1)).sum(2)
        return (dq.to(q.dtype), kv_sum(dkx, n_kv).to(k.dtype), kv_sum(dv, n_kv).to(v.dtype), dfq.to(fq.dtype),
                kv_sum(dfk, n_kv).to(fk.dtype), dfw, ds0, dz0, None, None, None, None)  # fmt: skip


def window_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, *,
    window: int, window_factor: Tensor, scale: float, chunk_size: int = 64, eps: float = 1e-6,
    initial_state: WindowState | None = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, WindowState]:  # fmt: skip
    """LoLCATs hybrid, one fused Triton pass forward and backward; see `reference.window_attn_chunked`.

    Args:
        q: (B, H, T, Dk) raw (rotary-applied) queries; k: (B, H_kv, T, Dk) raw keys.
        v: (B, H_kv, T, D) values.
        fq: (B, H, T, F) feature-mapped queries; fk: (B, H_kv, T, F) feature-mapped keys.
        window: softmax keys per query, the current one included (>= 1).
        window_factor: (H,) f in (0, 1), the softmax share per head; differentiable.
        scale: softmax logit scale, usually Dk ** -0.5.
        chunk_size: time block (>= 1), rounded to a power of two in [16, 64]: a blocking choice
            only, the result is the same up to rounding.
        initial_state: state after the tokens preceding q (None: no history); its cache is laid
            before the sequence (with GQA, k, v and fk are then expanded to H heads), and
            every field is differentiable.
        output_final_state: also return the state after the last token (its S, z by one
            PyTorch matmul over the keys that left the window, so autograd covers it).
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `WindowState` (fp32) if output_final_state.
    """
    _check_window(q, k, v, fq, fk, window)
    _check_positive("chunk_size", chunk_size)
    h, dtype = q.shape[1], v.dtype
    fw = _mix_factor(window_factor, h, torch.float32).view(h)
    q, k, v, fq, fk = unify(q, k, v, fq, fk)
    s0 = z0 = None
    if initial_state is not None:
        empty = (x[:, :, :0].float() for x in (q, v, fq))  # shapes and the compute dtype only
        s0, z0, kw, vw, fkw = _window_state(initial_state, *empty, window)[:5]  # no sinks here
        k, v, fk = (torch.cat([c.to(x.dtype), expand_kv(x, h)], 2) for c, x in ((kw, k), (vw, v), (fkw, fk)))
    y = _WindowAttn.apply(q, k, v, fq, fk, fw, s0, z0, window, scale, eps, time_block(chunk_size)).to(dtype)
    if not output_final_state:
        return y
    n_old = max(k.shape[2] - (window - 1), 0)  # keys no later query sees through the window
    fko, vo = fk[:, :, :n_old].float(), v[:, :, :n_old].float()
    s_, z = expand_kv(fko.mT @ vo, h), expand_kv(fko.sum(2), h)
    if s0 is not None:
        s_, z = s0 + s_, z0 + z
    cache = (expand_kv(x[:, :, n_old:].float(), h) for x in (k, v, fk))
    return y, WindowState(s_, z, *cache)


@triton.jit
def _step(q, kx, vx, fq, fkx, fw, s, z, y, s_new, z_new, NW, H, scale, eps, DK: tl.constexpr, F: tl.constexpr,
          D: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
          LEAVES: tl.constexpr):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    rw, rk, rf, rd = tl.arange(0, BW), tl.arange(0, BK), tl.arange(0, BF), tl.arange(0, BD)
    f = tl.load(fw + bh % H)
    bq = tl.load(q + bh * DK + rk, mask=rk < DK, other=0.0).to(tl.float32)
    bfq = tl.load(fq + bh * F + rf, mask=rf < F, other=0.0).to(tl.float32)
    kt = tile(kx + bh * NW * DK, rw, NW, rk, DK, DK).to(tl.float32)  # (BW, BK): cache + this key
    vt = tile(vx + bh * NW * D, rw, NW, rd, D, D).to(tl.float32)
    sc = tl.where(rw < NW, tl.sum(kt * bq[None, :], 1) * scale, float("-inf"))
    p = tl.exp(sc - tl.max(sc, 0))
    st = tile(s + bh * F * D, rf, F, rd, D, D)  # (BF, BD)
    zt = tl.load(z + bh * F + rf, mask=rf < F, other=0.0)
    num = f * tl.sum(p[:, None] * vt, 0) + (1 - f) * tl.sum(bfq[:, None] * st, 0)
    d = f * tl.sum(p, 0) + (1 - f) * tl.sum(bfq * zt, 0) + eps
    tl.store(y + bh * D + rd, (num / d).to(y.dtype.element_ty), mask=rd < D)
    if LEAVES:  # the oldest cached key leaves the window into (S, z)
        fk0 = tl.load(fkx + bh * NW * F + rf, mask=rf < F, other=0.0).to(tl.float32)
        v0 = tl.load(vx + bh * NW * D + rd, mask=rd < D, other=0.0).to(tl.float32)
        st += fk0[:, None] * v0[None, :]
        zt += fk0
    put(s_new + bh * F * D, st, rf, F, rd, D, D)
    tl.store(z_new + bh * F + rf, zt, mask=rf < F)


def window_attn_step(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, state: WindowState | None = None, *,
    window: int, window_factor: Tensor, scale: float, eps: float = 1e-6,
) -> tuple[Tensor, WindowState]:  # fmt: skip
    """One decoding token: one Triton program per (batch, head) for the output and (S, z);
    the cache shift is a PyTorch concatenation. Forward only.

    Args:
        q: (B, H, 1, Dk); k: (B, H_kv, 1, Dk); v: (B, H_kv, 1, D);
        fq: (B, H, 1, F); fk: (B, H_kv, 1, F); the rest as `window_attn_chunked`.
        state: state before this token (None: empty cache, zero S and z).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the fp32 state after this token.
    """
    _check_window(q, k, v, fq, fk, window)
    _check_one_token(q)
    no_grad_step("window_attn_step", q, k, v, fq, fk, window_factor, *(state or ()))
    b, h, _, dk = q.shape
    f, d, dtype = fq.shape[-1], v.shape[-1], v.dtype
    fw = _mix_factor(window_factor, h, torch.float32).reshape(h).contiguous()
    s_, z, kw, vw, fkw = _window_state(state, q[:, :, :0].float(), v[:, :, :0].float(), fq[:, :, :0], window)[:5]
    kx, vx, fkx = (torch.cat([c, expand_kv(x.float(), h)], 2).contiguous() for c, x in ((kw, k), (vw, v), (fkw, fk)))
    n_w = kx.shape[2]
    leaves = n_w > window - 1
    s_, z, q, fq = contiguous(s_, z, q.float(), fq.float())
    y = torch.empty(b, h, 1, d, device=q.device, dtype=dtype)
    s_new, z_new = torch.empty_like(s_), torch.empty_like(z)
    _step[(b * h,)](q, kx, vx, fq, fkx, fw, s_, z, y, s_new, z_new, n_w, h, scale, eps, dk, f, d, pow2(n_w),
                    pow2(dk), pow2(f), pow2(d), leaves)  # fmt: skip
    n_out = int(leaves)
    return y, WindowState(s_new, z_new, kx[:, :, n_out:], vx[:, :, n_out:], fkx[:, :, n_out:])
