"""Pure-PyTorch reference forms of every attention the package uses: the numerical oracle.

Layout: every tensor is (B, H, T, D) — batch, heads, time, feature — as transformers' attention
interface hands q over. Feature-mapped queries and keys are (B, H, T, F). Gates are (B, H, T, F)
per key feature or (B, H, T) per head.

GQA: k, v, fk and g may carry H_kv heads with H % H_kv == 0. Every op expands them to H with
`expand_kv` (query head h reads kv head h // (H // H_kv), as transformers' `repeat_kv`), so
recurrent states are kept per query head.

Precision: everything is computed in fp32 (bf16/fp16/fp32 inputs are upcast), or in fp64 when v
is fp64 so the oracle can be checked against itself without rounding noise. Outputs come back in
v's dtype; states stay in the compute dtype.

Every op is causal (query i sees keys j <= i) and differentiable by autograd, states included.
Each family has three forms that must agree: `*_quadratic` (the T x T matrix, the definition),
`*_chunked` (intra-chunk quadratic + inter-chunk state; T need not divide by chunk_size) and
`*_step` (one token of the recurrence). A chunked call with `output_final_state=True` returns a
state that a later chunked call or a step loop continues from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GatedState", "LinearState", "WindowState", "expand_kv", "softmax_attn",
    "linear_attn_quadratic", "linear_attn_chunked", "linear_attn_step",
    "window_attn_quadratic", "window_attn_chunked", "window_attn_step",
    "gated_attn_quadratic", "gated_attn_chunked", "gated_attn_step",
    "linear_attn_weights", "window_attn_weights", "softmax_weights",
]  # fmt: skip


class LinearState(NamedTuple):
    """State of normalized linear attention after t tokens (compute dtype).

    Attributes:
        S: (B, H, F, D) sum over seen tokens of k_j^T v_j (k already feature-mapped).
        z: (B, H, F) sum over seen tokens of k_j, for the normalizer.
    """

    S: Tensor
    z: Tensor


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


class GatedState(NamedTuple):
    """State of gated linear attention after t tokens (compute dtype).

    Attributes:
        S: (B, H, F, D) decayed sum of k_j^T v_j.
    """

    S: Tensor


def expand_kv(x: Tensor, n_heads: int) -> Tensor:
    """Repeat kv heads to the query head count (GQA), as transformers' `repeat_kv` does.

    Args:
        x: (B, H_kv, T, ...) keys, values, feature keys or gates.
        n_heads: H, the query head count; a multiple of H_kv.
    Returns:
        (B, H, T, ...) where query head h holds kv head h // (H // H_kv); x itself if H_kv == H.
    """
    n_kv = x.shape[1]
    if n_kv < 1 or n_heads % n_kv != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({n_kv})")
    return x if n_kv == n_heads else x.repeat_interleave(n_heads // n_kv, dim=1)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, names: tuple[str, str, str] = ("q", "k", "v")) -> None:
    """Raise ValueError unless q (B, H, T, F), k (B, H_kv, T, F), v (B, H_kv, T, D) fit together."""
    for name, x in zip(names, (q, k, v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, H, T, D), got shape {tuple(x.shape)}")
    nq, nk, nv = names
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"batch sizes differ: {nq} {q.shape[0]}, {nk} {k.shape[0]}, {nv} {v.shape[0]}")
    if not q.shape[2] == k.shape[2] == v.shape[2]:
        raise ValueError(
            f"sequence lengths differ: {nq} T={q.shape[2]}, {nk} T={k.shape[2]}, {nv} T={v.shape[2]}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"feature dims differ: {nq} {q.shape[3]}, {nk} {k.shape[3]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"head counts differ: {nk} {k.shape[1]}, {nv} {v.shape[1]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{nq} has {q.shape[1]} heads, not a multiple of the {k.shape[1]} heads of {nk}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_sinks(sinks: int) -> None:
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an integer >= 0, got {sinks!r}")


def _check_one_token(q: Tensor) -> None:
    if q.shape[2] != 1:
        raise ValueError(f"a step takes one token, got T={q.shape[2]}; use the chunked form")


def _check_shape(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")


def _up(n_heads: int, v: Tensor, *xs: Tensor) -> list[Tensor]:
    """Cast xs to the compute dtype (fp32, or fp64 when v is fp64) and expand them to n_heads."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    return [expand_kv(x.to(dtype), n_heads) for x in xs]


def _distance(n_q: int, n_k: int, offset: int, device: torch.device) -> Tensor:
    """(n_q, n_k) positions from key j to query i, when query i sits at key index i + offset."""
    return torch.arange(n_q, device=device)[:, None] + offset - torch.arange(n_k, device=device)[None, :]


def _linear_state(state: LinearState | None, q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    b, h, _, f = q.shape
    d = v.shape[-1]
    if state is None:
        return q.new_zeros(b, h, f, d), q.new_zeros(b, h, f)
    _check_shape("state.S", state.S, (b, h, f, d))
    _check_shape("state.z", state.z, (b, h, f))
    return state.S.to(q.dtype), state.z.to(q.dtype)


def linear_attn_quadratic(q: Tensor, k: Tensor, v: Tensor, *, normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """Causal linear attention as a masked T x T matrix.

    y_i = sum_{j<=i} (q_i.k_j) v_j / (sum_{j<=i} q_i.k_j + eps); no division if not normalize.

    Args:
        q: (B, H, T, F) feature-mapped, non-negative queries.
        k: (B, H_kv, T, F) feature-mapped, non-negative keys.
        v: (B, H_kv, T, D) values.
    Returns:
        y: (B, H, T, D) in v's dtype.
    """
    _check_qkv(q, k, v)
    dtype, h = v.dtype, q.shape[1]
    q, k, v = _up(h, v, q, k, v)
    a = _linear_scores(q, k)  # (B, H, T, T)
    y = a @ v
    if normalize:
        y = y / (a.sum(-1, keepdim=True) + eps)
    return y.to(dtype)


def _linear_scores(q: Tensor, k: Tensor) -> Tensor:
    """Causally masked q.k for expanded, compute-dtype q, k: (B, H, T, T)."""
    t = q.shape[2]
    return (q @ k.mT).masked_fill(_distance(t, t, 0, q.device) < 0, 0.0)


def linear_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int = 64, normalize: bool = True, eps: float = 1e-6,
    initial_state: LinearState | None = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:  # fmt: skip
    """Causal linear attention in blocks of ``chunk_size`` tokens, all blocks at once: a masked
    quadratic inside each block, and the state (S, z) of every earlier block from a cumulative
    sum of the blocks' kᵀv (plus the initial state). The query heads of a kv head are stacked
    as rows of one product, so keys are not repeated per query head.

    Args: as `linear_attn_quadratic`, plus
        chunk_size: tokens per block (>= 1).
        initial_state: state after the tokens preceding q (None: no history).
        output_final_state: also return the state after the last token.
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `LinearState` if output_final_state.
    """
    _check_qkv(q, k, v)
    _check_positive("chunk_size", chunk_size)
    dtype, h, t, d = v.dtype, q.shape[1], q.shape[2], v.shape[-1]
    q, k, v = (x.to(torch.promote_types(dtype, torch.float32)) for x in (q, k, v))
    hk = k.shape[1]
    g = h // hk
    c = min(chunk_size, t) or 1
    n = -(-t // c)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1) if normalize else v  # ones: the normalizer
    qb = _query_rows(q, n, c, 0, hk)  # (B, Hk, n, g c, F)
    kb, vb = _block_rows(k, n, c, 0), _block_rows(v1, n, c, 0)  # (B, Hk, n, c, .)
    a = (qb @ kb.mT).masked_fill(_distance(c, c, 0, q.device).repeat(g, 1) < 0, 0.0)  # (B, Hk, n, g c, c)
    older = F.pad((kb.mT @ vb).cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :n]  # blocks before j: (B, Hk, n, F, D')
    full = a @ vb + qb @ older
    if initial_state is not None:
        s0, z0 = _linear_state(initial_state, q, v)  # per query head: (B, H, F, D), (B, H, F)
        s0 = torch.cat([s0, z0.unsqueeze(-1)], -1) if normalize else s0
        full = full + _query_rows(q @ s0, n, c, 0, hk)
    y = full[..., :d] / (full[..., d:] + eps) if normalize else full
    y = _query_heads_back(y, c, 0, t).to(dtype)
    if not output_final_state:
        return y
    s_, z = expand_kv(k.mT @ v, h), expand_kv(k.sum(2), h)
    if initial_state is not None:
        s0, z0 = _linear_state(initial_state, q, v)
        s_, z = s0 + s_, z0 + z
    return y, LinearState(s_, z)


def linear_attn_step(
    q: Tensor, k: Tensor, v: Tensor, state: LinearState | None = None, *, normalize: bool = True, eps: float = 1e-6
) -> tuple[Tensor, LinearState]:
    """One token of causal linear attention: S += k^T v, z += k, then y = q S / (q z + eps).

    Args:
        q: (B, H, 1, F); k: (B, H_kv, 1, F); v: (B, H_kv, 1, D).
        state: state before this token (None: zeros).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the state after this token.
    """
    _check_qkv(q, k, v)
    _check_one_token(q)
    dtype, h = v.dtype, q.shape[1]
    q, k, v = _up(h, v, q, k, v)
    s_, z = _linear_state(state, q, v)
    s_ = s_ + k.mT @ v  # (B, H, F, D)
    z = z + k[:, :, 0]
    y = q @ s_
    if normalize:
        y = y / (q @ z.unsqueeze(-1) + eps)
    return y.to(dtype), LinearState(s_, z)


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


def _query_rows(x: Tensor, n: int, c: int, front: int, n_kv: int) -> Tensor:
    """Queries (B, H, L, .) in blocks of c positions (as `_block_rows`), the H / n_kv query heads
    of each kv head stacked as rows: (B, n_kv, n, (H / n_kv) c, .)."""
    x = _block_rows(x, n, c, front).unflatten(1, (n_kv, -1))  # (B, Hk, g, n, c, .)
    return x.transpose(2, 3).flatten(3, 4)


def _query_heads_back(y: Tensor, c: int, front: int, length: int) -> Tensor:
    """Outputs in `_query_rows`' layout (B, Hk, n, g c, D) back to (B, H, length, D)."""
    b, hk, n, rows, d = y.shape
    y = y.unflatten(3, (rows // c, c)).permute(0, 1, 3, 2, 4, 5)  # (B, Hk, g, n, c, D)
    return y.reshape(b, hk * (rows // c), n * c, d)[:, :, front : front + length]


def _block_rows(x: Tensor, n: int, c: int, front: int) -> Tensor:
    """x (B, H, L, .) padded with ``front`` zero rows before and zeros after to n*c rows, as
    (B, H, n, c, .): row a of block j is position j*c + a - front of x."""
    return F.pad(x, (0, 0, front, n * c - front - x.shape[2])).unflatten(2, (n, c))


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


def _gate(g: Tensor, k: Tensor, v: Tensor, n_heads: int) -> Tensor:
    """Check g against k; return it in the compute dtype as (B, H, T, F) or (B, H, T, 1)."""
    per_feature, per_head = tuple(k.shape), tuple(k.shape[:3])
    if tuple(g.shape) not in (per_feature, per_head):
        raise ValueError(
            f"g has shape {tuple(g.shape)}, expected {per_feature} (per key feature) or {per_head} (per head)"
        )
    return _up(n_heads, v, g if g.dim() == 4 else g.unsqueeze(-1))[0]


def _gated_state(state: GatedState | None, q: Tensor, v: Tensor) -> Tensor:
    shape = (*q.shape[:2], q.shape[-1], v.shape[-1])  # (B, H, F, D)
    if state is None:
        return q.new_zeros(shape)
    _check_shape("state.S", state.S, shape)
    return state.S.to(q.dtype)


_FEATURE_BLOCK = 16  # tokens per block with per-feature gates: short enough that e^-G rarely passes e^30
_MAX_BLOCK_DECAY = 30.0  # a per-feature block whose |G| passes this takes the exact (slow) form
_EXACT_GROUP = 4096  # blocks per group in that form: 4096 x 16 x 16 x F floats at most at a time


def _decay_matrix(cum: Tensor, causal: Tensor) -> Tensor:
    """exp(G_i - G_j) where j <= i, else 0.

    Args:
        cum: (B, H, c, F|1) cumulative log decay G over time.
        causal: (c, c) bool, True where j <= i.
    Returns:
        (B, H, c, c, F|1). Exponents are masked to -inf where j > i before exp, so the positive
        ones there never overflow.
    """
    diff = cum[:, :, :, None] - cum[:, :, None, :]  # (B, H, c, c, F|1): sum of g over (j, i]
    return diff.masked_fill(~causal[:, :, None], float("-inf")).exp()


def gated_attn_quadratic(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float = 1.0) -> Tensor:
    """Gated linear attention (GLA, Liger; SUPRA with a constant gate) as a T x T sum.

    y_i = scale sum_{j<=i} (sum_f q_if k_jf exp(G_if - G_jf)) v_j with G = cumsum of g over time:
    the same as S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, y_t = scale q_t S_t. No normalizer.
    Memory is O(T^2 F): an oracle for test sizes.

    Args:
        q: (B, H, T, F); k: (B, H_kv, T, F); v: (B, H_kv, T, D).
        g: (B, H_kv, T, F) per-feature or (B, H_kv, T) per-head log decay (<= 0).
        scale: output scale.
    Returns:
        y: (B, H, T, D) in v's dtype.
    """
    _check_qkv(q, k, v)
    dtype, h, t = v.dtype, q.shape[1], q.shape[2]
    g = _gate(g, k, v, h)
    q, k, v = _up(h, v, q, k, v)
    decay = _decay_matrix(g.cumsum(2), _distance(t, t, 0, q.device) >= 0)
    a = (q[:, :, :, None] * k[:, :, None] * decay).sum(-1)  # (B, H, T, T)
    return (scale * (a @ v)).to(dtype)


def gated_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float = 1.0, chunk_size: int = 64,
    initial_state: GatedState | None = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, GatedState]:  # fmt: skip
    """Gated linear attention in blocks of ``chunk_size`` tokens, gates cumulated from each
    block's start.

    Inside a block: the causal, decayed q.k products. Per-head gates give one decay per
    (query, key) pair. Per-feature gates factor as e^(G_i - G_j) = e^G_i e^-G_j (G from the
    block's start) in one product for every block; blocks are then at most 16 tokens so that
    |G| <= 30 (e^30 is safe in fp32) nearly always, and the few blocks past that are redone
    exactly, one exp per pair and feature. Across blocks: each block's kᵀv decayed to its end,
    carried by a scan over the blocks' states. Every other exponent is a sum of g over a span.

    Args: as `gated_attn_quadratic`, plus
        chunk_size: tokens per block (>= 1); T need not divide by it.
        initial_state: state after the tokens preceding q (None: zeros).
        output_final_state: also return the state after the last token.
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `GatedState` if output_final_state.
    """
    _check_qkv(q, k, v)
    _check_positive("chunk_size", chunk_size)
    dtype, h, t = v.dtype, q.shape[1], q.shape[2]
    g = _gate(g, k, v, h)
    q, k, v = _up(h, v, q, k, v)
    per_head = g.shape[-1] == 1
    c = min(chunk_size if per_head else min(chunk_size, _FEATURE_BLOCK), t) or 1
    n = -(-t // c)
    qb, kb, vb, gb = (_block_rows(x, n, c, 0) for x in (q, k, v, g))  # padding: zero keys, no decay
    cum = gb.cumsum(3)  # (B, H, n, c, F|1): log decay from the block start through each token
    causal = _distance(c, c, 0, q.device) >= 0
    q_decayed = qb * cum.exp()  # queries decayed to their block's start
    if per_head:  # one decay per (query, key) pair
        a = (qb @ kb.mT) * (cum[..., :, None, 0] - cum[..., None, :, 0]).masked_fill(~causal, float("-inf")).exp()
    else:  # e^(G_i - G_j) = e^G_i e^-G_j, exact while |G| <= 30 (clamped past it, those blocks redone)
        k_undecayed = kb * (-cum).clamp(max=_MAX_BLOCK_DECAY).exp()
        a = (q_decayed @ k_undecayed.mT).masked_fill(~causal, 0.0)
        far = (cum.abs().amax((-2, -1)) > _MAX_BLOCK_DECAY).nonzero(as_tuple=True)  # (b, h, block) indices
        if far[0].numel():
            exact = torch.cat([
                (qj[:, :, None] * kj[:, None] * _decay_matrix(cj[None], causal)[0]).sum(-1)
                for qj, kj, cj in zip(*(x[far].split(_EXACT_GROUP) for x in (qb, kb, cum)))
            ])  # fmt: skip
            a = a.index_put(far, exact)
    last = cum[:, :, :, -1:]  # (B, H, n, 1, F|1): log decay over each whole block
    kv = (kb * (last - cum).exp()).mT @ vb  # (B, H, n, F, D): each block's kᵀv at its end
    starts = [_gated_state(initial_state, q, v)]  # the state where each block starts, then the final one
    for decay_j, kv_j in zip(last.mT.exp().unbind(2), kv.unbind(2)):
        starts.append(decay_j * starts[-1] + kv_j)
    y = scale * (a @ vb + q_decayed @ torch.stack(starts[:n], 2))  # (B, H, n, c, D)
    y = y.flatten(2, 3)[:, :, :t].to(dtype)
    return (y, GatedState(starts[n])) if output_final_state else y


def gated_attn_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: GatedState | None = None, *, scale: float = 1.0
) -> tuple[Tensor, GatedState]:
    """One token of gated linear attention: S = diag(exp g) S + k^T v, y = scale q S.

    Args:
        q: (B, H, 1, F); k: (B, H_kv, 1, F); v: (B, H_kv, 1, D); g: (B, H_kv, 1, F) or (B, H_kv, 1).
        state: state before this token (None: zeros).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the state after this token.
    """
    _check_qkv(q, k, v)
    _check_one_token(q)
    dtype, h = v.dtype, q.shape[1]
    g = _gate(g, k, v, h)
    q, k, v = _up(h, v, q, k, v)
    s_ = g.mT.exp() * _gated_state(state, q, v) + k.mT @ v  # (B, H, F, D)
    return (scale * (q @ s_)).to(dtype), GatedState(s_)


def softmax_attn(q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None = None) -> Tensor:
    """Causal softmax attention in fp32 with an explicit mask: the teacher-side oracle.

    Args:
        q: (B, H, T, Dk); k: (B, H_kv, T, Dk); v: (B, H_kv, T, D).
        scale: logit scale, usually Dk ** -0.5.
        window: if given, each query sees only its last `window` keys, itself included.
    Returns:
        y: (B, H, T, D) in v's dtype.
    """
    _check_qkv(q, k, v)
    if window is not None:
        _check_positive("window", window)
    dtype, h, t = v.dtype, q.shape[1], q.shape[2]
    q, k, v = _up(h, v, q, k, v)
    dist = _distance(t, t, 0, q.device)  # (T, T)
    hidden = (dist < 0) | (dist >= (t if window is None else window))
    s = (q @ k.mT * scale).masked_fill(hidden, float("-inf"))
    return (s.softmax(-1) @ v).to(dtype)


def linear_attn_weights(q: Tensor, k: Tensor, *, eps: float = 1e-6) -> Tensor:
    """The (B, H, T, T) row-normalized weights of `linear_attn_quadratic`: y = weights @ v.

    Used for Hedgehog's attention-weight cross-entropy; q: (B, H, T, F); k: (B, H_kv, T, F).
    """
    a = _linear_scores(*_up(q.shape[1], q, q, k))  # (B, H, T, T)
    return a / (a.sum(-1, keepdim=True) + eps)


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


def softmax_weights(q: Tensor, k: Tensor, *, scale: float, window: int | None = None) -> Tensor:
    """The (B, H, T, T) causal softmax weights of `softmax_attn` (the teacher's attention)."""
    h, t = q.shape[1], q.shape[2]
    q, k = _up(h, q, q, k)
    dist = _distance(t, t, 0, q.device)
    hidden = (dist < 0) | (dist >= (t if window is None else window))
    return (q @ k.mT * scale).masked_fill(hidden, float("-inf")).softmax(-1)
