"""Stage 1: the objective, the loop's resume and checkpoints, keep_softmax, and a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from linearize import ops
from linearize.attention.hooks import attention_layers
from linearize.config import validate
from linearize.models.swap import swap_attention
from linearize.models.trainable import trainable_state
from linearize.stages.preflight import preflight
from linearize.stages.prepare import prepare
from linearize.stages.transfer import run as run_transfer
from linearize.train import checkpoint, loop
from linearize.train.transfer import TransferObjective
from tests.conftest import build_config, compose_config, data_root, kill_on_call

TINY = ("model=tiny-llama", "data.max_examples=120", "data.seq_len=64", "data.val_fraction=0.1")


def prepared(tmp_path: Path, *overrides: str):
    dc = compose_config(*TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}", *overrides)
    return prepare(validate(dc), dc)


class SoftmaxMixer(nn.Module):
    """A 'student' that is the teacher: softmax attention, with one unused-by-math parameter."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, p):
        return ops.softmax_attn(p.q, p.k, p.v, scale=p.scale) * self.scale


def test_loss_is_exactly_zero_when_student_is_teacher(tmp_path):
    prep = prepared(tmp_path, "stage=transfer", "attention=hedgehog")
    model = prep.teacher
    swap_attention(model, prep.config.attention)
    for layer in attention_layers(model):
        layer.mixer = SoftmaxMixer()
    objective = TransferObjective(attention_layers(model), mse_weight=1000.0)
    loss, parts = objective.loss(model, prep.data.train.input_ids[:2], prep.data.train.labels[:2])
    assert loss.item() == 0.0 and parts["mse"] == 0.0


def test_only_new_parameters_get_gradients(tmp_path):
    # window 8 < T = 64, so the linear part (and its feature maps) takes part in every row
    prep = prepared(tmp_path, "stage=transfer", "attention=lolcats", "attention.window=8")
    model = prep.teacher
    swap_attention(model, prep.config.attention)
    objective = TransferObjective(attention_layers(model), mse_weight=1000.0)
    loss, _ = objective.loss(model, prep.data.train.input_ids[:2], prep.data.train.labels[:2])
    assert loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        if ".mixer." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("xent_weight", [0.0, 0.5])
def test_per_layer_backward_gives_the_gradients_of_the_whole_loss(tmp_path, xent_weight):
    prep = prepared(tmp_path, "stage=transfer", "attention=lolcats", "attention.window=8")
    model = prep.teacher
    swap_attention(model, prep.config.attention)
    objective = TransferObjective(attention_layers(model), mse_weight=1000.0, xent_weight=xent_weight)
    batch = prep.data.train.input_ids[:2]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    whole, _ = objective.loss(model, batch, batch)
    whole.backward()
    expected = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    shares = []
    loss, _ = objective.loss_and_backward(model, batch, batch, lambda t: (shares.append(t.item()), t.backward()))
    assert len(shares) == len(attention_layers(model)) == 2  # one backward per layer
    assert not loss.requires_grad and loss.item() == pytest.approx(whole.item(), rel=1e-6)
    assert sum(shares) == pytest.approx(whole.item(), rel=1e-6)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7, msg=n)


def _train(tmp_path, out: Path, *, resume=False, crash_at_call=None):
    prep = prepared(tmp_path, "stage=transfer", "attention=lolcats", "attention.window=8",
                    "train.max_steps=6", "train.eval_every=1", "train.grad_accum=2",
                    "train.batch_size=2", "train.eval_batches=1")  # fmt: skip
    model = prep.teacher
    swap_attention(model, prep.config.attention)
    objective = TransferObjective(attention_layers(model), mse_weight=1000.0)
    if crash_at_call is not None:
        kill_on_call(objective, crash_at_call)
    state = loop.train(
        model, objective, prep.data.train, prep.data.val, prep.config.train, out,
        accelerator=Accelerator(cpu=True), seed=0, resume=resume,
    )  # fmt: skip
    return state, trainable_state(model)


def test_kill_after_step_3_then_resume_equals_uninterrupted(tmp_path):
    full_state, full = _train(tmp_path / "a", tmp_path / "a" / "out")
    assert full_state.step == 6
    out = tmp_path / "b" / "out"
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", out, crash_at_call=7)  # first micro-batch of step 4
    assert (out / "checkpoints" / "latest").read_text() == "step-0000003"
    resumed_state, resumed = _train(tmp_path / "b", out, resume=True)
    assert resumed_state.step == 6
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    assert [h["step"] for h in resumed_state.history] == [h["step"] for h in full_state.history]


@pytest.mark.parametrize("when", ["validation", "step"])
def test_non_finite_layer_is_named_with_the_step(tmp_path, when):
    prep = prepared(tmp_path, "stage=transfer", "attention=lolcats", "attention.window=8",
                    "train.max_steps=2", "train.batch_size=2", "train.eval_batches=1")  # fmt: skip
    model = prep.teacher
    swap_attention(model, prep.config.attention)
    objective = TransferObjective(attention_layers(model), mse_weight=1000.0)

    def poison_layer_1():
        with torch.no_grad():
            for p in attention_layers(model)[1].mixer.parameters():
                p.fill_(float("nan"))

    if when == "validation":
        poison_layer_1()  # before the step-0 validation
    else:
        real = objective.loss_and_backward
        objective.loss_and_backward = lambda *a: (poison_layer_1(), real(*a))[1]
    with pytest.raises(FloatingPointError) as err:
        loop.train(model, objective, prep.data.train, prep.data.val, prep.config.train, tmp_path / "out",
                   accelerator=Accelerator(cpu=True), seed=0, resume=False)  # fmt: skip
    where = "validation after step 0" if when == "validation" else "step 1"
    assert str(err.value) == (
        f"{where}: the transfer MSE of layer(s) [1] is not finite; the last checkpoint is intact. "
        "Lower train.lr or check the data."
    )


def test_crash_while_writing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = checkpoint.save_file

    def failing_save(tensors, path, *a, **kw):
        if "step-0000002" in str(Path(path).parent) or ".step-0000002" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(tensors, path, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        _train(tmp_path, out)
    assert (out / "checkpoints" / "latest").read_text() == "step-0000001"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000001"]
    assert checkpoint.latest_checkpoint(out).name == "step-0000001"


def test_keep_softmax_sets_the_worst_layers_back(tmp_path):
    prep = prepared(tmp_path, "stage=transfer", "attention=hedgehog", "attention.keep_softmax=1",
                    "train.max_steps=2", "train.eval_every=1", "train.grad_accum=1")  # fmt: skip
    out = run_transfer(prep)
    result = json.loads((out / "result.json").read_text())
    per_layer = {int(k): v for k, v in result["val_mse_per_layer"].items()}
    worst = max(per_layer, key=per_layer.get)
    assert result["kept_softmax"] == [worst] and result["softmax_layers"] == [worst]
    assert result["swapped"] == [i for i in (0, 1) if i != worst]
    from transformers.models.llama.modeling_llama import LlamaAttention

    assert isinstance(prep.teacher.model.layers[worst].self_attn, LlamaAttention)
    assert [layer.layer_idx for layer in attention_layers(prep.teacher)] == result["swapped"]
    assert (out / "transfer_report.png").stat().st_size > 10_000
    assert result["history"][0]["step"] == 0 and "val/val_loss" in result["history"][0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("attention=liger",), "has no new parameters"),
        (("attention=elu",), "has no new parameters"),
        (("attention=softmax",), "needs a linear attention"),
    ],
)
def test_transfer_preflight_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        preflight(build_config("stage=transfer", *TINY, f"data_dir={data_root()}", *overrides))


def test_too_little_data_for_one_step():
    from linearize.config import TrainConfig

    with pytest.raises(ValueError, match="no optimizer step"):
        loop.plan_steps(TrainConfig(batch_size=4, grad_accum=8, epochs=1), n_rows=20, world=1)


def test_data_order_is_a_function_of_seed_and_index():
    from linearize.data import Split

    split = Split(torch.arange(40).view(20, 2), torch.arange(40).view(20, 2), examples=20)
    a = loop.micro_batch(split, seed=1, index=3, rows=2, rank=0, world=1)[0]
    assert torch.equal(a, loop.micro_batch(split, seed=1, index=3, rows=2, rank=0, world=1)[0])
    # two ranks split what one process with twice the rows sees
    both = loop.micro_batch(split, seed=1, index=3, rows=4, rank=0, world=1)[0]
    r0 = loop.micro_batch(split, seed=1, index=3, rows=2, rank=0, world=2)[0]
    r1 = loop.micro_batch(split, seed=1, index=3, rows=2, rank=1, world=2)[0]
    assert torch.equal(torch.cat([r0, r1]), both)
    # an epoch visits every row once
    seen = torch.cat([loop.micro_batch(split, 1, i, 2, 0, 1)[0] for i in range(10)])
    assert sorted(seen[:, 0].tolist()) == list(range(0, 40, 2))


@pytest.mark.slow
def test_real_smollm2_transfer_lowers_validation_mse(tmp_path):
    dc = compose_config(
        "stage=transfer", "model=smollm2-135m", "attention=lolcats", f"data_dir={data_root()}",
        f"run.dir={tmp_path}", "data.max_examples=300", "data.seq_len=128", "train.max_steps=12",
        "train.eval_every=6", "train.grad_accum=1", "train.batch_size=2", "train.eval_batches=2",
    )  # fmt: skip
    prep = prepare(validate(dc), dc)
    out = run_transfer(prep)
    result = json.loads((out / "result.json").read_text())
    vals = [h["val/mse"] for h in result["history"] if "val/mse" in h]
    print(f"SmolLM2-135M lolcats transfer, val MSE by eval: {vals}")
    assert len(vals) == 3 and vals[-1] < 0.7 * vals[0], vals
    assert len(result["val_mse_per_layer"]) == 30


def test_joint_and_blockwise_give_the_same_per_layer_losses(tmp_path):
    from linearize.data import Split
    from linearize.train.blockwise import Block, cache_hidden_states, load_boundary

    prep = prepared(tmp_path, "stage=transfer", "attention=lolcats", "attention.window=8")
    model = prep.teacher
    swap_attention(model, prep.config.attention)
    batch = prep.data.train.input_ids[:3]
    joint = TransferObjective(attention_layers(model), 1.0).layer_mse(model, batch)
    cache = tmp_path / "cache"
    cache_hidden_states(model, Split(batch, batch, 3), [0, 1], cache, shard_rows=2, batch_size=2)
    for i in (0, 1):
        block = Block(model, i, i + 1)
        objective = TransferObjective(attention_layers(block), 1.0, forward=lambda m, x: m(x))
        blockwise = objective.layer_mse(block, load_boundary(cache, i))
        assert list(blockwise) == [i]
        torch.testing.assert_close(blockwise[i], joint[i], rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma3_text", "gpt_neox"])
def test_blockwise_refuses_a_family_whose_blocks_are_not_its_layers(family):
    """Mistral's sliding-window layers need their mask, Gemma 3 a rotary per layer type and
    GPT-NeoX has no model.model.layers: run as blocks they would train on wrong targets."""
    from dataclasses import replace

    from linearize.models.families import tiny_model
    from linearize.train.blockwise import block_bounds, check_blocks

    model = tiny_model(family)
    swap_attention(model, replace(build_config("attention=lolcats").attention, window=4, convert="all"))
    sample = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    bounds = block_bounds(model.config.num_hidden_layers, 1)
    if family in ("llama", "qwen3"):
        check_blocks(model, bounds, sample)  # the layers alone are the model's own
        return
    with pytest.raises(NotImplementedError, match="use transfer.mode=joint"):
        check_blocks(model, bounds, sample)


def test_hidden_cache_resumes_without_recomputing_or_keeping_torn_shards(tmp_path, monkeypatch):
    from linearize.data import Split
    from linearize.train import blockwise

    prep = prepared(tmp_path, "stage=transfer", "attention=hedgehog")
    model = prep.teacher
    swap_attention(model, prep.config.attention)
    split = Split(prep.data.train.input_ids[:5], prep.data.train.labels[:5], 5)
    cache = tmp_path / "cache"
    real_save = blockwise.save_file

    def dies_on_third(tensors, path):
        if "shard-00002" in str(path):
            Path(path).write_bytes(b"torn")  # a half-written file, then the kill
            raise KeyboardInterrupt("simulated kill")
        return real_save(tensors, path)

    monkeypatch.setattr(blockwise, "save_file", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        blockwise.cache_hidden_states(model, split, [0, 1], cache, shard_rows=2, batch_size=2)
    monkeypatch.setattr(blockwise, "save_file", real_save)
    assert sorted(p.name for p in cache.iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors",
    ]  # fmt: skip
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")}
    blockwise.cache_hidden_states(model, split, [0, 1], cache, shard_rows=2, batch_size=2)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-0000[01]*")} == stamps
    full = blockwise.load_boundary(cache, 1)
    assert full.shape == (5, 64, 64)
    fresh = tmp_path / "fresh"
    blockwise.cache_hidden_states(model, split, [0, 1], fresh, shard_rows=2, batch_size=2)
    assert torch.equal(blockwise.load_boundary(fresh, 1), full)
    other = Split(prep.data.train.input_ids[5:10], prep.data.train.labels[5:10], 5)
    with pytest.raises(ValueError, match="caches other data"):
        blockwise.cache_hidden_states(model, other, [0, 1], cache, shard_rows=2, batch_size=2)


def test_blockwise_run_writes_the_same_kind_of_result_as_joint(tmp_path):
    results = {}
    for mode in ("joint", "blockwise"):
        prep = prepared(tmp_path / mode, "stage=transfer", "attention=lolcats", f"transfer.mode={mode}",
                        "data.max_examples=40", "train.max_steps=2", "train.eval_every=1",
                        "train.grad_accum=1")  # fmt: skip
        out = run_transfer(prep)
        from safetensors.torch import load_file

        results[mode] = (json.loads((out / "result.json").read_text()), load_file(out / "attention.safetensors"))
    (joint, joint_w), (block, block_w) = results["joint"], results["blockwise"]
    assert joint_w.keys() == block_w.keys() and len(joint_w) == 6
    assert joint["val_mse_per_layer"].keys() == block["val_mse_per_layer"].keys()
    assert block["swapped"] == joint["swapped"] == [0, 1]


def test_attention_weight_cross_entropy(tmp_path):
    prep = prepared(tmp_path, "stage=transfer", "attention=lolcats", "transfer.xent_weight=1.0")
    model = prep.teacher
    swap_attention(model, prep.config.attention)
    batch = prep.data.train.input_ids[:2]
    entropies = {}

    def teacher_entropy(i, student, teacher, p):
        w = ops.softmax_weights(p.q, p.k, scale=p.scale)
        entropies[i] = -(w * w.clamp_min(1e-12).log()).sum(-1).mean()

    for layer in attention_layers(model):
        layer.mode, layer.collector = "transfer", teacher_entropy
    with torch.no_grad():
        model(input_ids=batch, logits_to_keep=1)
    # window 64 >= T = 64: the student's weights are the teacher's (up to the normalizer's
    # eps), so the cross-entropy equals the teacher's entropy, its minimum.
    objective = TransferObjective(attention_layers(model), 0.0, xent_weight=1.0)
    terms = objective.layer_terms(model, batch)
    assert sorted(terms) == [0, 1]
    for i, t in terms.items():
        torch.testing.assert_close(t["xent"], entropies[i], rtol=1e-4, atol=1e-5)
    # With a window of 8 the student differs: the cross-entropy exceeds the entropy, and its
    # gradient reaches every new parameter.
    for layer in attention_layers(model):
        layer.mixer.window = 8
    loss, parts = objective.loss(model, batch, batch)
    assert parts["xent"] > sum(float(e) for e in entropies.values()) / len(entropies)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".mixer." in n)


def test_weights_reproduce_the_quadratic_outputs():
    from linearize.ops.linear.reference import linear_attn_quadratic, linear_attn_weights
    from linearize.ops.softmax.reference import softmax_attn, softmax_weights
    from linearize.ops.window.reference import window_attn_quadratic, window_attn_weights

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 20, 8, generator=g) for _ in range(3))
    fq, fk = q.softmax(-1), k.softmax(-1)
    wf = torch.full((4,), 0.3)
    torch.testing.assert_close(linear_attn_weights(fq, fk) @ v, linear_attn_quadratic(fq, fk, v))
    torch.testing.assert_close(
        window_attn_weights(q, k, fq, fk, window=5, window_factor=wf, scale=0.3) @ v,
        window_attn_quadratic(q, k, v, fq, fk, window=5, window_factor=wf, scale=0.3),
    )
    torch.testing.assert_close(softmax_weights(q, k, scale=0.3, window=5) @ v,
                               softmax_attn(q, k, v, scale=0.3, window=5))  # fmt: skip
