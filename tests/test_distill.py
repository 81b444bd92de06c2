"""``finetune.objective=kd|kd+ntp``: distillation from the teacher's logits, which come from the
same model object (adapters disabled, layers in teacher mode, no graph)."""

from __future__ import annotations

import pytest
import torch

from linearize.config import validate
from linearize.models.convert import build_adapter
from linearize.models.load import load_teacher
from linearize.models.swap import swap_attention
from linearize.stages.preflight import check_values
from linearize.train.objectives import DistillObjective, kd_loss, make_objective, teacher_view
from tests.conftest import build_config, compose_config
from tests.test_finetune import TINY, prepared
from tests.test_finetune import perturb_adapter as perturb


def test_kd_loss_is_zero_exactly_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert kd_loss(logits, logits, 1.0).item() == 0.0 and kd_loss(logits, logits, 2.0).item() == 0.0
    other = logits + torch.randn(2, 5, 11)
    assert kd_loss(other, logits, 1.0).item() > 0
    p, q = torch.softmax(logits, -1), torch.softmax(other, -1)  # by hand: mean over positions
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(other, logits, 1.0), by_hand, rtol=1e-5, atol=1e-6)


def test_kd_is_exactly_zero_when_the_student_computes_the_teachers_function(tmp_path):
    prep = prepared(tmp_path, "attention.softmax_layers=[0,1]")  # nothing linear: the student is the teacher
    swap_attention(prep.teacher, prep.config.attention)
    model = build_adapter(prep.teacher, prep.config.adapter)  # LoRA starts as a no-op (B = 0)
    loss, parts = DistillObjective(1.0, 1.0).loss(model, prep.data.train.input_ids[:2], prep.data.train.labels[:2])
    assert parts["kd"] == 0.0 and loss.item() == 0.0


def test_the_teacher_view_is_the_original_model_and_gradients_reach_only_the_adapter(tmp_path):
    prep = prepared(tmp_path)
    cfg = prep.config
    original = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"), seed=cfg.run.seed)
    x, y = prep.data.train.input_ids[:2], prep.data.train.labels[:2]
    with torch.no_grad():
        expected = original(input_ids=x).logits
    swap_attention(prep.teacher, cfg.attention)
    model = build_adapter(prep.teacher, cfg.adapter)
    perturb(model)  # adapters that change the output
    with torch.no_grad(), teacher_view(model):
        got = model(input_ids=x).logits
    assert (got - expected).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (model(input_ids=x).logits - expected).abs().max().item() > 1e-3  # the student again
    loss, parts = make_objective(validate(compose_config(*TINY, "finetune.objective=kd+ntp")).finetune).loss(model, x, y)
    assert parts["kd"] > 0 and parts["ntp"] > 0
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad} and grads
    assert all("lora_" in n for n in grads)


def test_distillation_lowers_the_kl_on_its_batch(tmp_path):
    prep = prepared(tmp_path)
    swap_attention(prep.teacher, prep.config.attention)
    model = build_adapter(prep.teacher, prep.config.adapter).train()
    objective = DistillObjective(1.0, 1.0)
    x, y = prep.data.train.input_ids[:2], prep.data.train.labels[:2]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    kd = []
    for _ in range(6):
        loss, parts = objective.loss(model, x, y)
        kd.append(parts["kd"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert kd[-1] < 0.8 * kd[0], kd


def test_kd_kill_and_resume_equals_uninterrupted(tmp_path):
    from tests.test_finetune import _finetune

    state, full = _finetune(tmp_path / "a", tmp_path / "a" / "out", "finetune.objective=kd")
    assert len([h for h in state.history if "val/kd" in h]) == 7  # step 0 and every step
    out = tmp_path / "b" / "out"
    with pytest.raises(KeyboardInterrupt):
        _finetune(tmp_path / "b", out, "finetune.objective=kd", crash_at_call=7)
    state, resumed = _finetune(tmp_path / "b", out, "finetune.objective=kd", resume=True)
    assert state.step == 6 and resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


@pytest.mark.parametrize("overrides,message", [
    (("stage=uptrain", "attention=supra", "train.trainable=all"), "train.trainable=all trains the teacher's own weights"),
    (("stage=finetune", "adapter=pissa"), "adapter=pissa (init_lora_weights=pissa) rewrites the base weights"),
])  # fmt: skip
def test_distillation_from_a_changed_teacher_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_values(build_config(*TINY, *overrides, "finetune.objective=kd"))
    check_values(build_config(*TINY, *overrides, "finetune.objective=ntp"))


def test_uptrain_distils_too(tmp_path):
    from linearize.stages.uptrain import run as run_uptrain

    prep = prepared(tmp_path, "stage=uptrain", "attention=supra", "train.trainable=new", "train.max_steps=1",
                    "train.eval_every=1", "train.eval_batches=1", "finetune.objective=kd")  # fmt: skip
    check_values(prep.config)
    run_uptrain(prep)
    from linearize.rundir import read_manifest

    history = read_manifest(tmp_path / "uptrain")["history"]
    assert "val/kd" in history[-1] and "train/kd" in history[-1]
