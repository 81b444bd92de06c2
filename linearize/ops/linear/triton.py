"""Chunked causal (normalized) linear attention in Triton: forward, backward, decoding step.

Same math, layout and GQA convention as `reference.linear_attn_chunked`. A program owns one
(batch, query head, block of value columns) and walks the sequence one time block at a time,
keeping the state S (F, BV) and normalizer z (F,) in fp32 registers:

    y_c = (q_c S + mask(q_c k_cᵀ) v_c) / (q_c z + rowsum(mask(q_c k_cᵀ)) + eps);  S += k_cᵀ v_c

Backward, two Triton passes (no state is stored between the passes; each recomputes its own):
``_bwd_dq`` walks forward in time again for dq; ``_bwd_dkv`` walks backward with the state's
gradient (dS, dz) for dk, dv and the initial state's gradient. With dN = dy / den and
dD = -(dy · y) / den (computed on the host), the normalized op is the plain one with a value
column of ones: dA = dN vᵀ + dD. Programs over value blocks return partial dq, dk that the
host sums; GQA gradients are summed over each head group on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.ops.common import _check_one_token, _check_positive, _check_qkv
from linearize.ops.linear.reference import LinearState, _linear_state
from linearize.ops.triton_common import (
    NUM_WARPS, contiguous, kv_sum, mm, no_grad_step, pow2, put, tile, time_block, unify, value_block,
)  # fmt: skip


@triton.jit
def _fwd(q, k, v, s0, z0, o, den, T, H, G, eps, F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
         BF: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr, HAS_S0: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G  # the kv head this query head reads
    q, o, den = q + bh * T * F, o + bh * T * D, den + bh * T
    k, v = k + bkv * T * F, v + bkv * T * D
    DT: tl.constexpr = q.dtype.element_ty
    rf, rv, rt = tl.arange(0, BF), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    s = tl.zeros([BF, BV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    if HAS_S0:
        s += tile(s0 + bh * F * D, rf, F, rv, D, D)
        z += tl.load(z0 + bh * F + rf, mask=rf < F, other=0.0)
    causal = rt[:, None] >= rt[None, :]
    for t0 in range(0, T, BT):
        rows = t0 + rt
        bq, bk = tile(q, rows, T, rf, F, F), tile(k, rows, T, rf, F, F)  # (BT, BF)
        bv = tile(v, rows, T, rv, D, D)  # (BT, BV)
        a = tl.where(causal, mm(bq, tl.trans(bk), DT), 0.0)  # (BT, BT)
        y = mm(bq, s, DT) + mm(a, bv, DT)
        if NORMALIZE:
            d = tl.sum(bq.to(tl.float32) * z[None, :], 1) + tl.sum(a, 1) + eps
            y = y / d[:, None]
            if iv == 0:
                tl.store(den + rows, d, mask=rows < T)
        put(o, y, rows, T, rv, D, D)
        s += mm(tl.trans(bk), bv, DT)
        z += tl.sum(bk.to(tl.float32), 0)


@triton.jit
def _bwd_dq(q, k, v, s0, z0, do, den, delta, dq, T, H, G, BHT, F: tl.constexpr, D: tl.constexpr,
            BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr,
            HAS_S0: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    q, do, den, delta = q + bh * T * F, do + bh * T * D, den + bh * T, delta + bh * T
    k, v = k + bkv * T * F, v + bkv * T * D
    dq = dq + (iv * BHT + bh * T) * F  # partial over this program's value columns
    DT: tl.constexpr = q.dtype.element_ty
    rf, rv, rt = tl.arange(0, BF), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    s = tl.zeros([BF, BV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    if HAS_S0:
        s += tile(s0 + bh * F * D, rf, F, rv, D, D)
        z += tl.load(z0 + bh * F + rf, mask=rf < F, other=0.0)
    causal = rt[:, None] >= rt[None, :]
    first = (iv == 0).to(tl.float32)  # the ones column (normalizer) is counted by one program
    for t0 in range(0, T, BT):
        rows = t0 + rt
        bk = tile(k, rows, T, rf, F, F)
        bv = tile(v, rows, T, rv, D, D)
        dn = tile(do, rows, T, rv, D, D).to(tl.float32)  # (BT, BV)
        da = mm(dn, tl.trans(bv), DT)  # (BT, BT)
        if NORMALIZE:
            rden = 1.0 / tl.load(den + rows, mask=rows < T, other=1.0)
            dd = -tl.load(delta + rows, mask=rows < T, other=0.0) * rden * first
            dn = dn * rden[:, None]
            da = da * rden[:, None] + dd[:, None]
        da = tl.where(causal, da, 0.0)
        g = mm(da, bk, DT) + mm(dn, tl.trans(s), DT)  # (BT, BF)
        if NORMALIZE:
            g += dd[:, None] * z[None, :]
        put(dq, g, rows, T, rf, F, F)
        s += mm(tl.trans(bk), bv, DT)
        z += tl.sum(bk.to(tl.float32), 0)


@triton.jit
def _bwd_dkv(q, k, v, do, den, delta, dk, dv, ds0, dz0, T, H, G, BHT, F: tl.constexpr, D: tl.constexpr,
             BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    q, do, den, delta = q + bh * T * F, do + bh * T * D, den + bh * T, delta + bh * T
    k, v = k + bkv * T * F, v + bkv * T * D
    dk, dv = dk + (iv * BHT + bh * T) * F, dv + bh * T * D  # dk: partial; dv: per query head
    DT: tl.constexpr = q.dtype.element_ty
    rf, rv, rt = tl.arange(0, BF), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    ds = tl.zeros([BF, BV], dtype=tl.float32)  # gradient of the state entering the block
    dz = tl.zeros([BF], dtype=tl.float32)
    causal = rt[:, None] >= rt[None, :]
    first = (iv == 0).to(tl.float32)
    for i in range(0, tl.cdiv(T, BT)):
        rows = (tl.cdiv(T, BT) - 1 - i) * BT + rt
        bq, bk = tile(q, rows, T, rf, F, F), tile(k, rows, T, rf, F, F)
        bv = tile(v, rows, T, rv, D, D)
        dn = tile(do, rows, T, rv, D, D).to(tl.float32)
        da = mm(dn, tl.trans(bv), DT)
        dd = tl.zeros([BT], dtype=tl.float32)
        if NORMALIZE:
            rden = 1.0 / tl.load(den + rows, mask=rows < T, other=1.0)
            dd = -tl.load(delta + rows, mask=rows < T, other=0.0) * rden * first
            dn = dn * rden[:, None]
            da = da * rden[:, None] + dd[:, None]
        da = tl.where(causal, da, 0.0)  # (BT query, BT key)
        a = tl.where(causal, mm(bq, tl.trans(bk), DT), 0.0)
        gk = mm(tl.trans(da), bq, DT) + mm(bv, tl.trans(ds), DT) + dz[None, :] * first
        gv = mm(tl.trans(a), dn, DT) + mm(bk, ds, DT)
        put(dk, gk, rows, T, rf, F, F)
        put(dv, gv, rows, T, rv, D, D)
        ds += mm(tl.trans(bq), dn, DT)
        dz += tl.sum(bq.to(tl.float32) * dd[:, None], 0)
    put(ds0 + bh * F * D, ds, rf, F, rv, D, D)
    if iv == 0:
        tl.store(dz0 + bh * F + rf, dz, mask=rf < F)


def _shapes(q: Tensor, k: Tensor, v: Tensor) -> dict:
    b, h, t, f = q.shape
    d = v.shape[-1]
    return dict(T=t, H=h, G=h // k.shape[1], F=f, D=d, BF=pow2(f), BV=value_block(d))


class _LinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s0, z0, normalize: bool, eps: float, bt: int):
        q, k, v = contiguous(q, k, v)
        n = _shapes(q, k, v)
        b, h, t = q.shape[:3]
        o = torch.empty(b, h, t, n["D"], device=q.device, dtype=v.dtype)
        den = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
        has_s0 = s0 is not None
        s0c, z0c = (s0.float().contiguous(), z0.float().contiguous()) if has_s0 else (den, den)
        grid = (triton.cdiv(n["D"], n["BV"]), b * h)
        _fwd[grid](q, k, v, s0c, z0c, o, den, n["T"], n["H"], n["G"], eps, n["F"], n["D"],
                   bt, n["BF"], n["BV"], normalize, has_s0, num_warps=NUM_WARPS)  # fmt: skip
        ctx.save_for_backward(q, k, v, s0c if has_s0 else None, z0c if has_s0 else None, o, den)
        ctx.args = (normalize, bt, n)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, s0, z0, o, den = ctx.saved_tensors
        normalize, bt, n = ctx.args
        b, h, t = q.shape[:3]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1) if normalize else den  # (B, H, T): dy · y
        nv = triton.cdiv(n["D"], n["BV"])
        dq = q.new_empty(nv, b, h, t, n["F"], dtype=torch.float32)
        dk = torch.empty_like(dq)
        dv = v.new_empty(b, h, t, n["D"], dtype=torch.float32)
        ds0 = q.new_empty(b, h, n["F"], n["D"], dtype=torch.float32)
        dz0 = q.new_empty(b, h, n["F"], dtype=torch.float32)
        common = (n["T"], n["H"], n["G"], b * h * t, n["F"], n["D"], bt, n["BF"], n["BV"], normalize)
        has_s0 = s0 is not None
        _bwd_dq[(nv, b * h)](q, k, v, s0 if has_s0 else den, z0 if has_s0 else den, do, den, delta, dq,
                             *common, has_s0, num_warps=NUM_WARPS)  # fmt: skip
        _bwd_dkv[(nv, b * h)](q, k, v, do, den, delta, dk, dv, ds0, dz0, *common, num_warps=NUM_WARPS)
        n_kv = k.shape[1]
        grads = (dq.sum(0).to(q.dtype), kv_sum(dk.sum(0), n_kv).to(k.dtype), kv_sum(dv, n_kv).to(v.dtype))
        if not has_s0:
            return (*grads, None, None, None, None, None)
        return (*grads, ds0, dz0 if normalize else None, None, None, None)


def linear_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int = 64, normalize: bool = True, eps: float = 1e-6,
    initial_state: LinearState | None = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:  # fmt: skip
    """Causal linear attention, Triton forward and backward; see `reference.linear_attn_chunked`.

    Args:
        q: (B, H, T, F) feature-mapped, non-negative queries.
        k: (B, H_kv, T, F) feature-mapped, non-negative keys.
        v: (B, H_kv, T, D) values; q, k, v share one dtype (fp32, bf16 or fp16).
        chunk_size: time block (>= 1), rounded to a power of two in [16, 64]: a blocking choice
            only, the result is the same up to rounding.
        normalize, eps: y = q S / (q z + eps) when normalize, else y = q S.
        initial_state: state after the tokens preceding q (None: no history); differentiable.
        output_final_state: also return the state after the last token (computed by one
            PyTorch matmul over the sequence, so autograd covers it).
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `LinearState` (fp32) if output_final_state.
    """
    _check_qkv(q, k, v)
    _check_positive("chunk_size", chunk_size)
    h, dtype = q.shape[1], v.dtype
    q, k, v = unify(q, k, v)
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = _linear_state(initial_state, q[:, :, :0].float(), v[:, :, :0].float())
    y = _LinearAttn.apply(q, k, v, s0, z0, normalize, eps, time_block(chunk_size)).to(dtype)
    if not output_final_state:
        return y
    kf = k.float()
    s_, z = _expand(kf.mT @ v.float(), h), _expand(kf.sum(2), h)  # (B, H, F, D), (B, H, F)
    if s0 is not None:
        s_, z = s0 + s_, z0 + z
    return y, LinearState(s_, z)


def _expand(x: Tensor, n_heads: int) -> Tensor:
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


@triton.jit
def _step(q, k, v, s, z, y, s_new, z_new, H, G, eps, F: tl.constexpr, D: tl.constexpr,
          BF: tl.constexpr, BD: tl.constexpr, NORMALIZE: tl.constexpr):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    rf, rd = tl.arange(0, BF), tl.arange(0, BD)
    mf, md = rf < F, rd < D
    bq = tl.load(q + bh * F + rf, mask=mf, other=0.0).to(tl.float32)
    bk = tl.load(k + bkv * F + rf, mask=mf, other=0.0).to(tl.float32)
    bv = tl.load(v + bkv * D + rd, mask=md, other=0.0).to(tl.float32)
    st = tile(s + bh * F * D, rf, F, rd, D, D) + bk[:, None] * bv[None, :]  # (BF, BD)
    zt = tl.load(z + bh * F + rf, mask=mf, other=0.0) + bk
    out = tl.sum(bq[:, None] * st, 0)
    if NORMALIZE:
        out = out / (tl.sum(bq * zt, 0) + eps)
    tl.store(y + bh * D + rd, out.to(y.dtype.element_ty), mask=md)
    put(s_new + bh * F * D, st, rf, F, rd, D, D)
    tl.store(z_new + bh * F + rf, zt, mask=mf)


def linear_attn_step(
    q: Tensor, k: Tensor, v: Tensor, state: LinearState | None = None, *, normalize: bool = True, eps: float = 1e-6
) -> tuple[Tensor, LinearState]:
    """One decoding token in one Triton program per (batch, head); forward only.

    Args:
        q: (B, H, 1, F); k: (B, H_kv, 1, F); v: (B, H_kv, 1, D).
        state: state before this token (None: zeros).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the fp32 state after this token.
    """
    _check_qkv(q, k, v)
    _check_one_token(q)
    no_grad_step("linear_attn_step", q, k, v, *(state or ()))
    dtype = v.dtype
    q, k, v = unify(q, k, v)
    b, h, _, f = q.shape
    d = v.shape[-1]
    s_, z = contiguous(*_linear_state(state, q[:, :, :0].float(), v[:, :, :0].float()))
    q, k, v = contiguous(q, k, v)
    y = torch.empty(b, h, 1, d, device=q.device, dtype=dtype)
    s_new, z_new = torch.empty_like(s_), torch.empty_like(z)
    _step[(b * h,)](q, k, v, s_, z, y, s_new, z_new, h, h // k.shape[1], eps, f, d, pow2(f), pow2(d), normalize)
    return y, LinearState(s_new, z_new)
