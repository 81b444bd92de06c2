"""What every attention kind's PyTorch reference (`linearize.ops.<kind>.reference`) shares:
the GQA expansion, the input checks, the compute dtype and the block layouts of the chunked forms.

Those reference forms are the numerical oracle. Their conventions:

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

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["expand_kv"]


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
