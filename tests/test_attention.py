"""The attention zoo and the swap: module forms agree, causality, limits, and swapped models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from linearize import ops
from linearize.attention import Projected, build_mixer
from linearize.attention.hooks import slot
from linearize.attention.feature_maps import FEATURE_MAPS, build_feature_map
from linearize.config import FEATURE_MAPS as CONFIG_FEATURE_MAPS
from linearize.models.load import load_teacher
from linearize.attention.hooks import attention_layers, set_mode
from linearize.models.swap import swap_attention
from linearize.ops.delta.reference import delta_attn_recurrent
from linearize.ops.gated.reference import gated_attn_quadratic
from linearize.ops.linear.reference import linear_attn_quadratic, linear_attn_step
from linearize.ops.softmax.reference import softmax_attn
from linearize.ops.window.reference import window_attn_quadratic, window_attn_step
from tests.conftest import build_config

ATTENTIONS = ("lolcats", "hedgehog", "t2r", "elu", "relu", "liger", "deltanet", "gated_deltanet")
CPU = torch.device("cpu")


def assert_close(actual, expected, *, ratio=1e-5, atol=1e-5, what=""):
    """RMSE of the difference relative to RMSE of the expected value, and the max difference."""
    diff = (actual.double() - expected.double())
    rmse_ratio = diff.pow(2).mean().sqrt() / expected.double().pow(2).mean().sqrt().clamp_min(1e-30)
    max_diff = diff.abs().max()
    assert rmse_ratio <= ratio or max_diff <= atol, (
        f"{what}: rmse ratio {rmse_ratio:.3e} (<= {ratio}), max diff {max_diff:.3e} (<= {atol})"
    )


def attention_cfg(name: str, **overrides):
    return replace(build_config(f"attention={name}").attention, **overrides)


def projected(b=2, h=4, h_kv=2, t=37, d=16, requires_grad=False) -> Projected:
    g = torch.Generator().manual_seed(t * 31 + h)
    q, k_pre = torch.randn(b, h, t, d, generator=g), torch.randn(b, h_kv, t, d, generator=g)
    v = torch.randn(b, h_kv, t, d, generator=g)
    # A stand-in rotary: any fixed invertible per-position transform serves the math here.
    angle = torch.arange(t)[:, None] * 0.1
    rot = lambda x: x * torch.cos(angle) + x.roll(1, -1) * torch.sin(angle)  # noqa: E731
    for x in (q, k_pre, v):
        x.requires_grad_(requires_grad)
    return Projected(rot(q), rot(k_pre), v, q, k_pre, d**-0.5)


def quadratic(mixer, p: Projected):
    """The mixer's output from the reference's quadratic forms (the definitions)."""
    if hasattr(mixer, "window_factor"):
        lin = mixer.linear
        fq, fk = lin.feature_q(p.q), lin.feature_k(p.k)
        if mixer.window == 0:
            return linear_attn_quadratic(fq, fk, p.v, eps=lin.eps)
        return window_attn_quadratic(
            p.q, p.k, p.v, fq, fk, window=mixer.window,
            window_factor=torch.sigmoid(mixer.window_factor), scale=p.scale, eps=lin.eps, sinks=mixer.sinks,
        )  # fmt: skip
    fq, fk = mixer.feature_q(p.q), mixer.feature_k(p.k)
    if hasattr(mixer, "rates_of"):  # the delta rule: its recurrence is the definition
        y = delta_attn_recurrent(F.normalize(fq, dim=-1), F.normalize(fk, dim=-1), p.v, *mixer.rates_of(p.k_pre))
        if mixer.window == 0:
            return y
        return mixer.mix * y + (1 - mixer.mix) * softmax_attn(p.q, p.k, p.v, scale=p.scale, window=mixer.window)
    if hasattr(mixer, "gate"):
        y = gated_attn_quadratic(fq, fk, p.v, mixer.gate(p.k_pre), scale=p.scale)
        if mixer.window == 0:
            return y
        swa = softmax_attn(p.q, p.k, p.v, scale=p.scale, window=mixer.window)
        return mixer.mix * y + (1 - mixer.mix) * swa
    return linear_attn_quadratic(fq, fk, p.v, eps=mixer.eps)


def test_feature_map_registry_matches_config_choices():
    assert set(FEATURE_MAPS) == set(CONFIG_FEATURE_MAPS)
    with pytest.raises(ValueError, match="not one of"):
        build_feature_map("cosformer", 2, 8, 8)


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_feature_maps_shapes_and_signs(name):
    fmap = build_feature_map(name, n_heads=3, head_dim=8, feature_dim=5)
    x = torch.randn(2, 3, 7, 8)
    y = fmap(x)
    assert y.shape == (2, 3, 7, fmap.out_dim)
    if name in ("hedgehog", "t2r", "elu", "relu", "softmax"):
        assert (y >= 0).all()
    if name == "hedgehog":
        assert fmap.out_dim == 10
        halves = y.split(5, dim=-1)
        for half in halves:
            torch.testing.assert_close(half.sum(-1), torch.ones(2, 3, 7))


def test_hedgehog_starts_as_softmax_of_its_input_when_square():
    fmap = build_feature_map("hedgehog", n_heads=2, head_dim=6, feature_dim=6)
    x = torch.randn(1, 2, 4, 6)
    torch.testing.assert_close(fmap(x), torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))


# Odd shapes: T=1, T < window, T not a multiple of the chunk, GQA and not, F != D.
SHAPES = [
    dict(t=1, h=4, h_kv=2), dict(t=5, h=4, h_kv=2), dict(t=37, h=4, h_kv=2),
    dict(t=63, h=2, h_kv=2), dict(t=70, h=4, h_kv=1),
]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s['t']}-H{s['h']}-KV{s['h_kv']}")
@pytest.mark.parametrize(
    "name", ATTENTIONS + ("liger-gla", "lolcats-w0", "hedgehog-f12", "lolcats-sinks", "deltanet-win",
                          "gated_deltanet-win", "gated_deltanet-key")
)  # fmt: skip
def test_module_chunked_equals_quadratic_forward_and_grads(name, shape):
    base, _, variant = name.partition("-")
    window = 0 if variant in ("w0", "gla") else 8 if variant == "win" else min(attention_cfg(base).window, 8)
    extra = dict(feature_dim=12) if variant == "f12" else dict(sinks=4) if variant == "sinks" else {}
    if variant == "key":
        extra["delta_rates"] = "key"
    if base == "lolcats" and variant != "sinks":
        extra["sinks"] = 0  # the published hybrid (the default has 4: the sinks variant)
    cfg = attention_cfg(base, chunk_size=16, window=window, **extra)
    mixer = build_mixer(cfg, shape["h"], shape["h_kv"], 16)
    with torch.no_grad():  # move the learned parts away from their special initial values
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    p = projected(t=shape["t"], h=shape["h"], h_kv=shape["h_kv"], requires_grad=True)
    y_chunked, y_quad = mixer(p), quadratic(mixer, p)
    assert_close(y_chunked, y_quad, what=f"{name} forward")
    w = torch.randn_like(y_quad)
    inputs = [p.q_pre, p.k_pre, p.v, *mixer.parameters()]
    g_chunked = torch.autograd.grad((y_chunked * w).sum(), inputs, allow_unused=True, retain_graph=True)
    g_quad = torch.autograd.grad((y_quad * w).sum(), inputs, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_chunked, g_quad)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, ratio=1e-4, atol=1e-5, what=f"{name} grad {i}")


@pytest.mark.parametrize("name", ["lolcats", "hedgehog", "lolcats-sinks"])
def test_module_chunked_equals_recurrent_steps(name):
    name, _, variant = name.partition("-")
    sinks = 4 if variant == "sinks" else 0
    cfg = attention_cfg(name, chunk_size=16, window=6, **({"sinks": sinks} if name == "lolcats" else {}))
    mixer = build_mixer(cfg, 4, 2, 16)
    p = projected(t=29)
    lin = mixer.linear if hasattr(mixer, "linear") else mixer
    fq, fk = lin.feature_q(p.q), lin.feature_k(p.k)
    state, ys = None, []
    for i in range(p.q.shape[2]):
        s = slice(i, i + 1)
        if name == "lolcats":
            y, state = window_attn_step(
                p.q[:, :, s], p.k[:, :, s], p.v[:, :, s], fq[:, :, s], fk[:, :, s], state,
                window=6, window_factor=torch.sigmoid(mixer.window_factor), scale=p.scale, eps=cfg.eps,
                sinks=sinks,
            )  # fmt: skip
        else:
            y, state = linear_attn_step(fq[:, :, s], fk[:, :, s], p.v[:, :, s], state, eps=cfg.eps)
        ys.append(y)
    assert_close(mixer(p), torch.cat(ys, 2), what=f"{name} steps")


def test_window_at_least_T_is_the_teachers_softmax():
    p = projected(t=40)
    mixer = build_mixer(attention_cfg("lolcats", window=64, eps=1e-12), 4, 2, 16)
    teacher = ops.softmax_attn(p.q, p.k, p.v, scale=p.scale)
    assert_close(mixer(p), teacher, ratio=1e-6, atol=1e-6, what="window >= T")


def test_window_zero_is_plain_linear_attention():
    p = projected(t=40)
    hybrid = build_mixer(attention_cfg("lolcats", window=0, sinks=0), 4, 2, 16)
    plain = build_mixer(attention_cfg("hedgehog"), 4, 2, 16)
    plain.load_state_dict({k.removeprefix("linear."): v for k, v in hybrid.state_dict().items() if k.startswith("linear.")})
    torch.testing.assert_close(hybrid(p), plain(p), rtol=0, atol=0)
    fq, fk = plain.feature_q(p.q), plain.feature_k(p.k)
    assert_close(hybrid(p), linear_attn_quadratic(fq, fk, p.v), what="window 0 vs reference")


def test_liger_gates_are_negative_and_parameter_free():
    mixer = build_mixer(attention_cfg("liger"), 4, 2, 16)
    assert sum(p.numel() for p in mixer.parameters()) == 0
    g = mixer.gate(torch.randn(2, 2, 9, 16) * 5)
    assert g.shape == (2, 2, 9, 16) and (g < 0).all() and (g >= -torch.inf).all()
    pooled = build_mixer(attention_cfg("liger", feature_map="hedgehog", feature_dim=4), 4, 2, 16)
    assert pooled.gate(torch.randn(1, 2, 3, 16)).shape == (1, 2, 3, 8)


def test_triton_backend_is_an_error_not_a_fallback():
    mixer = build_mixer(attention_cfg("hedgehog", backend="triton"), 4, 2, 16)
    with pytest.raises(NotImplementedError, match="attention.backend=reference"):
        mixer(projected(t=4))


# Swapped models.


def tiny(name="lolcats", *overrides):
    cfg = build_config("model=tiny-llama", f"attention={name}", *overrides)
    return cfg, load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=CPU)


def check_swapped(model, teacher_logits, x, softmax_layers=()):
    layers = model.model.layers
    for i, layer in enumerate(layers):
        is_softmax = slot(layer.self_attn) is None and not hasattr(layer.self_attn, "mixer")
        assert is_softmax == (i in softmax_layers), f"layer {i}"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".mixer." in n for n in trainable)
    set_mode(model, "teacher")
    torch.testing.assert_close(model(x).logits, teacher_logits, rtol=1e-5, atol=1e-5)
    set_mode(model, "student")
    assert torch.isfinite(model(x).logits).all()
    out = model.generate(x[:1, :6], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_swap_tiny_llama(name):
    cfg, model = tiny(name)
    x = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        teacher_logits = model(x).logits
    projections = [(l.self_attn.q_proj.weight, l.self_attn.o_proj.weight) for l in model.model.layers]
    report = swap_attention(model, cfg.attention)
    assert report.swapped == [0, 1] and report.softmax == []
    for (q, o), layer in zip(projections, model.model.layers):
        assert layer.self_attn.q_proj.weight is q and layer.self_attn.o_proj.weight is o
    assert report.new_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    check_swapped(model, teacher_logits, x)


def test_softmax_layers_are_kept():
    cfg, model = tiny("hedgehog", "attention.softmax_layers=[1]")
    x = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        teacher_logits = model(x).logits
    report = swap_attention(model, cfg.attention)
    assert report.swapped == [0] and report.softmax == [1]
    check_swapped(model, teacher_logits, x, softmax_layers=(1,))


def test_causality_future_tokens_do_not_change_the_past():
    for name in ATTENTIONS:
        cfg, model = tiny(name)
        swap_attention(model, cfg.attention)
        x = torch.randint(0, 1000, (1, 50))
        y = x.clone()
        y[0, 30:] = torch.randint(0, 1000, (20,))
        with torch.no_grad():
            a, b = model(x).logits, model(y).logits
        torch.testing.assert_close(a[:, :30], b[:, :30], rtol=0, atol=0, msg=name)
        assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_transfer_mode_collects_both_and_passes_the_teacher_on():
    cfg, model = tiny("lolcats")
    x = torch.randint(0, 1000, (1, 30))
    with torch.no_grad():
        teacher_logits = model(x).logits
    swap_attention(model, cfg.attention)
    seen = {}
    for layer in attention_layers(model):
        layer.collector = lambda i, s, t, p: seen.__setitem__(i, (s, t))
    set_mode(model, "transfer")
    out = model(x).logits
    torch.testing.assert_close(out, teacher_logits, rtol=1e-5, atol=1e-5)
    assert sorted(seen) == [0, 1]
    student, teacher = seen[0]
    assert student.shape == teacher.shape == (1, 4, 30, 16)
    assert student.requires_grad and not teacher.requires_grad
    loss = F.mse_loss(student, teacher)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".mixer." in n for n in grads)


def test_swap_errors_name_the_problem():
    cfg, model = tiny("hedgehog", "attention.softmax_layers=[5]")
    with pytest.raises(ValueError, match=r"out of range for 2 layers \(0..1\)"):
        swap_attention(model, cfg.attention)
    cfg, model = tiny("softmax")
    with pytest.raises(ValueError, match="nothing to swap"):
        swap_attention(model, cfg.attention)
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no module of this 'bloom' model called transformers' AttentionInterface"):
        swap_attention(bloom, build_config("attention=hedgehog").attention)
    cfg, model = tiny("hedgehog")
    swap_attention(model, cfg.attention)
    with pytest.raises(ValueError, match="converted already"):
        swap_attention(model, cfg.attention)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_swap_other_families(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        teacher_logits = model(x).logits
    swap_attention(model, build_config("attention=lolcats").attention)
    assert len(attention_layers(model)) == 2
    set_mode(model, "teacher")
    torch.testing.assert_close(model(x).logits, teacher_logits, rtol=1e-5, atol=1e-5)
    set_mode(model, "student")
    assert torch.isfinite(model(x).logits).all()


@pytest.mark.slow
def test_swap_real_smollm2():
    cfg = build_config("model=smollm2-135m", "attention=lolcats", "attention.softmax_layers=[0,29]")
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=CPU)
    x = torch.randint(0, 49152, (1, 80))
    with torch.no_grad():
        teacher_logits = model(x).logits
    report = swap_attention(model, cfg.attention)
    assert len(report.swapped) == 28 and report.softmax == [0, 29]
    # per layer: hedgehog q (9 heads) and k (3 KV heads) maps of 64x64, plus 9 window factors
    assert report.new_parameters == 28 * ((9 + 3) * 64 * 64 + 9)
    with torch.no_grad():
        check_swapped(model, teacher_logits, x, softmax_layers=(0, 29))


def test_sinks_need_the_window_hybrid_and_have_no_triton_kernel_yet():
    with pytest.raises(ValueError, match=r"attention.sinks=4 needs the window hybrid.*kind=linear"):
        build_config("attention=hedgehog", "attention.sinks=4")
    with pytest.raises(ValueError, match=r"attention.sinks=4 needs.*window=0"):
        build_config("attention=lolcats", "attention.window=0", "attention.sinks=4")
    with pytest.raises(ValueError, match=r"attention.backend=triton has no kernel for attention.sinks=4"):
        build_config("attention=lolcats", "attention.backend=triton")  # the default lolcats has 4
    p = projected(t=9)
    fq = fk = torch.rand(2, 4, 9, 8)
    with pytest.raises(ops.BackendUnavailableError, match="no kernel for attention.sinks=4"):
        ops.window_attn(p.q, p.k, p.v, fq, fk[:, :2], window=4, window_factor=torch.full((4,), 0.5),
                        scale=p.scale, sinks=4, backend="triton")  # fmt: skip
