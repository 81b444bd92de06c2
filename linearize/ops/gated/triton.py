"""Gated linear attention (GLA form) in Triton: forward, backward, decoding step.

Same math, layout and GQA convention as `reference.gated_attn_chunked`:
S_t = diag(exp g_t) S_{t-1} + k_tᵀ v_t, y_t = scale q_t S_t, g per key feature (F) or per head.

A program owns one (batch, query head, block of value columns) and walks the sequence in time
blocks of 16 rows with the state S (F, BV) in fp32 registers. With b the gate cumulated from
the block start (b_i <= b_j when i >= j, since g <= 0; computed on the host, one cumsum):

    y_c = scale [(q_c ∘ e^b) S + Σ_j A_:j v_j],  A_ij = Σ_f q_if k_jf e^(b_if - b_jf) (j <= i)
    S  <- e^(b_last) ∘ S + (k_c ∘ e^(b_last - b))ᵀ v_c

Every exponent is a sum of gates over a span, so <= 0: nothing overflows however strong the
decay. The intra-block term is a loop over the block's 16 keys (exact per-feature decay needs
the pair (i, j) in the exponent, which one matmul cannot carry without e^(-b) factors that
overflow); the state terms are tensor-core dots.

Backward: ``_bwd_dq`` walks forward again (rebuilding S) for dq, looping over keys;
``_bwd_dkv`` walks backward with the state gradient dS for dk, dv and the initial state's
gradient, looping over queries. The gate gradient is then exact and cheap on the host
(PyTorch, O(T F)): with G the cumulated gate, y depends on g only through G, and
dG_t = q_t ∘ dq_t - k_t ∘ dk_t, so dg_t = Σ_{s>=t} dG_s (a reverse cumsum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.ops.common import _check_one_token, _check_positive, _check_qkv
from linearize.ops.gated.reference import GatedState, _gated_state
from linearize.ops.triton_common import (
    NUM_WARPS, contiguous, kv_sum, mm, no_grad_step, pow2, put, tile, unify, value_block,
)  # fmt: skip

BLOCK_T = 16  # time rows per block: the per-key intra-block loop is cheapest at small blocks


def _local_cumsum(g: Tensor) -> Tensor:
    """Gates cumulated from each time block's start, fp32 (B, H_kv, T_pad, F|1), T_pad a
    multiple of BLOCK_T; padded rows repeat the block's last sum (their gate is 0)."""
    gf = g.float() if g.dim() == 4 else g.float().unsqueeze(-1)
    b, h, t, w = gf.shape
    tp = triton.cdiv(t, BLOCK_T) * BLOCK_T
    gf = torch.nn.functional.pad(gf, (0, 0, 0, tp - t))
    return gf.view(b, h, tp // BLOCK_T, BLOCK_T, w).cumsum(3).view(b, h, tp, w).contiguous()


@triton.jit
def _fwd(q, k, v, cb, s0, o, T, H, G, scale, F: tl.constexpr, D: tl.constexpr, GW: tl.constexpr,
         BT: tl.constexpr, BF: tl.constexpr, BG: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    TP = tl.cdiv(T, BT) * BT
    q, o = q + bh * T * F, o + bh * T * D
    k, v, cb = k + bkv * T * F, v + bkv * T * D, cb + bkv * TP * GW
    DT: tl.constexpr = q.dtype.element_ty
    rf, rg, rv, rt = tl.arange(0, BF), tl.arange(0, BG), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    s = tl.zeros([BF, BV], dtype=tl.float32)
    if HAS_S0:
        s += tile(s0 + bh * F * D, rf, F, rv, D, D)
    for t0 in range(0, T, BT):
        rows = t0 + rt
        bq, bk = tile(q, rows, T, rf, F, F).to(tl.float32), tile(k, rows, T, rf, F, F).to(tl.float32)
        bv = tile(v, rows, T, rv, D, D)  # (BT, BV)
        b = tile(cb, rows, TP, rg, GW, GW)  # (BT, F|1) cumulated log decay
        y = mm(bq * tl.exp(b), s, DT)  # (BT, BV)
        for j in range(0, BT):  # key t0 + j against every query row
            t = t0 + j
            kj = tl.load(k + t * F + rf, mask=(rf < F) & (t * F + rf < T * F), other=0.0).to(tl.float32)
            vj = tl.load(v + t * D + rv, mask=(rv < D) & (t * D + rv < T * D), other=0.0).to(tl.float32)
            bj = tl.load(cb + t * GW + rg, mask=rg < GW, other=0.0)
            w = tl.exp(tl.where(rt[:, None] >= j, b - bj[None, :], float("-inf")))  # (BT, F|1), <= 1
            a = tl.sum(bq * kj[None, :] * w, 1)  # A[:, j]
            y += a[:, None] * vj[None, :]
        put(o, y * scale, rows, T, rv, D, D)
        last = tl.load(cb + (t0 + BT - 1) * GW + rg, mask=rg < GW, other=0.0)  # (F|1,)
        s = tl.exp(last)[:, None] * s + mm(tl.trans(bk * tl.exp(last[None, :] - b)), bv, DT)


@triton.jit
def _bwd_dq(k, v, cb, s0, do, dq, T, H, G, BHT, scale, F: tl.constexpr, D: tl.constexpr,
            GW: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BG: tl.constexpr, BV: tl.constexpr,
            HAS_S0: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    TP = tl.cdiv(T, BT) * BT
    do = do + bh * T * D
    k, v, cb = k + bkv * T * F, v + bkv * T * D, cb + bkv * TP * GW
    dq = dq + (iv * BHT + bh * T) * F  # partial over this program's value columns
    DT: tl.constexpr = k.dtype.element_ty
    rf, rg, rv, rt = tl.arange(0, BF), tl.arange(0, BG), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    s = tl.zeros([BF, BV], dtype=tl.float32)
    if HAS_S0:
        s += tile(s0 + bh * F * D, rf, F, rv, D, D)
    for t0 in range(0, T, BT):
        rows = t0 + rt
        bk = tile(k, rows, T, rf, F, F).to(tl.float32)
        bv = tile(v, rows, T, rv, D, D)
        dy = tile(do, rows, T, rv, D, D).to(tl.float32) * scale  # (BT, BV)
        b = tile(cb, rows, TP, rg, GW, GW)
        gq = mm(dy, tl.trans(s), DT) * tl.exp(b)  # (BT, BF)
        for j in range(0, BT):
            t = t0 + j
            kj = tl.load(k + t * F + rf, mask=(rf < F) & (t * F + rf < T * F), other=0.0).to(tl.float32)
            vj = tl.load(v + t * D + rv, mask=(rv < D) & (t * D + rv < T * D), other=0.0).to(tl.float32)
            bj = tl.load(cb + t * GW + rg, mask=rg < GW, other=0.0)
            w = tl.exp(tl.where(rt[:, None] >= j, b - bj[None, :], float("-inf")))
            gq += tl.sum(dy * vj[None, :], 1)[:, None] * kj[None, :] * w  # dA[:, j] k_j decayed
        put(dq, gq, rows, T, rf, F, F)
        last = tl.load(cb + (t0 + BT - 1) * GW + rg, mask=rg < GW, other=0.0)
        s = tl.exp(last)[:, None] * s + mm(tl.trans(bk * tl.exp(last[None, :] - b)), bv, DT)


@triton.jit
def _bwd_dkv(q, k, v, cb, do, dk, dv, ds0, T, H, G, BHT, scale, F: tl.constexpr, D: tl.constexpr, GW: tl.constexpr,
             BT: tl.constexpr, BF: tl.constexpr, BG: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    TP = tl.cdiv(T, BT) * BT
    q, do = q + bh * T * F, do + bh * T * D
    k, v, cb = k + bkv * T * F, v + bkv * T * D, cb + bkv * TP * GW
    dk, dv = dk + (iv * BHT + bh * T) * F, dv + bh * T * D  # dk: partial; dv: per query head
    DT: tl.constexpr = q.dtype.element_ty
    rf, rg, rv, rt = tl.arange(0, BF), tl.arange(0, BG), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    ds = tl.zeros([BF, BV], dtype=tl.float32)  # gradient of the state at the block's end
    for n in range(0, TP // BT):
        t0 = TP - BT - n * BT
        rows = t0 + rt
        bq, bk = tile(q, rows, T, rf, F, F).to(tl.float32), tile(k, rows, T, rf, F, F).to(tl.float32)
        bv = tile(v, rows, T, rv, D, D)
        dy = tile(do, rows, T, rv, D, D).to(tl.float32) * scale
        b = tile(cb, rows, TP, rg, GW, GW)
        last = tl.load(cb + (t0 + BT - 1) * GW + rg, mask=rg < GW, other=0.0)
        tail = tl.exp(last[None, :] - b)  # decay from each row to the block's end
        gk = mm(bv, tl.trans(ds), DT) * tail  # (BT, BF)
        gv = mm(bk * tail, ds, DT)  # (BT, BV)
        vf = bv.to(tl.float32)
        for i in range(0, BT):  # query t0 + i against every key row
            t = t0 + i
            qi = tl.load(q + t * F + rf, mask=(rf < F) & (t * F + rf < T * F), other=0.0).to(tl.float32)
            dyi = tl.load(do + t * D + rv, mask=(rv < D) & (t * D + rv < T * D), other=0.0).to(tl.float32) * scale
            bi = tl.load(cb + t * GW + rg, mask=rg < GW, other=0.0)
            w = tl.exp(tl.where(rt[:, None] <= i, bi[None, :] - b, float("-inf")))  # keys j <= i
            gk += tl.sum(vf * dyi[None, :], 1)[:, None] * qi[None, :] * w  # dA[i, :] q_i decayed
            gv += tl.sum(bk * qi[None, :] * w, 1)[:, None] * dyi[None, :]  # A[i, :] dy_i
        put(dk, gk, rows, T, rf, F, F)
        put(dv, gv, rows, T, rv, D, D)
        ds = tl.exp(last)[:, None] * ds + mm(tl.trans(bq * tl.exp(b)), dy, DT)
    put(ds0 + bh * F * D, ds, rf, F, rv, D, D)


class _GatedAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale: float):
        q, k, v = contiguous(q, k, v)
        b, h, t, f = q.shape
        d = v.shape[-1]
        per_head = g.dim() == 3
        cb = _local_cumsum(g)
        n = dict(T=t, H=h, G=h // k.shape[1], F=f, D=d, BV=value_block(d), per_head=per_head)
        # gate width GW and the tile sizes BT, BF, BG (the gate tile: 1 column per head)
        n["widths"] = (1 if per_head else f, BLOCK_T, pow2(f), 1 if per_head else pow2(f))
        o = torch.empty(b, h, t, d, device=q.device, dtype=v.dtype)
        has_s0 = s0 is not None
        s0c = s0.float().contiguous() if has_s0 else o
        grid = (triton.cdiv(d, n["BV"]), b * h)
        _fwd[grid](q, k, v, cb, s0c, o, t, h, n["G"], scale, f, d, *n["widths"], n["BV"], has_s0, num_warps=NUM_WARPS)
        ctx.save_for_backward(q, k, v, cb, s0c if has_s0 else None)
        ctx.args = (scale, n, g.dtype)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, cb, s0 = ctx.saved_tensors
        scale, n, g_dtype = ctx.args
        b, h, t, f = q.shape
        do = do.contiguous()
        nv = triton.cdiv(n["D"], n["BV"])
        dq = q.new_empty(nv, b, h, t, f, dtype=torch.float32)
        dk = torch.empty_like(dq)
        dv = v.new_empty(b, h, t, n["D"], dtype=torch.float32)
        ds0 = q.new_empty(b, h, f, n["D"], dtype=torch.float32)
        common = (t, h, n["G"], b * h * t, scale, f, n["D"], *n["widths"], n["BV"])
        has_s0 = s0 is not None
        _bwd_dq[(nv, b * h)](k, v, cb, s0 if has_s0 else dv, do, dq, *common, has_s0, num_warps=NUM_WARPS)
        _bwd_dkv[(nv, b * h)](q, k, v, cb, do, dk, dv, ds0, *common, num_warps=NUM_WARPS)
        n_kv = k.shape[1]
        dq, dk = dq.sum(0), kv_sum(dk.sum(0), n_kv)  # (B, H, T, F), (B, H_kv, T, F)
        dgate = kv_sum(q.float() * dq, n_kv) - k.float() * dk  # dL/dG, G the cumulated gate
        dg = dgate.flip(2).cumsum(2).flip(2)
        if n["per_head"]:
            dg = dg.sum(-1)
        grads = (dq.to(q.dtype), dk.to(k.dtype), kv_sum(dv, n_kv).to(v.dtype), dg.to(g_dtype))
        return (*grads, ds0 if has_s0 else None, None)


def gated_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float = 1.0, chunk_size: int = 64,
    initial_state: GatedState | None = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, GatedState]:  # fmt: skip
    """Gated linear attention, Triton forward and backward; see `reference.gated_attn_chunked`.

    Args:
        q: (B, H, T, F); k: (B, H_kv, T, F); v: (B, H_kv, T, D); one dtype (fp32, bf16, fp16).
        g: (B, H_kv, T, F) per-feature or (B, H_kv, T) per-head log decay (<= 0), any float
            dtype (read in fp32).
        scale: output scale.
        chunk_size: checked (>= 1) for parity with the reference; the kernel's time block is 16
            whatever it is (see the module docstring), and the result is the same up to rounding.
        initial_state: state after the tokens preceding q (None: zeros); differentiable.
        output_final_state: also return the state after the last token (PyTorch, one matmul
            with decays from a reverse cumsum, so autograd covers it).
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `GatedState` (fp32) if output_final_state.
    """
    _check_qkv(q, k, v)
    _check_positive("chunk_size", chunk_size)
    _gate_shape(g, k)
    h, dtype = q.shape[1], v.dtype
    q, k, v = unify(q, k, v)
    s0 = None if initial_state is None else _gated_state(initial_state, q[:, :, :0].float(), v[:, :, :0].float())
    y = _GatedAttn.apply(q, k, v, g, s0, scale).to(dtype)
    if not output_final_state:
        return y
    gf = g.float() if g.dim() == 4 else g.float().unsqueeze(-1)  # (B, H_kv, T, F|1)
    after = gf.flip(2).cumsum(2).flip(2)  # sum of g over s >= t
    to_end = torch.cat([after[:, :, 1:], torch.zeros_like(after[:, :, :1])], 2)  # over s > t: <= 0
    s_ = (k.float() * to_end.exp()).mT @ v.float()  # (B, H_kv, F, D)
    s_ = s_ if s_.shape[1] == h else s_.repeat_interleave(h // s_.shape[1], dim=1)
    if s0 is not None:
        total = after[:, :, 0]  # (B, H_kv, F|1)
        total = total if total.shape[1] == h else total.repeat_interleave(h // total.shape[1], dim=1)
        s_ = s_ + total.unsqueeze(-1).exp() * s0
    return y, GatedState(s_)


def _gate_shape(g: Tensor, k: Tensor) -> None:
    per_feature, per_head = tuple(k.shape), tuple(k.shape[:3])
    if tuple(g.shape) not in (per_feature, per_head):
        raise ValueError(
            f"g has shape {tuple(g.shape)}, expected {per_feature} (per key feature) or {per_head} (per head)"
        )


@triton.jit
def _step(q, k, v, g, s, y, s_new, H, G, scale, F: tl.constexpr, D: tl.constexpr,
          BF: tl.constexpr, BD: tl.constexpr, PER_HEAD: tl.constexpr):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    rf, rd = tl.arange(0, BF), tl.arange(0, BD)
    mf, md = rf < F, rd < D
    bq = tl.load(q + bh * F + rf, mask=mf, other=0.0).to(tl.float32)
    bk = tl.load(k + bkv * F + rf, mask=mf, other=0.0).to(tl.float32)
    bv = tl.load(v + bkv * D + rd, mask=md, other=0.0).to(tl.float32)
    if PER_HEAD:
        decay = tl.exp(tl.load(g + bkv).to(tl.float32) + tl.zeros([BF], dtype=tl.float32))
    else:
        decay = tl.exp(tl.load(g + bkv * F + rf, mask=mf, other=0.0).to(tl.float32))
    st = decay[:, None] * tile(s + bh * F * D, rf, F, rd, D, D) + bk[:, None] * bv[None, :]
    tl.store(y + bh * D + rd, (scale * tl.sum(bq[:, None] * st, 0)).to(y.dtype.element_ty), mask=md)
    put(s_new + bh * F * D, st, rf, F, rd, D, D)


def gated_attn_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: GatedState | None = None, *, scale: float = 1.0
) -> tuple[Tensor, GatedState]:
    """One decoding token in one Triton program per (batch, head); forward only.

    Args:
        q: (B, H, 1, F); k: (B, H_kv, 1, F); v: (B, H_kv, 1, D); g: (B, H_kv, 1, F) or (B, H_kv, 1).
        state: state before this token (None: zeros).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the fp32 state after this token.
    """
    _check_qkv(q, k, v)
    _check_one_token(q)
    _gate_shape(g, k)
    no_grad_step("gated_attn_step", q, k, v, g, *(state or ()))
    dtype = v.dtype
    q, k, v = unify(q, k, v)
    b, h, _, f = q.shape
    d = v.shape[-1]
    s_ = _gated_state(state, q[:, :, :0].float(), v[:, :, :0].float()).contiguous()
    q, k, v, g = contiguous(q, k, v, g)
    y = torch.empty(b, h, 1, d, device=q.device, dtype=dtype)
    s_new = torch.empty_like(s_)
    _step[(b * h,)](q, k, v, g, s_, y, s_new, h, h // k.shape[1], scale, f, d, pow2(f), pow2(d), g.dim() == 3)
    return y, GatedState(s_new)
