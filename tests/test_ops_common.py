"""What every kind's reference shares (`linearize.ops.common`): the GQA expansion (keys at fewer
heads give what pre-expanded keys give) and the input checks, whose errors name the bad value."""

from __future__ import annotations

import pytest
import torch

from linearize.ops.common import expand_kv
from linearize.ops.gated.reference import gated_attn_chunked, gated_attn_quadratic
from linearize.ops.linear.reference import (
    linear_attn_chunked,
    linear_attn_quadratic,
    linear_attn_step,
)
from linearize.ops.softmax.reference import softmax_attn
from linearize.ops.window.reference import (
    window_attn_chunked,
    window_attn_quadratic,
    window_attn_step,
)
from tests.ops_testing import B, D, assert_close, gated_leaves, linear_leaves, window_leaves

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")


def test_gqa_equals_pre_expanded():
    lin = {n: v.detach() for n, v in linear_leaves(37, "gqa").items()}
    win = {n: v.detach() for n, v in window_leaves(37, "gqa").items()}
    gat = {n: v.detach() for n, v in gated_leaves(37, "gqa", "feature").items()}

    def expanded(x):
        return {n: (v.repeat_interleave(2, 1) if n in ("k", "v", "fk", "g") else v) for n, v in x.items()}

    wkw = {"window": 4, "scale": D**-0.5}
    for name, fn, x in [
        ("linear", linear_attn_quadratic, lin),
        ("linear chunked", lambda **a: linear_attn_chunked(**a, chunk_size=16), lin),
        ("window", lambda **a: window_attn_quadratic(**a, **wkw), win),
        ("window chunked", lambda **a: window_attn_chunked(**a, **wkw, chunk_size=16), win),
        ("gated", gated_attn_quadratic, gat),
        ("gated chunked", lambda **a: gated_attn_chunked(**a, chunk_size=16), gat),
        ("softmax", lambda **a: softmax_attn(a["q"], a["k"], a["v"], scale=0.25), win),
    ]:
        assert_close(name, fn(**x), fn(**expanded(x)))


def test_expand_kv_head_mapping():
    x = torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 5, 4)
    y = expand_kv(x, 6)
    assert y.shape == (2, 6, 5, 4)
    assert [int(y[0, h, 0, 0]) for h in range(6)] == [h // 2 for h in range(6)]
    assert expand_kv(x, 3) is x


def test_bad_arguments_raise():
    lin = linear_leaves(7, "mha")
    win = window_leaves(7, "mha")
    q, k, v = lin["q"], lin["k"], lin["v"]
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        window_attn_quadratic(**win, window=0, scale=1.0)
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        softmax_attn(q, k, v, scale=1.0, window=0)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        linear_attn_chunked(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got -3"):
        gated_attn_chunked(q, k, v, torch.zeros(B, 4, 7), chunk_size=-3)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        window_attn_chunked(**win, window=2, scale=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="q has 4 heads, not a multiple of the 3 heads of k"):
        linear_attn_quadratic(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
        expand_kv(k[:, :3], 4)
    with pytest.raises(ValueError, match="sequence lengths differ: q T=7, k T=6, v T=7"):
        linear_attn_quadratic(q, k[:, :, :6], v)
    with pytest.raises(ValueError, match="sequence lengths differ: fq T=7, fk T=5"):
        window_attn_quadratic(**{**win, "fk": win["fk"][:, :, :5]}, window=2, scale=1.0)
    with pytest.raises(ValueError, match=r"window_factor must be a tensor of shape \(4,\)"):
        window_attn_quadratic(**{**win, "window_factor": torch.ones(2)}, window=2, scale=1.0)
    with pytest.raises(ValueError, match=r"g has shape \(2, 4, 6\)"):
        gated_attn_quadratic(q, k, v, torch.zeros(B, 4, 6))
    with pytest.raises(ValueError, match="a step takes one token, got T=7"):
        linear_attn_step(q, k, v)
    _, state = window_attn_chunked(**win, window=4, scale=1.0, output_final_state=True)
    one_token = {n: (x if n == "window_factor" else x[:, :, :1]) for n, x in win.items()}
    with pytest.raises(ValueError, match="state caches 3 keys but window=2 keeps at most 1"):
        window_attn_step(**one_token, state=state, window=2, scale=1.0)
