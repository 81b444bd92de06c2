"""SUPRA attention against a direct quadratic computation written here, and its three forms."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from linearize.attention import Projected, build_mixer
from linearize.attention.supra import alibi_slopes, log_decays
from tests.conftest import build_config


def supra(h=4, h_kv=2, d=16, **overrides):
    cfg = replace(build_config("attention=supra").attention, chunk_size=8, **overrides)
    mixer = build_mixer(cfg, h, h_kv, d).double()
    with torch.no_grad():  # off the identity start, so every parameter matters
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def projected(b=2, h=4, h_kv=2, t=21, d=16, requires_grad=False) -> Projected:
    g = torch.Generator().manual_seed(t)
    q_pre = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k_pre = torch.randn(b, h_kv, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, t, d, generator=g, dtype=torch.float64)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * 0.1
    rot = lambda x: x * torch.cos(angle) + x.roll(1, -1) * torch.sin(angle)  # noqa: E731
    for x in (q_pre, k_pre, v):
        x.requires_grad_(requires_grad)
    return Projected(rot(q_pre), rot(k_pre), v, q_pre, k_pre, d**-0.5, lambda a, b: (rot(a), rot(b)))


def direct(mixer, p: Projected) -> torch.Tensor:
    """SUPRA written out: affine + ReLU, rotary, k / sqrt(d), γ^(i-j) weights, GroupNorm."""
    b, h, t, d = p.q_pre.shape
    h_kv = p.k_pre.shape[1]
    q = torch.relu(p.q_pre.transpose(1, 2).reshape(b, t, h * d) @ mixer.map_q.weight.T + mixer.map_q.bias)
    k = torch.relu(p.k_pre.transpose(1, 2).reshape(b, t, h_kv * d) @ mixer.map_k.weight.T + mixer.map_k.bias)
    q, k = p.rotate(q.view(b, t, h, d).transpose(1, 2), k.view(b, t, h_kv, d).transpose(1, 2))
    k = (k / d**0.5).repeat_interleave(h // h_kv, 1)
    v = p.v.repeat_interleave(h // h_kv, 1)
    gamma = mixer.log_decay.double().exp()  # (H,)
    i = torch.arange(t)
    power = (i[:, None] - i[None, :]).double()  # (T, T)
    decay = torch.where(power >= 0, gamma[:, None, None] ** power.clamp_min(0), 0.0)  # (H, T, T)
    y = ((q @ k.mT) * decay) @ v  # (B, H, T, D)
    norm = nn.GroupNorm(h, h * d, eps=mixer.eps, affine=False)
    return norm(y.transpose(1, 2).reshape(b * t, h * d)).view(b, t, h, d).transpose(1, 2)


@pytest.mark.parametrize("decay", ["lightning", "retnet", "none"])
@pytest.mark.parametrize("t", [1, 7, 21])
def test_chunked_forward_and_grads_match_the_direct_computation(decay, t):
    mixer = supra(decay=decay)
    p = projected(t=t, requires_grad=True)
    y = mixer(p)
    ref = direct(mixer, p)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    w = torch.randn_like(y)
    params = [*mixer.parameters(), p.q_pre, p.k_pre, p.v]
    grads = torch.autograd.grad((y * w).sum(), params)
    expected = torch.autograd.grad((ref * w).sum(), params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_prefill_then_steps_equal_the_whole_sequence():
    mixer = supra()
    p = projected(t=21)
    whole = mixer(p)

    def part(a, b):
        cut = lambda x: x[:, :, a:b]  # noqa: E731
        angle = torch.arange(a, b, dtype=torch.float64)[:, None] * 0.1
        rot = lambda x: x * torch.cos(angle) + x.roll(1, -1) * torch.sin(angle)  # noqa: E731
        return Projected(cut(p.q), cut(p.k), cut(p.v), cut(p.q_pre), cut(p.k_pre), p.scale, lambda x, y: (rot(x), rot(y)))

    y, state = mixer.extend(part(0, 10), None)
    outs = [y]
    for s in range(10, 21):
        y, state = mixer.extend(part(s, s + 1), state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=1e-9, atol=1e-9)


def test_decays_and_identity_start():
    assert alibi_slopes(8) == [2.0 ** -(h + 1) for h in range(8)]
    assert len(alibi_slopes(9)) == 9 and alibi_slopes(9)[8] == 2.0 ** -0.5
    torch.testing.assert_close(log_decays("retnet", 3).exp(), torch.tensor([1 - 2**-5, 1 - 2**-6, 1 - 2**-7]))
    assert torch.equal(log_decays("none", 4), torch.zeros(4))
    mixer = build_mixer(build_config("attention=supra").attention, 4, 2, 16)
    assert torch.equal(mixer.map_q.weight, torch.eye(64)) and torch.equal(mixer.map_k.bias, torch.zeros(32))
    assert {n for n, _ in mixer.named_parameters()} == {"map_q.weight", "map_q.bias", "map_k.weight", "map_k.bias"}
