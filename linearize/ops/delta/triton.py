"""The delta rule (DeltaNet, Gated DeltaNet) in Triton: forward, backward, decoding step.

Same math, layout and GQA convention as `reference.delta_attn_recurrent`:
S_t = α_t (I - β_t k_tᵀ k_t) S_{t-1} + β_t k_tᵀ v_t, y_t = scale q_t S_t.

A fused recurrent form: a program owns one (batch, query head, block of value columns) and walks
the tokens one at a time with the state S (F, BV) in fp32 registers. Columns of S evolve apart
(the rule mixes S's rows only), so the value columns split over programs exactly. Per token:

    S' = α S,   w = k S',   u = β (v - w),   S = S' + kᵀ u,   y = scale q S

No tensor cores: the work is O(T F D) per head in vector units, and the sequential walk is the
cost at long T (the chunked UT form of `reference.delta_attn_chunked` in Triton is future work).

Backward: the forward saves S every ``BLOCK_T`` tokens. ``_bwd`` walks the blocks from the last;
per block it rebuilds the block's states from its checkpoint into a per-program scratch buffer,
then walks the block's tokens backward with the state gradient dS (F, BV):

    dS += scale qᵀ dy;  dq = scale dy Sᵀ;  du = k dS;  dk = dS uᵀ + S' dwᵀ with dw = -β du;
    dv = β du;  dβ = du · (v - w);  dS' = dS + kᵀ dw;  dg = Σ dS' ∘ S';  dS = α dS'

The final state is an output of the same autograd function, so its gradient seeds dS.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from linearize.ops.common import _check_one_token, _check_positive, _check_qkv
from linearize.ops.delta.reference import DeltaState, _delta_state, _per_token
from linearize.ops.triton_common import NUM_WARPS, contiguous, kv_sum, no_grad_step, pow2, put, tile, unify, value_block

BLOCK_T = 64  # tokens between the forward's saved states (the backward rebuilds the rest)


@triton.jit
def _live(r, n, t, T):
    """The mask of a row of token t: columns r < n, and t < T."""
    return (r < n) & (r * 0 + t < T)


@triton.jit
def _token(q, k, v, beta, g, s, t, T, rf, F, rv, D, HAS_G: tl.constexpr):
    """Token t's inputs (zeros past T: such a token leaves S as it is) and S after it."""
    mf, mv = _live(rf, F, t, T), _live(rv, D, t, T)
    qt = tl.load(q + t * F + rf, mask=mf, other=0.0).to(tl.float32)
    kt = tl.load(k + t * F + rf, mask=mf, other=0.0).to(tl.float32)
    vt = tl.load(v + t * D + rv, mask=mv, other=0.0).to(tl.float32)
    bt = tl.load(beta + t)  # β and g are padded to whole blocks with zeros
    at = 1.0
    if HAS_G:
        at = tl.exp(tl.load(g + t))
    sp = at * s  # S' = α S
    w = tl.sum(kt[:, None] * sp, 0)  # k S' (BV,)
    return qt, kt, vt, bt, at, sp, w, sp + kt[:, None] * (bt * (vt - w))[None, :]


@triton.jit
def _fwd(q, k, v, beta, g, s0, o, s_end, ckpt, T, H, G, NB, scale, F: tl.constexpr, D: tl.constexpr,
         BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_S0: tl.constexpr,
         SAVE: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    q, o = q + bh * T * F, o + bh * T * D
    k, v, beta, g = k + bkv * T * F, v + bkv * T * D, beta + bkv * NB * BT, g + bkv * NB * BT
    rf, rv = tl.arange(0, BF), iv * BV + tl.arange(0, BV)
    s = tl.zeros([BF, BV], dtype=tl.float32)
    if HAS_S0:
        s += tile(s0 + bh * F * D, rf, F, rv, D, D)
    for n in range(0, NB):
        if SAVE:  # the state before block n
            put(ckpt + (bh * NB + n) * F * D, s, rf, F, rv, D, D)
        for j in range(0, BT):
            t = n * BT + j
            qt, kt, vt, bt, at, sp, w, s = _token(q, k, v, beta, g, s, t, T, rf, F, rv, D, HAS_G)
            tl.store(o + t * D + rv, (scale * tl.sum(qt[:, None] * s, 0)).to(o.dtype.element_ty), mask=_live(rv, D, t, T))
    put(s_end + bh * F * D, s, rf, F, rv, D, D)


@triton.jit
def _bwd(q, k, v, beta, g, ckpt, do, ds_end, dq, dk, dv, dbeta, dg, ds0, scratch, T, H, G, NB, BH, scale,
         F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
         HAS_G: tl.constexpr):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    q, do = q + bh * T * F, do + bh * T * D
    k, v, beta, g = k + bkv * T * F, v + bkv * T * D, beta + bkv * NB * BT, g + bkv * NB * BT
    part = iv * BH * T + bh * T  # this program's rows in the partials over value blocks
    dq, dk, dv = dq + part * F, dk + part * F, dv + bh * T * D
    dbeta, dg = dbeta + (iv * BH + bh) * NB * BT, dg + (iv * BH + bh) * NB * BT  # padded rows, as β's
    rf, rv, rc = tl.arange(0, BF), iv * BV + tl.arange(0, BV), tl.arange(0, BV)
    slots = scratch + (iv * BH + bh) * (BT + 1) * BF * BV  # slot j: the state before the block's token j
    here = rf[:, None] * BV + rc[None, :]
    ds = tile(ds_end + bh * F * D, rf, F, rv, D, D)  # the final state's gradient
    for m in range(0, NB):
        n = NB - 1 - m
        s = tile(ckpt + (bh * NB + n) * F * D, rf, F, rv, D, D)
        tl.debug_barrier()  # the previous block's reads of the slots are done
        tl.store(slots + here, s)
        for j in range(0, BT):
            qt, kt, vt, bt, at, sp, w, s = _token(q, k, v, beta, g, s, n * BT + j, T, rf, F, rv, D, HAS_G)
            tl.store(slots + (j + 1) * BF * BV + here, s)
        tl.debug_barrier()
        for i in range(0, BT):
            j = BT - 1 - i
            t = n * BT + j
            s_prev = tl.load(slots + j * BF * BV + here)
            qt, kt, vt, bt, at, sp, w, s = _token(q, k, v, beta, g, s_prev, t, T, rf, F, rv, D, HAS_G)
            dy = scale * tl.load(do + t * D + rv, mask=_live(rv, D, t, T), other=0.0).to(tl.float32)
            ds += qt[:, None] * dy[None, :]
            du = tl.sum(kt[:, None] * ds, 0)  # (BV,)
            dw = -bt * du
            gk = tl.sum(ds * (bt * (vt - w))[None, :], 1) + tl.sum(sp * dw[None, :], 1)
            tl.store(dq + t * F + rf, tl.sum(s * dy[None, :], 1), mask=_live(rf, F, t, T))
            tl.store(dk + t * F + rf, gk, mask=_live(rf, F, t, T))
            tl.store(dv + t * D + rv, bt * du, mask=_live(rv, D, t, T))
            tl.store(dbeta + t, tl.sum(du * (vt - w), 0))
            ds += kt[:, None] * dw[None, :]  # now dS'
            if HAS_G:
                tl.store(dg + t, tl.sum(tl.sum(ds * sp, 1), 0))
            ds = at * ds
    put(ds0 + bh * F * D, ds, rf, F, rv, D, D)


def _launch_fwd(q, k, v, beta, g, s0, save: bool, scale: float):
    """Run `_fwd`: y, the final state (fp32), the checkpoints (or None) and the launch sizes."""
    b, h, t, f = q.shape
    d = v.shape[-1]
    bt = min(BLOCK_T, triton.next_power_of_2(t))
    nb = triton.cdiv(t, bt)
    bv = value_block(d)
    o = torch.empty(b, h, t, d, device=q.device, dtype=v.dtype)
    s_end = q.new_empty(b, h, f, d, dtype=torch.float32)
    ckpt = q.new_empty(b, h, nb, f, d, dtype=torch.float32) if save else s_end
    beta, g = (None if x is None else _pad(x, nb * bt) for x in (beta, g))
    grid = (triton.cdiv(d, bv), b * h)
    has_g, has_s0 = g is not None, s0 is not None
    _fwd[grid](q, k, v, beta, g if has_g else beta, s0 if has_s0 else s_end, o, s_end, ckpt, t, h, h // k.shape[1], nb,
               scale, f, d, bt, pow2(f), bv, has_g, has_s0, save, num_warps=NUM_WARPS)  # fmt: skip
    return o, s_end, (ckpt if save else None), (bt, nb, bv)


def _pad(x: Tensor, n: int) -> Tensor:
    """(B, H_kv, T) fp32 zero-padded to n tokens: a padded token writes nothing and keeps S."""
    return torch.nn.functional.pad(x, (0, n - x.shape[-1])).contiguous()


class _DeltaAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, scale: float):
        o, s_end, ckpt, sizes = _launch_fwd(q, k, v, beta, g, s0, True, scale)
        ctx.save_for_backward(q, k, v, beta, g, ckpt)
        ctx.args = (scale, sizes, s0 is not None)
        return o, s_end

    @staticmethod
    def backward(ctx, do, ds_end):
        q, k, v, beta, g, ckpt = ctx.saved_tensors
        scale, (bt, nb, bv), has_s0 = ctx.args
        b, h, t, f = q.shape
        d, n_kv = v.shape[-1], k.shape[1]
        nv = triton.cdiv(d, bv)
        do = do.contiguous()  # both gradients are materialised (zeros for an unused output)
        dq = q.new_empty(nv, b, h, t, f, dtype=torch.float32)
        dk = torch.empty_like(dq)
        dbeta = q.new_empty(nv, b, h, nb * bt, dtype=torch.float32)
        dg = torch.empty_like(dbeta)
        dv = q.new_empty(b, h, t, d, dtype=torch.float32)
        ds0 = q.new_empty(b, h, f, d, dtype=torch.float32)
        scratch = q.new_empty(nv * b * h, bt + 1, pow2(f), bv, dtype=torch.float32)
        has_g = g is not None
        beta_p, g_p = (None if x is None else _pad(x, nb * bt) for x in (beta, g))
        _bwd[(nv, b * h)](
            q, k, v, beta_p, g_p if has_g else beta_p, ckpt, do, ds_end.contiguous(), dq, dk, dv,
            dbeta, dg, ds0, scratch, t, h, h // n_kv, nb, b * h, scale, f, d, bt, pow2(f), bv, has_g,
            num_warps=NUM_WARPS,
        )  # fmt: skip
        dq, dk = dq.sum(0), kv_sum(dk.sum(0), n_kv)
        dbeta = kv_sum(dbeta.sum(0)[..., :t], n_kv).to(beta.dtype)
        dg = kv_sum(dg.sum(0)[..., :t], n_kv).to(g.dtype) if has_g else None
        grads = (dq.to(q.dtype), dk.to(k.dtype), kv_sum(dv, n_kv).to(v.dtype), dbeta, dg)
        return (*grads, ds0 if has_s0 else None, None)


def _inputs(q, k, v, beta, g):
    """Checked inputs: q, k, v in one dtype; beta and g fp32 (g may be None); all contiguous."""
    _check_qkv(q, k, v)
    _per_token("beta", beta, k)
    _per_token("g", g, k)
    q, k, v = contiguous(*unify(q, k, v))
    beta = beta.float().contiguous()
    return q, k, v, beta, (None if g is None else g.float().contiguous())


def delta_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor] = None, *, scale: float = 1.0,
    chunk_size: int = 64, initial_state: Optional[DeltaState] = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, DeltaState]:  # fmt: skip
    """The delta rule, Triton forward and backward; see `reference.delta_attn_chunked`.

    Args:
        q: (B, H, T, F); k: (B, H_kv, T, F) L2-normalised; v: (B, H_kv, T, D); one dtype (fp32,
            bf16, fp16). beta, g: (B, H_kv, T), any float dtype (read in fp32); g None: DeltaNet.
        scale: output scale.
        chunk_size: checked (>= 1) for parity with the reference; the kernel walks token by token
            (see the module docstring), and the result is the same up to rounding.
        initial_state: state after the tokens preceding q (None: zeros); differentiable.
        output_final_state: also return the (differentiable) state after the last token.
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `DeltaState` (fp32) if output_final_state.
    """
    _check_positive("chunk_size", chunk_size)
    dtype = v.dtype
    q, k, v, beta, g = _inputs(q, k, v, beta, g)
    s0 = None if initial_state is None else _delta_state(initial_state, q[:, :, :0].float(), v[:, :, :0].float()).contiguous()
    y, s_end = _DeltaAttn.apply(q, k, v, beta, g, s0, scale)
    y = y.to(dtype)
    return (y, DeltaState(s_end)) if output_final_state else y


def delta_attn_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor] = None,
    state: Optional[DeltaState] = None, *, scale: float = 1.0,
) -> tuple[Tensor, DeltaState]:  # fmt: skip
    """One decoding token (the forward kernel over T = 1); forward only.

    Args:
        q: (B, H, 1, F); k: (B, H_kv, 1, F); v: (B, H_kv, 1, D); beta, g: (B, H_kv, 1) (g may be None).
        state: state before this token (None: zeros).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the fp32 state after this token.
    """
    _check_one_token(q)
    no_grad_step("delta_attn_step", q, k, v, beta, g, *(state or ()))
    dtype = v.dtype
    q, k, v, beta, g = _inputs(q, k, v, beta, g)
    s0 = None if state is None else _delta_state(state, q[:, :, :0].float(), v[:, :, :0].float()).contiguous()
    y, s_end, _, _ = _launch_fwd(q, k, v, beta, g, s0, False, scale)
    return y.to(dtype), DeltaState(s_end)
