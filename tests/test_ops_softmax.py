"""Causal softmax attention's reference (`linearize.ops.softmax`) equals torch's SDPA, with and
without a window; inputs are fp64."""

from __future__ import annotations

import pytest
import torch

from linearize.ops.softmax import reference as ref
from tests.ops_testing import HEADS, assert_close, sdpa, window_leaves

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window", [None, 1, 5])
def test_softmax_attn_matches_sdpa(heads, window):
    x = window_leaves(37, heads)
    q, k, v = (x[n].detach() for n in "qkv")
    pos = torch.arange(37)
    mask = None if window is None else (pos[:, None] >= pos) & (pos[:, None] - pos < window)
    assert_close("softmax", ref.softmax_attn(q, k, v, scale=0.3, window=window), sdpa(q, k, v, 0.3, mask))
