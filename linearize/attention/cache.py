"""Decoding state of a linearized model inside transformers' own ``Cache``.

A swapped layer does not keep keys and values: it keeps its mixer's recurrent state — (S, z)
for linear attention, (S, z) plus the last ``window - 1`` keys and values for the LoLCATs
hybrid, S (plus a window of keys/values) for gated attention — whose size does not grow with
the context. :class:`RecurrentState` is that layer's entry in a cache. Layers left softmax keep
the normal key/value entry, so one cache serves a hybrid model.

``generate()`` (and a forward with ``use_cache=True``) builds a plain ``DynamicCache``; before a
swapped layer's module writes to it, :func:`recurrent_entry` puts a :class:`RecurrentState` in
that layer's slot. The cache then reports the tokens seen (for positions and masks) from
either kind of entry.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin


class RecurrentState(CacheLayerMixin):
    """One swapped layer's cache entry: its mixer's state (a NamedTuple of tensors, batch
    first — or a list of one-row states while the rows of a left-padded batch differ in size)
    and the number of positions it has absorbed (padding included, as masks count them)."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.state: Optional[NamedTuple | list[NamedTuple]] = None
        self.seen = 0
        self.device: Optional[torch.device] = None
        self.more: list[RecurrentState] = []  # the states of a module's later calls in one forward
        self.updated = False  # the module wrote this call's keys here (not into another slot)

    def __repr__(self) -> str:
        kind = type(self.state).__name__ if self.state is not None else "empty"
        return f"RecurrentState({kind}, seen={self.seen}, {self.nbytes()} bytes)"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to allocate ahead: the mixer returns its first state after the prompt."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """The new tokens' keys and values, handed back unstored: the layer's attention
        function continues its state from them (see :mod:`linearize.attention.layer`)."""
        self.updated = True
        return key_states, value_states

    def for_call(self, call: int) -> "RecurrentState":
        """The entry of the module's ``call``-th attention call in a forward (0: this one)."""
        while len(self.more) < call:
            self.more.append(RecurrentState())
        return self if call == 0 else self.more[call - 1]

    def advance(self, state: NamedTuple | list[NamedTuple], tokens: int) -> None:
        """Record the mixer's state after ``tokens`` more positions."""
        self.state, self.seen = state, self.seen + tokens
        self.device = next(iter(self._tensors())).device

    def _rows(self) -> list[NamedTuple]:
        return [] if self.state is None else self.state if isinstance(self.state, list) else [self.state]

    def _tensors(self):
        return (x for st in self._rows() for x in st if x is not None)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # as a full key/value layer: masks stay valid

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1  # no length dimension

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self._tensors()) + sum(m.nbytes() for m in self.more)

    def _map(self, fn: Callable[[Tensor], Tensor], rows: Optional[Callable[[list], list]] = None) -> None:
        """fn on every tensor of a batched state; on a per-row list, ``rows`` on the list (the
        batch dimension) and fn on each row's tensors when ``rows`` is None."""
        if isinstance(self.state, list):
            self.state = rows(self.state) if rows is not None else [_each(st, fn) for st in self.state]
        elif self.state is not None:
            self.state = _each(self.state, fn)
        for later in self.more:
            later._map(fn, rows)

    def offload(self) -> None:
        self._map(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.device is not None:
            self._map(lambda x: x.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.state, self.seen, self.more = None, 0, []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)), lambda rows: [rows[i] for i in beam_idx.tolist()])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise NotImplementedError(
                "a recurrent state cannot forget its last tokens, so assisted decoding and cache "
                "cropping are not supported by a linearized layer"
            )

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0), lambda rows: [r for r in rows for _ in range(repeats)])

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda x: x[indices], lambda rows: [rows[i] for i in torch.arange(len(rows))[indices].tolist()])


def _each(state: NamedTuple, fn: Callable[[Tensor], Tensor]) -> NamedTuple:
    return type(state)(*(None if x is None else fn(x) for x in state))


def recurrent_entry(cache: Cache, layer_idx: int) -> RecurrentState:
    """Layer ``layer_idx``'s :class:`RecurrentState` in ``cache``, put there on first use.

    Raises:
        ValueError: when that slot already holds keys and values (a cache filled by another
            model, or by this layer while it was still softmax).
    """
    while len(cache.layers) <= layer_idx:  # caches that grow their layer list lazily
        cache.layers.append(RecurrentState())
    entry = cache.layers[layer_idx]
    if isinstance(entry, RecurrentState):
        return entry
    if entry.get_seq_length() > 0:
        raise ValueError(
            f"cache slot {layer_idx} already holds {entry.get_seq_length()} tokens of keys and "
            "values; a linearized layer needs a fresh cache (do not reuse the teacher's cache)"
        )
    cache.layers[layer_idx] = RecurrentState()
    return cache.layers[layer_idx]
