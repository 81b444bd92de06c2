"""The LoLCATs window hybrid (softmax over the last ``window`` keys and the first ``sinks``,
linear attention over the others): the PyTorch reference (quadratic, chunked, step, weights) that
the Triton kernel beside it (`triton.py`) is held to.

Layout, GQA, precision and what the three forms promise: see `linearize.ops.common`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.ops.common import (
    _block_rows,
    _check_one_token,
    _check_positive,
    _check_qkv,
    _check_shape,
    _distance,
    _query_heads_back,
    _query_rows,
    _up,
    expand_kv,
)

__all__ = ["WindowState", "window_attn_chunked", "window_attn_quadratic", "window_attn_step", "window_attn_weights"]


class WindowState(NamedTuple):
    """State of the window hybrid after t tokens (compute dtype): exactly what query t needs.

    The cache holds the keys inside query t's window other than its own, positions
    t - window + 1 .. t - 1 (W' <= window - 1 of them; none when window == 1). A key leaving the
    cache goes to the sinks while fewer than ``sinks`` have left (so the sinks are the first keys
    of the sequence), else into S and z.

    Attributes:
        S: (B, H, F, D) sum of fk_j^T v_j over the non-sink keys that left the window.
        z: (B, H, F) sum of fk_j over them.
        k: (B, H, W', Dk) raw (rotary-applied) keys in the window cache, oldest first.
        v: (B, H, W', D) their values.
        fk: (B, H, W', F) their feature-mapped keys, needed when they leave the window.
        sk: (B, H, N, Dk) the sink keys that left the window (N <= sinks), under softmax for
            every later query; None with no sinks.
        sv: (B, H, N, D) their values.
    """

    S: Tensor
    z: Tensor
    k: Tensor
    v: Tensor
    fk: Tensor
    sk: Tensor | None = None
    sv: Tensor | None = None


def _check_sinks(sinks: int) -> None:
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an integer >= 0, got {sinks!r}")


def _check_window(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int) -> None:
    _check_qkv(q, k, v)
    _check_qkv(fq, fk, v, names=("fq", "fk", "v"))
    _check_positive("window", window)
    if fq.shape[1] != q.shape[1] or fk.shape[1] != k.shape[1]:
        raise ValueError(
            f"fq/fk heads ({fq.shape[1]}/{fk.shape[1]}) differ from q/k heads ({q.shape[1]}/{k.shape[1]})"
        )


def _mix_factor(window_factor: Tensor, n_heads: int, dtype: torch.dtype) -> Tensor:
    if not isinstance(window_factor, Tensor) or tuple(window_factor.shape) != (n_heads,):
        got = tuple(window_factor.shape) if isinstance(window_factor, Tensor) else window_factor
        raise ValueError(f"window_factor must be a tensor of shape ({n_heads},), got {got!r}")
    return window_factor.to(dtype).view(1, n_heads, 1, 1)


def _window_state(
    state: WindowState | None, q: Tensor, v: Tensor, fq: Tensor, window: int, sinks: int = 0
) -> list[Tensor]:
    """Check a window state (or make the empty one) and return its seven fields in the compute
    dtype (the sinks as (B, H, 0, .) tensors when there are none)."""
    b, h, _, dk = q.shape
    f, d = fq.shape[-1], v.shape[-1]
    w = 0 if state is None else state.k.shape[2]
    n = 0 if state is None or state.sk is None else state.sk.shape[2]
    shapes = ((b, h, f, d), (b, h, f), (b, h, w, dk), (b, h, w, d), (b, h, w, f), (b, h, n, dk), (b, h, n, d))
    if state is None:
        return [q.new_zeros(shape) for shape in shapes]
    if w > window - 1:
        raise ValueError(f"state caches {w} keys but window={window} keeps at most {window - 1}")
    if n > sinks:
        raise ValueError(f"state holds {n} sink keys but sinks={sinks}: it was made with other settings")
    fields = [*state[:5], *(state[5:] if state.sk is not None else (q.new_zeros(shapes[5]), q.new_zeros(shapes[6])))]
    for name, x, shape in zip(WindowState._fields, fields, shapes):
        _check_shape(f"state.{name}", x, shape)
    return [x.to(q.dtype) for x in fields]


def window_attn_quadratic(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, *,
    window: int, window_factor: Tensor, scale: float, eps: float = 1e-6, sinks: int = 0,
) -> Tensor:  # fmt: skip
    """LoLCATs hybrid as T x T matrices: softmax over the last `window` keys and the first
    `sinks` keys of the sequence, linear over the others.

    With s_ij = scale q_i.k_j, soft(i) = {j <= i: i - window < j or j < sinks} and m_i the max
    of s_ij over soft(i):
    y_i = (f sum_soft(i) e^(s_ij - m_i) v_j + (1-f) sum_{j<=i, j not in soft(i)} (fq_i.fk_j) v_j)
          / (f sum_soft(i) e^(s_ij - m_i) + (1-f) sum_{j<=i, j not in soft(i)} fq_i.fk_j + eps).
    The linear terms are not rescaled by e^(-m_i), as in LoLCATs; every form uses the same m_i.
    The sinks (StreamingLLM's attention sinks) keep under softmax the keys a softmax teacher
    parks most of its attention on, which no bounded feature map can reproduce.

    Args:
        q: (B, H, T, Dk) raw (rotary-applied) queries; k: (B, H_kv, T, Dk) raw keys.
        v: (B, H_kv, T, D) values.
        fq: (B, H, T, F) feature-mapped queries; fk: (B, H_kv, T, F) feature-mapped keys.
        window: softmax keys per query, the current one included (>= 1).
        window_factor: (H,) f in (0, 1), the softmax share per head.
        scale: softmax logit scale, usually Dk ** -0.5.
        sinks: first keys of the sequence under softmax for every query (>= 0).
    Returns:
        y: (B, H, T, D) in v's dtype.
    """
    _check_window(q, k, v, fq, fk, window)
    _check_sinks(sinks)
    dtype, h = v.dtype, q.shape[1]
    q, fq, k, v, fk = _up(h, v, q, fq, k, v, fk)
    a = _window_scores(q, k, fq, fk, window, _mix_factor(window_factor, h, q.dtype), scale, sinks)
    return ((a @ v) / (a.sum(-1, keepdim=True) + eps)).to(dtype)


def _window_scores(
    q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, window: int, f: Tensor, scale: float, sinks: int = 0
) -> Tensor:
    """f e^(s - m) over the window and the sinks + (1 - f) fq.fk over the other earlier keys,
    unnormalized: (B, H, T, T)."""
    t = q.shape[2]
    dist = _distance(t, t, 0, q.device)  # (T, T)
    soft = (dist >= 0) & ((dist < window) | (torch.arange(t, device=q.device) < sinks)[None, :])
    s = (q @ k.mT * scale).masked_fill(~soft, float("-inf"))
    a_sm = torch.exp(s - s.amax(-1, keepdim=True))  # 0 outside the window and the sinks
    a_ln = (fq @ fk.mT).masked_fill(soft | (dist < 0), 0.0)
    return f * a_sm + (1 - f) * a_ln


def _earlier_blocks(x: Tensor, m: int) -> Tensor:
    """(B, H, n, c, .) -> (B, H, n, (m+1) c, .): block j joined with the m blocks before it
    (zeros before block 0), oldest first."""
    n = x.shape[2]
    return torch.cat([F.pad(x, (0, 0, 0, 0, s, 0))[:, :, :n] for s in range(m, -1, -1)], 3)


def window_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, *,
    window: int, window_factor: Tensor, scale: float, chunk_size: int = 64, eps: float = 1e-6,
    initial_state: WindowState | None = None, output_final_state: bool = False, sinks: int = 0,
) -> Tensor | tuple[Tensor, WindowState]:  # fmt: skip
    """LoLCATs hybrid in blocks of ``chunk_size`` tokens, all blocks at once, for any window.

    The cached keys of ``initial_state`` come first, then the new ones; queries sit at the new
    positions. Block j attends to its own keys and the m = ceil((window - 1) / chunk_size)
    blocks before it under masks by distance (softmax within the window, fq.fk beyond it),
    and to (S, z) of every key older than those blocks: the initial S, z plus a cumulative sum
    of the blocks' fkᵀv. Memory is linear in T (per block: chunk_size x (m+1) chunk_size scores,
    and one F x D state). The query heads of a kv head are stacked as rows of one product, so
    keys are not repeated per query head (without an initial state, whose cache is per query head).
    The sink keys (at most ``sinks``) join every block's softmax once they are beyond its window;
    their feature-mapped keys are zeroed for the linear terms.

    Args: as `window_attn_quadratic`, plus
        chunk_size: tokens per block (>= 1).
        initial_state: state after the tokens preceding q (None: no history).
        output_final_state: also return the state after the last token.
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `WindowState` if output_final_state.
    """
    _check_window(q, k, v, fq, fk, window)
    _check_positive("chunk_size", chunk_size)
    _check_sinks(sinks)
    dtype, (b, h, t, _), d = v.dtype, q.shape, v.shape[-1]
    f = _mix_factor(window_factor, h, torch.promote_types(v.dtype, torch.float32))
    if initial_state is None:
        q, fq, k, v, fk = (x.to(f.dtype) for x in (q, fq, k, v, fk))  # keys stay per kv head
        s0 = z0 = None
        sk0, sv0 = k[:, :, :0], v[:, :, :0]
        p = 0
    else:
        q, fq, k, v, fk = _up(h, v, q, fq, k, v, fk)
        s0, z0, kw, vw, fkw, sk0, sv0 = _window_state(initial_state, q, v, fq, window, sinks)
        p = kw.shape[2]
        k, v, fk = torch.cat([kw, k], 2), torch.cat([vw, v], 2), torch.cat([fkw, fk], 2)
    # The next keys to leave the window are sinks while sink slots remain: the first r of [cache, new].
    r = min(sinks - sk0.shape[2], p + t)
    fk_lin = torch.cat([torch.zeros_like(fk[:, :, :r]), fk[:, :, r:]], 2) if r else fk
    hk = k.shape[1]
    g = h // hk  # query heads per key head, stacked as rows below
    c = min(chunk_size, p + t)
    n, m = -(-(p + t) // c), -(-(window - 1) // c)

    f_rows = f.view(hk, g, 1).expand(hk, g, c).reshape(1, hk, 1, g * c, 1)  # f per query row
    qb, fqb = _query_rows(q * scale, n, c, p, hk), _query_rows(fq, n, c, p, hk) * (1 - f_rows)  # (1 - f) rides on fq
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # a ones column: the normalizer rides along
    kb, vb, fkb = (_block_rows(x, n, c, 0) for x in (k, v1, fk_lin))  # (B, Hk, n, c, .)
    kn, vn, fkn = (_earlier_blocks(x, m) for x in (kb, vb, fkb))  # (B, Hk, n, (m+1) c, .)
    # Query a of block j sits at j c + a; near key i at (j - m) c + i: distance m c + a - i.
    dist = _distance(c, (m + 1) * c, m * c, q.device).repeat(g, 1)  # (g c, (m+1) c), every block
    key_pos = (torch.arange(n, device=q.device)[:, None] - m) * c + torch.arange((m + 1) * c, device=q.device)
    outside = (dist < 0) | (dist >= window) | (key_pos < 0)[:, None, :]  # (n, g c, (m+1) c)
    sc = (qb @ kn.mT).masked_fill(outside, float("-inf"))
    top = sc.amax(-1, keepdim=True)
    ks, vs = torch.cat([sk0, k[:, :, :r]], 2), torch.cat([sv0, v1[:, :, :r, :d]], 2)  # the sink keys
    if ks.shape[2]:
        # Query a of block j sits at j c + a: a sink key i of [cache, new] has left its window
        # when j c + a - i >= window; the state's sinks left before any of these queries.
        pos = (torch.arange(n, device=q.device)[:, None] * c + torch.arange(c, device=q.device)).repeat(1, g)
        left = pos[:, :, None] - torch.arange(-sk0.shape[2], r, device=q.device) >= window  # (n, g c, ns)
        left[..., : sk0.shape[2]] = True
        ss = (qb @ ks.unsqueeze(2).mT).masked_fill(~left, float("-inf"))  # (B, Hk, n, g c, ns)
        top = torch.maximum(top, ss.amax(-1, keepdim=True))
    a_sm = torch.exp(sc - top)
    a = torch.addcmul((fqb @ fkn.mT).masked_fill(dist < window, 0.0), f_rows, a_sm)  # (B, Hk, n, g c, (m+1) c)
    # Keys of blocks before j - m are beyond every window of block j: [S, z] from a cumsum.
    older = F.pad((fkb.mT @ vb).cumsum(2), (0, 0, 0, 0, m + 1, 0))[:, :, :n]  # (B, Hk, n, F, D + 1)
    full = a @ vn + fqb @ older  # (B, Hk, n, g c, D + 1): numerator, denominator
    if ks.shape[2]:
        vs1 = torch.cat([vs, torch.ones_like(vs[..., :1])], -1).unsqueeze(2)
        full = full + f_rows * (torch.exp(ss - top) @ vs1)
    if s0 is not None:  # per query head (g == 1 here)
        full = full + fqb @ torch.cat([s0, z0.unsqueeze(-1)], -1).unsqueeze(2)
    y = _query_heads_back(full[..., :d] / (full[..., d:] + eps), c, p, t).to(dtype)
    if not output_final_state:
        return y
    n_out = max(p + t - (window - 1), 0)  # keys outside the window of the last query and later
    s_, z = fk_lin[:, :, :n_out].mT @ v[:, :, :n_out], fk_lin[:, :, :n_out].sum(2)
    kw, vw, fkw = k[:, :, n_out:], v[:, :, n_out:], fk[:, :, n_out:]
    sk, sv = ks[:, :, : sk0.shape[2] + min(r, n_out)], vs[:, :, : sk0.shape[2] + min(r, n_out)]
    if s0 is None:
        s_, z, kw, vw, fkw, sk, sv = (expand_kv(x, h) for x in (s_, z, kw, vw, fkw, sk, sv))
    else:
        s_, z = s0 + s_, z0 + z
    return y, WindowState(s_, z, kw, vw, fkw, *((sk, sv) if sinks else (None, None)))


def window_attn_step(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, state: WindowState | None = None, *,
    window: int, window_factor: Tensor, scale: float, eps: float = 1e-6, sinks: int = 0,
) -> tuple[Tensor, WindowState]:  # fmt: skip
    """One token of the LoLCATs hybrid: softmax over sinks + cache + itself, linear over (S, z).

    Args:
        q: (B, H, 1, Dk); k: (B, H_kv, 1, Dk); v: (B, H_kv, 1, D);
        fq: (B, H, 1, F); fk: (B, H_kv, 1, F); the rest as `window_attn_quadratic`.
        state: state before this token (None: empty cache, zero S and z).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the state after this token.
    """
    _check_window(q, k, v, fq, fk, window)
    _check_one_token(q)
    _check_sinks(sinks)
    dtype, h = v.dtype, q.shape[1]
    q, fq, k, v, fk = _up(h, v, q, fq, k, v, fk)
    f = _mix_factor(window_factor, h, q.dtype)
    s_, z, kw, vw, fkw, sk, sv = _window_state(state, q, v, fq, window, sinks)
    kx, vx, fkx = torch.cat([kw, k], 2), torch.cat([vw, v], 2), torch.cat([fkw, fk], 2)  # (B, H, W'+1, .)
    ks, vs = torch.cat([sk, kx], 2), torch.cat([sv, vx], 2)  # the sinks have left the window: softmax too
    s = q @ ks.mT * scale  # (B, H, 1, N + W'+1): every cached key is inside this query's window
    a_sm = torch.exp(s - s.amax(-1, keepdim=True))
    num = f * (a_sm @ vs) + (1 - f) * (fq @ s_)
    den = f * a_sm.sum(-1, keepdim=True) + (1 - f) * (fq @ z.unsqueeze(-1))
    n_out = max(kx.shape[2] - (window - 1), 0)  # the oldest key leaves once the cache is full
    to_sinks = min(sinks - sk.shape[2], n_out)  # it is a sink while sink slots remain
    sk, sv = torch.cat([sk, kx[:, :, :to_sinks]], 2), torch.cat([sv, vx[:, :, :to_sinks]], 2)
    s_ = s_ + fkx[:, :, to_sinks:n_out].mT @ vx[:, :, to_sinks:n_out]
    z = z + fkx[:, :, to_sinks:n_out].sum(2)
    sinks_state = (sk, sv) if sinks else (None, None)
    state = WindowState(s_, z, kx[:, :, n_out:], vx[:, :, n_out:], fkx[:, :, n_out:], *sinks_state)
    return (num / (den + eps)).to(dtype), state


def window_attn_weights(
    q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, *, window: int, window_factor: Tensor,
    scale: float, eps: float = 1e-6, sinks: int = 0,
) -> Tensor:  # fmt: skip
    """The (B, H, T, T) weights of `window_attn_quadratic` (softmax and linear parts, one
    normalizer): y = weights @ v."""
    _check_positive("window", window)
    _check_sinks(sinks)
    h = q.shape[1]
    q, fq, k, fk = _up(h, q, q, fq, k, fk)
    a = _window_scores(q, k, fq, fk, window, _mix_factor(window_factor, h, q.dtype), scale, sinks)
    return a / (a.sum(-1, keepdim=True) + eps)
