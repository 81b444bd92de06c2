"""Padding: which of a call's keys are real tokens (read from the family's own mask), and the
mixer run on each row's real tokens alone, so that a padded batch gives what each sequence gives
unpadded and a decoding state never holds a pad."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from linearize.attention.cache import RecurrentState
from linearize.attention.projected import Projected, project

_last_validity: list = [None]  # (weakref to mask, offset, length, result): one per forward, shared by its layers


def key_validity(mask, offset: int, length: int) -> Optional[Tensor]:
    """(B, length) True where the call's keys at positions offset .. offset+length-1 are real
    tokens, read from the mask the family built for this call; None when all of them are.

    The mask is the original implementation's: None (causal, nothing padded), (B, KV) padding
    (flash), or (B, 1, Q, KV) boolean (keep) or additive float (0 keeps). A key masked from its
    own query is padding: causal, sliding and chunked masks all let a token see itself.
    """
    if mask is None:
        return None
    memo = _last_validity[0]
    if memo is not None and memo[0]() is mask and memo[1:3] == (offset, length):
        return memo[3]
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 4):
        raise NotImplementedError(
            f"a converted layer reads padding from a 2-D or 4-D tensor mask, got {type(mask).__name__}"
            f"{'' if not isinstance(mask, Tensor) else ' of shape ' + str(tuple(mask.shape))}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    width = mask.shape[-1]
    if width < offset + length:
        if offset == 0:
            raise ValueError(f"the attention mask covers {width} keys, fewer than this call's {length}")
        raise NotImplementedError(
            f"the attention mask covers {width} positions, but this layer's state has seen {offset} and the "
            f"call adds {length}: the family builds its mask over the keys its cache returns, or runs the "
            "layer more than once per forward, so it decodes only with use_cache=False"
        )
    cols = torch.arange(offset, offset + length, device=mask.device)
    if mask.dim() == 2:
        keep = mask[:, cols]
    elif mask.shape[2] == length:  # each query's own key
        keep = mask[:, 0, torch.arange(length, device=mask.device), cols]
    else:  # one row for every query: a padding mask
        keep = mask[:, 0, -1, cols]
    keep = keep.bool() if mask.dim() == 2 or mask.dtype == torch.bool else keep > torch.finfo(mask.dtype).min / 2
    result = None if bool(keep.all()) else keep
    _last_validity[0] = (weakref.ref(mask), offset, length, result)
    return result


def _rows_of(x, b: int, idx: Tensor, length: int):
    """Row b of a (B, T, ...) rotary table at positions idx, or None when it is laid out otherwise."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != length:
        return None
    return x[b : b + 1 if x.shape[0] > 1 else 1][:, idx]


def by_row(
    module: nn.Module, s: "Linearized", p: Projected, scaling: Optional[float], entry: Optional[RecurrentState],  # noqa: F821
) -> Tensor:  # fmt: skip
    """The mixer on each row's real tokens alone (a padded batch, or rows whose decoding states
    differ in size): exactly what each sequence gives unpadded. Outputs at padding are 0; a
    row's state continues from its own and holds no pad."""
    b, _, t, _ = p.q.shape
    valid = p.valid if p.valid is not None else p.q.new_ones(b, t, dtype=torch.bool)
    states = None if entry is None else row_states(entry.state, b)
    outs, after = [], []
    for row in range(b):
        idx = valid[row].nonzero()[:, 0]
        if idx.numel() == 0:
            raise ValueError(f"row {row} of the batch is all padding: nothing for layer {s.layer_idx} to attend")
        q, k, v = (x[row : row + 1][:, :, idx] for x in (p.q, p.k, p.v))
        rope = None
        if s.rope is not None:
            rope = tuple(_rows_of(x, row, idx, t) for x in s.rope)
            if any(x is None for x in rope):
                if getattr(s.mixer, "pre_rotary", False):
                    raise NotImplementedError(
                        f"{type(module).__name__}'s rotary tables are not laid out (batch, time, ...), so "
                        f"{type(s.mixer).__name__} cannot read a padded batch row by row; call it one sequence at a time"
                    )
                rope = None  # read only by maps that act before rotary
        pr = project(module, s.mixer, q, k, v, scaling, rope)
        if states is None:
            y = s.mixer(pr)
        else:
            y, state = s.mixer.extend(pr, states[row])
            after.append(state)
        outs.append(y.new_zeros(1, y.shape[1], t, y.shape[3]).index_copy(2, idx, y))
    if entry is not None:
        entry.advance(join_states(after), t)
    return torch.cat(outs, 0)


def row_states(state, batch: int) -> list:
    """Each row's state: a batched NamedTuple split, or the per-row list it already is."""
    if isinstance(state, list):
        return state
    if state is None:
        return [None] * batch
    return [type(state)(*(None if x is None else x[r : r + 1] for x in state)) for r in range(batch)]


def join_states(states: list):
    """One batched state when every row's has the same shapes, else the list of rows' states
    (rows of a left-padded batch whose window caches are not yet full)."""
    shapes = {tuple(None if x is None else tuple(x.shape) for x in st) for st in states}
    if len(shapes) > 1:
        return list(states)
    first = states[0]
    return type(first)(*(None if x is None else torch.cat([st[i] for st in states], 0) for i, x in enumerate(first)))
