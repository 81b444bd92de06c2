"""The reference ops agree with themselves (quadratic == chunked == step loop, forward and every
gradient), with hand-written definitions, and with torch's SDPA where they reduce to softmax.

Inputs are fp64 unless a test says otherwise, so the forms must agree to rounding (1e-9); one test
holds the fp32 path, which kernels are compared against, to fp32 tolerance.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from linearize.ops import reference as ref

B, D = 2, 16
HEADS = {"mha": (4, 4), "gqa": (4, 2)}
DIMS = {"F16": 16, "F24": 24}  # feature dim equal to / different from the head dim


def assert_close(name, got, want, ratio=None, atol=None):
    """Pass when rmse(got - want) / rmse(want) <= ratio or max |got - want| <= atol.

    Defaults: 1e-9 / 1e-10 when want is fp64 (the forms must agree up to rounding, so even a
    misplaced eps shows), 1e-5 / 1e-5 otherwise.
    """
    tight = want.dtype == torch.float64
    ratio = (1e-9 if tight else 1e-5) if ratio is None else ratio
    atol = (1e-10 if tight else 1e-5) if atol is None else atol
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    diff = (got.double() - want.double()).abs()
    max_diff = diff.max().item() if diff.numel() else 0.0
    rmse_want = want.double().pow(2).mean().sqrt().item()
    err_ratio = diff.pow(2).mean().sqrt().item() / rmse_want if rmse_want > 0 else float("inf")
    msg = f"{name}: rmse ratio {err_ratio:.3e}, max abs diff {max_diff:.3e}"
    assert err_ratio <= ratio or max_diff <= atol, msg


def _leaf(x):
    return x.detach().double().requires_grad_()


def _features(*shape):
    return torch.softmax(torch.randn(*shape), -1)  # non-negative, as a hedgehog / Liger map gives


def _run_with_grads(fn, inputs, weight=None):
    """Forward fn(**inputs), then grads of a random-weighted output sum w.r.t. every input."""
    y = fn(**inputs)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) if weight is None else weight
    weight = weight.to(y.dtype)
    # Keys still inside the window at the end never reach the step form's graph: zero, not None.
    grads = torch.autograd.grad((y * weight).sum(), list(inputs.values()), materialize_grads=True)
    return y, dict(zip(inputs, grads)), weight


def _assert_same_with_grads(impls, inputs):
    """Every implementation in impls gives the first one's output and gradients."""
    names = list(impls)
    y0, g0, w = _run_with_grads(impls[names[0]], inputs)
    for name in names[1:]:
        y, g, _ = _run_with_grads(impls[name], inputs, w)
        assert_close(f"{name} y", y, y0)
        for key in inputs:
            assert_close(f"{name} d{key}", g[key], g0[key])


def _step_loop(step, inputs, static=(), state=None, **kw):
    """Run a step function token by token over the time dim (2) of inputs not named in static."""
    ys = []
    for t in range(inputs["v"].shape[2]):
        x = {n: (v if n in static else v[:, :, t : t + 1]) for n, v in inputs.items()}
        y, state = step(**x, state=state, **kw)
        ys.append(y)
    return torch.cat(ys, 2), state


def _linear_inputs(t, heads, f=16):
    h, hk = HEADS[heads]
    return {
        "q": _leaf(_features(B, h, t, f)),
        "k": _leaf(_features(B, hk, t, f)),
        "v": _leaf(torch.randn(B, hk, t, D)),
    }


def _window_inputs(t, heads, f=16):
    h, hk = HEADS[heads]
    return {
        "q": _leaf(torch.randn(B, h, t, D)),
        "k": _leaf(torch.randn(B, hk, t, D)),
        "v": _leaf(torch.randn(B, hk, t, D)),
        "fq": _leaf(_features(B, h, t, f)),
        "fk": _leaf(_features(B, hk, t, f)),
        "window_factor": _leaf(torch.rand(h) * 0.8 + 0.1),
    }


def _gated_inputs(t, heads, gate, f=16):
    h, hk = HEADS[heads]
    g_shape = (B, hk, t, f) if gate == "feature" else (B, hk, t)
    return {
        "q": _leaf(torch.randn(B, h, t, f)),
        "k": _leaf(torch.randn(B, hk, t, f) * f**-0.5),
        "v": _leaf(torch.randn(B, hk, t, D)),
        "g": _leaf(F.logsigmoid(torch.randn(g_shape)) / 4),
    }


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Ops here are tiny: waking a second thread per op costs more than the math on a busy CPU.
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHUNK_CASES = list(itertools.product([1, 7, 63, 130], [16, 64], HEADS))
CHUNK_IDS = [f"T{t}-C{c}-{h}" for t, c, h in CHUNK_CASES]
STEP_CASES = list(itertools.product([1, 7, 63, 130], HEADS))
STEP_IDS = [f"T{t}-{h}" for t, h in STEP_CASES]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("t,chunk,heads", CHUNK_CASES, ids=CHUNK_IDS)
@pytest.mark.parametrize("f", DIMS.values(), ids=DIMS.keys())
def test_linear_chunked_matches_quadratic(t, chunk, heads, f, normalize):
    impls = {
        "quadratic": lambda **x: ref.linear_attn_quadratic(**x, normalize=normalize),
        "chunked": lambda **x: ref.linear_attn_chunked(**x, chunk_size=chunk, normalize=normalize),
    }
    _assert_same_with_grads(impls, _linear_inputs(t, heads, f))


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("t,heads", STEP_CASES, ids=STEP_IDS)
def test_linear_step_matches_quadratic(t, heads, normalize):
    impls = {
        "quadratic": lambda **x: ref.linear_attn_quadratic(**x, normalize=normalize),
        "step": lambda **x: _step_loop(ref.linear_attn_step, x, normalize=normalize)[0],
    }
    _assert_same_with_grads(impls, _linear_inputs(t, heads, f=24))


@pytest.mark.parametrize("sinks", [0, 4], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("window", [1, 4, 64], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("t,chunk,heads", CHUNK_CASES, ids=CHUNK_IDS)
def test_window_chunked_matches_quadratic(t, chunk, heads, window, sinks):
    kw = {"window": window, "scale": D**-0.5, "sinks": sinks}
    impls = {
        "quadratic": lambda **x: ref.window_attn_quadratic(**x, **kw),
        "chunked": lambda **x: ref.window_attn_chunked(**x, **kw, chunk_size=chunk),
    }
    _assert_same_with_grads(impls, _window_inputs(t, heads, f=24 if heads == "gqa" else 16))  # F != D too


@pytest.mark.parametrize("sinks", [0, 4], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("window", [1, 4, 64], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("t,heads", STEP_CASES, ids=STEP_IDS)
def test_window_step_matches_quadratic(t, heads, window, sinks):
    kw = {"window": window, "scale": D**-0.5, "sinks": sinks}
    impls = {
        "quadratic": lambda **x: ref.window_attn_quadratic(**x, **kw),
        "step": lambda **x: _step_loop(ref.window_attn_step, x, static=("window_factor",), **kw)[0],
    }
    _assert_same_with_grads(impls, _window_inputs(t, heads, f=24))


@pytest.mark.parametrize("gate", ["feature", "scalar"])
@pytest.mark.parametrize("t,chunk,heads", CHUNK_CASES, ids=CHUNK_IDS)
def test_gated_chunked_matches_quadratic(t, chunk, heads, gate):
    impls = {
        "quadratic": lambda **x: ref.gated_attn_quadratic(**x, scale=0.5),
        "chunked": lambda **x: ref.gated_attn_chunked(**x, scale=0.5, chunk_size=chunk),
    }
    _assert_same_with_grads(impls, _gated_inputs(t, heads, gate, f=24 if heads == "gqa" else 16))  # F != D too


@pytest.mark.parametrize("gate", ["feature", "scalar"])
@pytest.mark.parametrize("t,heads", STEP_CASES, ids=STEP_IDS)
def test_gated_step_matches_quadratic(t, heads, gate):
    impls = {
        "quadratic": lambda **x: ref.gated_attn_quadratic(**x, scale=0.5),
        "step": lambda **x: _step_loop(ref.gated_attn_step, x, scale=0.5)[0],
    }
    _assert_same_with_grads(impls, _gated_inputs(t, heads, gate))


def _split_impls(chunked, step, split, static=(), **kw):
    """One chunked call; two chunked calls passing the state; a chunked prefill then a step loop.

    static names inputs that have no time dim (window_factor).
    """

    def halves(x):
        first = {n: (v if n in static else v[:, :, :split]) for n, v in x.items()}
        rest = {n: (v if n in static else v[:, :, split:]) for n, v in x.items()}
        return first, rest

    def two_calls(**x):
        first, rest = halves(x)
        y1, state = chunked(**first, output_final_state=True, **kw)
        y2, _ = chunked(**rest, initial_state=state, output_final_state=True, **kw)
        return torch.cat([y1, y2], 2)

    def prefill_then_step(**x):
        first, rest = halves(x)
        y1, state = chunked(**first, output_final_state=True, **kw)
        step_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
        y2, _ = _step_loop(step, rest, static, state=state, **step_kw)
        return torch.cat([y1, y2], 2)

    return {"one call": lambda **x: chunked(**x, **kw), "two calls": two_calls, "prefill+step": prefill_then_step}


@pytest.mark.parametrize("heads", HEADS)
def test_linear_state_continues(heads):
    impls = _split_impls(ref.linear_attn_chunked, ref.linear_attn_step, 29, chunk_size=16)
    _assert_same_with_grads(impls, _linear_inputs(63, heads))


@pytest.mark.parametrize("sinks", [0, 4], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("window", [1, 4, 64], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("heads", HEADS)
def test_window_state_continues(heads, window, sinks):
    kw = {"window": window, "scale": D**-0.5, "chunk_size": 16, "sinks": sinks}
    impls = _split_impls(ref.window_attn_chunked, ref.window_attn_step, 29, static=("window_factor",), **kw)
    _assert_same_with_grads(impls, _window_inputs(63, heads))


@pytest.mark.parametrize("split", [2, 5, 11])
def test_window_state_continues_while_the_sinks_fill(split):
    """A state made before every sink has left the window: the next keys to leave are sinks."""
    kw = {"window": 3, "scale": D**-0.5, "chunk_size": 4, "sinks": 6}
    impls = _split_impls(ref.window_attn_chunked, ref.window_attn_step, split, static=("window_factor",), **kw)
    _assert_same_with_grads(impls, _window_inputs(23, "gqa"))
    x = {n: t.detach() for n, t in _window_inputs(23, "gqa").items()}
    _, state = ref.window_attn_chunked(**x, **kw, output_final_state=True)
    assert state.sk.shape[2] == 6 and torch.equal(state.sk, ref.expand_kv(x["k"][:, :, :6].double(), 4))
    assert torch.equal(state.sv, ref.expand_kv(x["v"][:, :, :6].double(), 4))


def test_window_sinks_definition():
    """Each query: softmax (max-shifted) over its window and the first `sinks` keys, the linear
    scores over its other earlier keys, one normalizer; written out by hand."""
    t, window, sinks, scale, eps = 20, 4, 3, 0.5, 1e-6
    x = {n: v.detach() for n, v in _window_inputs(t, "mha").items()}
    got = ref.window_attn_quadratic(**x, window=window, scale=scale, sinks=sinks, eps=eps)
    want = torch.zeros_like(got)
    for b, h, i in itertools.product(range(B), range(4), range(t)):
        f = x["window_factor"][h]
        soft = [j for j in range(i + 1) if i - j < window or j < sinks]
        linear = [j for j in range(i + 1) if j not in soft]
        s = torch.stack([scale * x["q"][b, h, i] @ x["k"][b, h, j] for j in soft])
        e = torch.exp(s - s.max())
        a = [x["fq"][b, h, i] @ x["fk"][b, h, j] for j in linear]
        num = f * sum(e_ * x["v"][b, h, j] for e_, j in zip(e, soft)) + (1 - f) * sum(a_ * x["v"][b, h, j] for a_, j in zip(a, linear))
        den = f * e.sum() + (1 - f) * sum(a, torch.tensor(0.0, dtype=e.dtype))
        want[b, h, i] = num / (den + eps)
    assert_close("sinks", got, want)
    no_sinks = ref.window_attn_quadratic(**x, window=window, scale=scale, eps=eps)
    assert (no_sinks - got)[:, :, window:].abs().max() > 1e-3  # a sink leaves the window at query `window`
    torch.testing.assert_close(no_sinks[:, :, :window], got[:, :, :window], rtol=0, atol=1e-12)


@pytest.mark.parametrize("gate", ["feature", "scalar"])
@pytest.mark.parametrize("heads", HEADS)
def test_gated_state_continues(heads, gate):
    impls = _split_impls(ref.gated_attn_chunked, ref.gated_attn_step, 29, chunk_size=16)
    _assert_same_with_grads(impls, _gated_inputs(63, heads, gate))


FAMILIES = {  # inputs, (quadratic, chunked, step), keyword arguments, inputs without a time dim
    "linear": (
        lambda: _linear_inputs(63, "gqa", f=24),
        (ref.linear_attn_quadratic, ref.linear_attn_chunked, ref.linear_attn_step),
        {},
        (),
    ),
    "window": (
        lambda: _window_inputs(63, "gqa", f=24),
        (ref.window_attn_quadratic, ref.window_attn_chunked, ref.window_attn_step),
        {"window": 4, "scale": D**-0.5},
        ("window_factor",),
    ),
    "gated-feature": (
        lambda: _gated_inputs(63, "gqa", "feature"),
        (ref.gated_attn_quadratic, ref.gated_attn_chunked, ref.gated_attn_step),
        {"scale": 0.5},
        (),
    ),
    "gated-scalar": (
        lambda: _gated_inputs(63, "gqa", "scalar"),
        (ref.gated_attn_quadratic, ref.gated_attn_chunked, ref.gated_attn_step),
        {"scale": 0.5},
        (),
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_forms_match_fp64(family):
    """The fp32 path (what kernels are compared against) stays within fp32 tolerance of fp64."""
    make, (quadratic, chunked, step), kw, static = FAMILIES[family]
    x64 = make()
    x32 = {n: v.detach().float().requires_grad_() for n, v in x64.items()}
    y64, g64, w = _run_with_grads(lambda **a: quadratic(**a, **kw), x64)
    for name, fn in {
        "quadratic": lambda **a: quadratic(**a, **kw),
        "chunked": lambda **a: chunked(**a, **kw, chunk_size=16),
        "step": lambda **a: _step_loop(step, a, static, **kw)[0],
    }.items():
        y32, g32, _ = _run_with_grads(fn, x32, w)
        assert y32.dtype == torch.float32
        assert_close(f"{name} y", y32, y64.float())
        for n in x32:
            assert_close(f"{name} d{n}", g32[n], g64[n].float())


def test_window_final_state_holds_last_keys():
    x = _window_inputs(10, "mha")
    _, state = ref.window_attn_chunked(**x, window=4, scale=D**-0.5, chunk_size=3, output_final_state=True)
    assert_close("cached k", state.k, x["k"][:, :, -3:])  # window 4 = the next query + 3 cached keys
    assert_close("cached v", state.v, x["v"][:, :, -3:])
    assert_close("cached fk", state.fk, x["fk"][:, :, -3:])
    assert_close("S", state.S, x["fk"][:, :, :7].mT @ x["v"][:, :, :7])
    assert_close("z", state.z, x["fk"][:, :, :7].sum(2))


def _sdpa(q, k, v, scale, mask=None):
    rep = q.shape[1] // k.shape[1]  # expanded here by hand, independent of ref.expand_kv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("t", [7, 63])
@pytest.mark.parametrize("heads", HEADS)
def test_window_beyond_length_is_softmax(t, heads):
    x = {n: v.detach() for n, v in _window_inputs(t, heads).items()}
    want = _sdpa(x["q"], x["k"], x["v"], D**-0.5)
    # eps=0: with no linear terms the normalizer is f * sum(exp) >= f > 0, and eps would bias it.
    for window in (t, 64):
        got = ref.window_attn_quadratic(**x, window=window, scale=D**-0.5, eps=0.0)
        assert_close(f"window {window}", got, want)
        got = ref.window_attn_chunked(**x, window=window, scale=D**-0.5, eps=0.0, chunk_size=16)
        assert_close(f"chunked window {window}", got, want)


@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("heads", HEADS)
def test_window_factor_one_is_windowed_softmax(heads, window):
    x = {n: v.detach() for n, v in _window_inputs(63, heads).items()}
    x["window_factor"] = torch.ones_like(x["window_factor"])
    # eps=0: the softmax sum is >= 1 (its max term is e^0), and eps would bias it by up to 1e-6.
    got = ref.window_attn_quadratic(**x, window=window, scale=D**-0.5, eps=0.0)
    assert_close("hybrid f=1", got, ref.softmax_attn(x["q"], x["k"], x["v"], scale=D**-0.5, window=window))


def test_window_large_logits_stay_finite():
    x = _window_inputs(63, "gqa")
    x["q"] = _leaf(x["q"] * 100)
    for name, fn in {
        "quadratic": lambda **a: ref.window_attn_quadratic(**a, window=8, scale=D**-0.5),
        "chunked": lambda **a: ref.window_attn_chunked(**a, window=8, scale=D**-0.5, chunk_size=16),
    }.items():
        y, grads, _ = _run_with_grads(fn, x)
        assert torch.isfinite(y).all(), name
        assert all(torch.isfinite(g).all() for g in grads.values()), name


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window", [None, 1, 5])
def test_softmax_attn_matches_sdpa(heads, window):
    x = _window_inputs(37, heads)
    q, k, v = (x[n].detach() for n in "qkv")
    pos = torch.arange(37)
    mask = None if window is None else (pos[:, None] >= pos) & (pos[:, None] - pos < window)
    assert_close("softmax", ref.softmax_attn(q, k, v, scale=0.3, window=window), _sdpa(q, k, v, 0.3, mask))


def test_linear_quadratic_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]]).view(1, 1, 3, 2)
    k = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]]).view(1, 1, 3, 2)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).view(1, 1, 3, 2)
    want = torch.zeros(1, 1, 3, 2)
    for i in range(3):
        weights = [float(q[0, 0, i] @ k[0, 0, j]) for j in range(i + 1)]
        for j, w in enumerate(weights):
            want[0, 0, i] += w * v[0, 0, j] / sum(weights)
    # Rows by hand: v0; (v0 + v1) / 2; (2 v0 + 2 v2) / 4.
    assert_close("loop", want, torch.tensor([[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]]).view(1, 1, 3, 2))
    assert_close("linear", ref.linear_attn_quadratic(q, k, v), want)


@pytest.mark.parametrize("gate", ["feature", "scalar"])
def test_gated_zero_gate_is_linear(gate):
    x = {n: v.detach() for n, v in _gated_inputs(37, "gqa", gate).items()}
    x["g"] = torch.zeros_like(x["g"])
    want = 0.5 * ref.linear_attn_quadratic(x["q"], x["k"], x["v"], normalize=False)
    assert_close("quadratic", ref.gated_attn_quadratic(**x, scale=0.5), want)
    assert_close("chunked", ref.gated_attn_chunked(**x, scale=0.5, chunk_size=16), want)


def test_gated_constant_decay_matches_loop():
    q, k, v, _ = (x.detach() for x in _gated_inputs(37, "mha", "scalar").values())
    gamma = 1 - 2.0 ** (-1 - torch.arange(4.0, dtype=torch.float64))  # RetNet-like, but strong
    g = gamma.log().view(1, 4, 1).expand(B, 4, 37)
    s = torch.zeros(B, 4, 16, D, dtype=torch.float64)
    want = []
    for t in range(37):
        s = gamma.view(1, 4, 1, 1) * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        want.append(q[:, :, t, None] @ s)
    want = torch.cat(want, 2)
    assert_close("quadratic", ref.gated_attn_quadratic(q, k, v, g), want)
    assert_close("chunked", ref.gated_attn_chunked(q, k, v, g, chunk_size=16), want)


@pytest.mark.parametrize("gate", ["feature", "scalar"])
def test_gated_chunked_strong_decay_stays_finite(gate):
    """Gates down to -40 a token over 300 tokens: the cumulative log decay passes -1000, far
    outside exp's fp32 range, so every exponent must be a span sum taken before exp."""
    x = {n: v.detach() for n, v in _gated_inputs(300, "gqa", gate).items()}
    x["g"] = -40 * torch.rand_like(x["g"])
    assert x["g"].sum(2).max() < -1000
    want, final = _step_loop(ref.gated_attn_step, x, scale=0.5)
    got, got_final = ref.gated_attn_chunked(**x, scale=0.5, chunk_size=32, output_final_state=True)
    assert torch.isfinite(got).all() and torch.isfinite(got_final.S).all()
    assert_close("chunked", got, want)
    assert_close("final state", got_final.S, final.S)


def test_gated_chunked_far_decaying_blocks_are_redone_exactly():
    """Per-feature gates, mild everywhere but strong (down to -150 a token) in one head over
    tokens 40-71: those blocks' cumulative decay passes e^-30, where the factorised product
    e^G_i e^-G_j is clamped (unclamped, e^-G_j overflows even fp64), so they are recomputed
    pair by pair; the others are not. Forward and gradients against the quadratic form, fp64."""
    x = {n: v.detach().double() for n, v in _gated_inputs(100, "mha", "feature").items()}
    g = x["g"].clone()
    g[:, 1, 40:72] = -150 * torch.rand_like(g[:, 1, 40:72])
    x["g"] = g
    assert g[:, 1, 48:64].sum(1).max() < -710  # the 16-token block from 48: e^710 overflows fp64
    assert g[:, 0, :96].unflatten(1, (6, 16)).sum(2).min() > -30  # head 0's blocks are not
    x = {n: v.requires_grad_() for n, v in x.items()}
    want = ref.gated_attn_quadratic(**x, scale=0.5)
    got = ref.gated_attn_chunked(**x, scale=0.5, chunk_size=64)
    assert_close("chunked", got, want)
    cot = torch.randn_like(want)
    for (name, gw), gg in zip(x.items(), torch.autograd.grad(got, list(x.values()), cot)):
        (ww,) = torch.autograd.grad(want, gw, cot, retain_graph=True)
        assert_close(f"grad {name}", gg, ww)


def test_gqa_equals_pre_expanded():
    lin = {n: v.detach() for n, v in _linear_inputs(37, "gqa").items()}
    win = {n: v.detach() for n, v in _window_inputs(37, "gqa").items()}
    gat = {n: v.detach() for n, v in _gated_inputs(37, "gqa", "feature").items()}

    def expanded(x):
        return {n: (v.repeat_interleave(2, 1) if n in ("k", "v", "fk", "g") else v) for n, v in x.items()}

    wkw = {"window": 4, "scale": D**-0.5}
    for name, fn, x in [
        ("linear", ref.linear_attn_quadratic, lin),
        ("linear chunked", lambda **a: ref.linear_attn_chunked(**a, chunk_size=16), lin),
        ("window", lambda **a: ref.window_attn_quadratic(**a, **wkw), win),
        ("window chunked", lambda **a: ref.window_attn_chunked(**a, **wkw, chunk_size=16), win),
        ("gated", ref.gated_attn_quadratic, gat),
        ("gated chunked", lambda **a: ref.gated_attn_chunked(**a, chunk_size=16), gat),
        ("softmax", lambda **a: ref.softmax_attn(a["q"], a["k"], a["v"], scale=0.25), win),
    ]:
        assert_close(name, fn(**x), fn(**expanded(x)))


def test_expand_kv_head_mapping():
    x = torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 5, 4)
    y = ref.expand_kv(x, 6)
    assert y.shape == (2, 6, 5, 4)
    assert [int(y[0, h, 0, 0]) for h in range(6)] == [h // 2 for h in range(6)]
    assert ref.expand_kv(x, 3) is x


def test_dtype_round_trip():
    x = {n: v.detach().bfloat16() for n, v in _linear_inputs(7, "gqa").items()}
    y = ref.linear_attn_chunked(**x, chunk_size=4)
    assert y.dtype == torch.bfloat16
    want = ref.linear_attn_quadratic(*(x[n].float() for n in "qkv"))
    assert_close("bf16", y.float(), want, ratio=1e-2, atol=1e-2)
    _, state = ref.linear_attn_chunked(**x, chunk_size=4, output_final_state=True)
    assert state.S.dtype == torch.float32


def test_bad_arguments_raise():
    lin = _linear_inputs(7, "mha")
    win = _window_inputs(7, "mha")
    q, k, v = lin["q"], lin["k"], lin["v"]
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        ref.window_attn_quadratic(**win, window=0, scale=1.0)
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        ref.softmax_attn(q, k, v, scale=1.0, window=0)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        ref.linear_attn_chunked(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got -3"):
        ref.gated_attn_chunked(q, k, v, torch.zeros(B, 4, 7), chunk_size=-3)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        ref.window_attn_chunked(**win, window=2, scale=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="q has 4 heads, not a multiple of the 3 heads of k"):
        ref.linear_attn_quadratic(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
        ref.expand_kv(k[:, :3], 4)
    with pytest.raises(ValueError, match="sequence lengths differ: q T=7, k T=6, v T=7"):
        ref.linear_attn_quadratic(q, k[:, :, :6], v)
    with pytest.raises(ValueError, match="sequence lengths differ: fq T=7, fk T=5"):
        ref.window_attn_quadratic(**{**win, "fk": win["fk"][:, :, :5]}, window=2, scale=1.0)
    with pytest.raises(ValueError, match=r"window_factor must be a tensor of shape \(4,\)"):
        ref.window_attn_quadratic(**{**win, "window_factor": torch.ones(2)}, window=2, scale=1.0)
    with pytest.raises(ValueError, match=r"g has shape \(2, 4, 6\)"):
        ref.gated_attn_quadratic(q, k, v, torch.zeros(B, 4, 6))
    with pytest.raises(ValueError, match="a step takes one token, got T=7"):
        ref.linear_attn_step(q, k, v)
    _, state = ref.window_attn_chunked(**win, window=4, scale=1.0, output_final_state=True)
    one_token = {n: (x if n == "window_factor" else x[:, :, :1]) for n, x in win.items()}
    with pytest.raises(ValueError, match="state caches 3 keys but window=2 keeps at most 1"):
        ref.window_attn_step(**one_token, state=state, window=2, scale=1.0)
