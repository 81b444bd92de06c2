"""Local lm-eval tasks and perplexity: documents, prompts, targets and scores equal the standard
harness tasks' (checked by hand from the raw files and against lm-eval's own task configs)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lm_eval.tasks
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from datasets import DatasetDict

from linearize.evaluate.harness import LOCAL_TASKS, evaluate, missing_data, task_manager
from linearize.evaluate.perplexity import perplexity, wikitext2_text, window_targets
from linearize.evaluate.tasks import local_data, mmlu_subjects
from tests.conftest import data_root

STANDARD_TASKS = Path(lm_eval.tasks.__file__).parent
MMLU_CHECKED = ("abstract_algebra", "us_foreign_policy")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return data_root()


@pytest.fixture(scope="module")
def eval_dir(data_dir) -> Path:
    return data_dir / "eval"


def tiny_llama(tokenizer, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), **overrides,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def local_tasks(data_dir) -> dict:
    """Every local task built by lm-eval, keyed by its name (MMLU subjects by subject)."""
    names = [spec.local for spec in LOCAL_TASKS.values()]
    tasks = task_manager(data_dir).load(names)["tasks"]
    return {name.rsplit("::mmlu_local_", 1)[-1]: task for name, task in tasks.items()}


def jsonl(path: Path, n: int = 3) -> list[dict]:
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(n)]


# Hand-made (context, choices, gold) from the raw files, following the standard task definitions.
def hand_piqa(eval_dir, n=3):
    labels = (eval_dir / "piqa/valid-labels.lst").read_text().split()
    return [
        (f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(labels[i]))
        for i, d in enumerate(jsonl(eval_dir / "piqa/valid.jsonl", n))
    ]


def hand_arc(eval_dir, subset, n=3):
    return [
        (f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
         d["choices"]["label"].index(d["answerKey"]))
        for d in jsonl(eval_dir / f"arc/{subset}-test.jsonl", n)
    ]  # fmt: skip


def hand_hellaswag(eval_dir, n=3):
    # Item 0 reads "...on a roof. he": the hub task has "He" (ctx_b capitalised), which the text
    # form cannot reproduce, having joined ctx_a and ctx_b (the documented difference).
    lines = (eval_dir / "hellaswag/hellaswag_val_full.txt").read_text().split("\n")
    return [(lines[6 * i], lines[6 * i + 2 : 6 * i + 6], int(lines[6 * i + 1])) for i in range(n)]


def hand_winogrande(eval_dir, n=3):
    """Partial evaluation: one context per option (the sentence up to the blank, filled in),
    scored on the shared rest of the sentence."""
    out = []
    for d in jsonl(eval_dir / "winogrande/dev.jsonl", n):
        blank = d["sentence"].index("_")
        contexts = [d["sentence"][:blank] + d[key] for key in ("option1", "option2")]
        out.append((contexts, d["sentence"][blank + 1 :].strip(), int(d["answer"]) - 1))
    return out


def mmlu_rows(eval_dir, subject, split):
    with open(eval_dir / f"mmlu/{split}/{subject}_{split}.csv", newline="") as f:
        return list(csv.reader(f))


def mmlu_block(row, with_answer: bool) -> str:
    question, a, b, c, d, answer = row
    text = f"{question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    return text + f" {answer}\n\n" if with_answer else text


def hand_mmlu(eval_dir, subject, n=3):
    topic = subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
    shots = "".join(mmlu_block(row, True) for row in mmlu_rows(eval_dir, subject, "dev")[:5])
    return [
        (header + shots + mmlu_block(row, False), ["A", "B", "C", "D"], "ABCD".index(row[5]))
        for row in mmlu_rows(eval_dir, subject, "test")[:n]
    ]


HAND = {
    "piqa_local": hand_piqa,
    "arc_easy_local": lambda e: hand_arc(e, "ARC-Easy"),
    "arc_challenge_local": lambda e: hand_arc(e, "ARC-Challenge"),
    "hellaswag_local": hand_hellaswag,
    **{s: (lambda e, s=s: hand_mmlu(e, s)) for s in MMLU_CHECKED},
}


@pytest.mark.parametrize("name", list(HAND))
def test_prompts_choices_targets_match_hand(name, local_tasks, eval_dir):
    task = local_tasks[name]
    docs = task.eval_docs  # hellaswag's process_docs runs on every access
    shots = 5 if name in MMLU_CHECKED else 0
    for i, (context, choices, gold) in enumerate(HAND[name](eval_dir)):
        doc = docs[i]
        assert task.fewshot_context(doc, shots) == context
        assert task.doc_to_choice(doc) == choices
        assert task.doc_to_target(doc) == gold


def test_winogrande_partial_evaluation_matches_hand(local_tasks, eval_dir):
    task = local_tasks["winogrande_local"]
    docs = task.eval_docs
    for i, (contexts, continuation, gold) in enumerate(hand_winogrande(eval_dir)):
        doc = docs[i]
        assert task.fewshot_context(doc, 0) == contexts
        assert task.doc_to_target(doc) == continuation
        assert task.doc_to_text(doc) == gold
    labels = (eval_dir / "winogrande/dev-labels.lst").read_text().split()
    assert docs["answer"] == labels


def test_documents_match_raw_files(local_tasks, eval_dir):
    piqa = jsonl(eval_dir / "piqa/valid.jsonl")
    labels = (eval_dir / "piqa/valid-labels.lst").read_text().split()
    for i, raw in enumerate(piqa):
        assert local_tasks["piqa_local"].eval_docs[i] == {**raw, "label": int(labels[i])}
    for name, subset in (("arc_easy_local", "ARC-Easy"), ("arc_challenge_local", "ARC-Challenge")):
        assert local_tasks[name].eval_docs[:3] == {
            key: [row[key] for row in jsonl(eval_dir / f"arc/{subset}-test.jsonl")]
            for key in ("id", "question", "choices", "answerKey")
        }
    raw = mmlu_rows(eval_dir, "abstract_algebra", "test")[0]
    assert local_tasks["abstract_algebra"].eval_docs[0] == {
        "question": raw[0], "subject": "abstract_algebra", "choices": raw[1:5],
        "answer": "ABCD".index(raw[5]),
    }  # fmt: skip
    sizes = {"piqa_local": 1838, "arc_easy_local": 2376, "arc_challenge_local": 1172,
             "hellaswag_local": 10042, "winogrande_local": 1267}  # fmt: skip
    assert {name: len(local_tasks[name].eval_docs) for name in sizes} == sizes
    assert sum(len(local_tasks[s].eval_docs) for g in mmlu_subjects().values() for s in g) == 14042


def test_hellaswag_cleaning_is_the_harness_cleaning(local_tasks):
    # Item 3505 of the text form kept a bracketed URL; the harness's preprocess drops it.
    query = local_tasks["hellaswag_local"].eval_docs[3505]["query"]
    assert "[www.kiddio.org]" not in query and "Visit a site like to find" in query


def standard_task(yaml_path: str, dataset: DatasetDict):
    """lm-eval's own task config, fed our documents instead of the hub's (first 5 per split)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(STANDARD_TASKS / yaml_path)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    small = DatasetDict({k: v.select(range(min(5, len(v)))) for k, v in dataset.items()})
    cfg["custom_dataset"] = lambda **_: small
    for split in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(split) is not None and cfg[split] not in small:
            cfg[split] = None  # a split the local copy does not hold (train); no prompt uses it
    return ConfigurableTask(config=cfg)


STANDARD = {  # local task: (lm-eval's yaml, our reader, its dataset_kwargs)
    "piqa_local": ("piqa/piqa.yaml", "piqa", {}),
    "arc_easy_local": ("arc/arc_easy.yaml", "arc", {"subset": "ARC-Easy"}),
    "arc_challenge_local": ("arc/arc_challenge.yaml", "arc", {"subset": "ARC-Challenge"}),
    "hellaswag_local": ("hellaswag/hellaswag.yaml", "hellaswag", {}),
    "winogrande_local": ("winogrande/default.yaml", "winogrande", {}),
    **{s: (f"mmlu/default/mmlu_{s}.yaml", "mmlu", {"subject": s}) for s in MMLU_CHECKED},
}


@pytest.mark.parametrize("name", list(STANDARD))
def test_same_requests_as_the_standard_task(name, local_tasks, data_dir):
    path, reader, kwargs = STANDARD[name]
    dataset = getattr(local_data, f"load_{reader}")(data_dir, **kwargs)
    standard, local = standard_task(path, dataset), local_tasks[name]
    assert (standard.OUTPUT_TYPE, standard.config.metric_list) == (
        local.OUTPUT_TYPE, local.config.metric_list
    )
    shots = LOCAL_TASKS["mmlu"].num_fewshot if name in MMLU_CHECKED else 0
    assert local.config.num_fewshot == standard.config.num_fewshot  # none: shots are per run
    standard_docs, local_docs = standard.eval_docs, local.eval_docs
    for i in range(3):
        doc, ours = standard_docs[i], local_docs[i]
        assert standard.fewshot_context(doc, shots) == local.fewshot_context(ours, shots)
        assert standard.doc_to_choice(doc) == local.doc_to_choice(ours)
        assert standard.doc_to_target(doc) == local.doc_to_target(ours)


def test_mmlu_subjects_and_descriptions_are_the_harness_ones(local_tasks):
    from lm_eval.tasks._yaml_loader import load_yaml

    standard: dict[str, set[str]] = {}
    descriptions = {}
    for path in sorted((STANDARD_TASKS / "mmlu/default").glob("mmlu_*.yaml")):
        cfg = load_yaml(path, resolve_func=False)
        standard.setdefault(cfg["tag"].removesuffix("_tasks"), set()).add(cfg["dataset_name"])
        descriptions[cfg["dataset_name"]] = cfg["description"]
    ours = {group.replace("_local", ""): set(s) for group, s in mmlu_subjects().items()}
    assert ours == standard and sum(map(len, ours.values())) == 57
    for subject, description in descriptions.items():
        task = local_tasks[subject]
        assert task.resolve_field(task.eval_docs[0], task.config.description) == description


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), tokenized as context + continuation and
    split where the context's own tokens end."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = tokenizer(context + continuation, add_special_tokens=False).input_ids[len(ctx) :]
    ids = ctx + cont
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), logits_to_keep=len(cont)).logits[0]
    logp = F.log_softmax(logits.float(), -1)  # (len(cont), V)
    return logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()


def hand_scores(model, tokenizer, items) -> tuple[list[float], list[float]]:
    """Per-item acc and acc_norm (log-likelihood over the choice's length in characters)."""
    acc, acc_norm = [], []
    for context, choices, gold in items:
        lls = np.array([loglikelihood(model, tokenizer, context, " " + c) for c in choices])
        acc.append(float(np.argmax(lls) == gold))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in choices])) == gold))
    return acc, acc_norm


def test_scores_equal_hand_computation(model, tokenizer, data_dir, eval_dir):
    report = evaluate(model, tokenizer, ["piqa", "arc_easy"], data_dir=data_dir, limit=3)
    hand = {"piqa": hand_piqa(eval_dir), "arc_easy": hand_arc(eval_dir, "ARC-Easy")}
    for task, items in hand.items():
        acc, acc_norm = hand_scores(model, tokenizer, items)
        row = report[task]
        assert row["n"] == 3 and row["metric"] == LOCAL_TASKS[task].metric
        assert row["metrics"]["acc"] == pytest.approx(np.mean(acc))
        assert row["metrics"]["acc_norm"] == pytest.approx(np.mean(acc_norm))
        assert row["value"] == row["metrics"][row["metric"]]
        assert row["stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(3))


def test_loglikelihoods_equal_hand_computation(model, tokenizer, eval_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    pairs = [(ctx, " " + c) for ctx, choices, _ in hand_arc(eval_dir, "ARC-Easy") for c in choices]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    harness = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    ours = [loglikelihood(model, tokenizer, *pair) for pair in pairs]
    assert harness == pytest.approx(ours, abs=1e-4)


def test_mmlu_is_the_size_weighted_mean_over_subjects(tokenizer, data_dir, eval_dir):
    # A short context window keeps 57 five-shot prompts quick; lm-eval cuts them from the left.
    model = tiny_llama(tokenizer, max_position_embeddings=128)
    row = evaluate(model, tokenizer, ["mmlu"], data_dir=data_dir, limit=1, batch_size=4)["mmlu"]
    acc = []
    for group in mmlu_subjects().values():
        for context, letters, gold in (hand_mmlu(eval_dir, s, n=1)[0] for s in group):
            # Each answer " A".." D" is one token, so one forward on the (cut) context scores all.
            ctx = tokenizer(context, add_special_tokens=False).input_ids
            answers = [
                tokenizer(context + " " + x, add_special_tokens=False).input_ids[len(ctx) :]
                for x in letters
            ]
            assert all(len(a) == 1 for a in answers)
            with torch.no_grad():
                logits = model(torch.tensor([ctx[-128:]]), logits_to_keep=1).logits[0, -1]
            acc.append(float(logits[[a[0] for a in answers]].argmax() == gold))
    assert row["n"] == 57 and row["metric"] == "acc"
    assert row["value"] == pytest.approx(np.mean(acc))


def test_local_files_are_where_the_tasks_read_them(data_dir, local_tasks):
    assert {task: missing_data(task, data_dir) for task in LOCAL_TASKS} == {
        task: [] for task in LOCAL_TASKS
    }
    for task, spec in LOCAL_TASKS.items():
        if spec.data_kwargs:  # the files missing_data checks are the ones the task reads
            assert local_tasks[spec.local].config.dataset_kwargs == spec.data_kwargs


def test_missing_data_is_reported_not_dropped(model, tokenizer, data_dir, tmp_path):
    (tmp_path / "eval/piqa").mkdir(parents=True)
    for name in ("valid.jsonl", "valid-labels.lst"):
        (tmp_path / "eval/piqa" / name).symlink_to(data_dir / "eval/piqa" / name)
    for split in ("test", "dev"):
        (tmp_path / "eval/mmlu" / split).mkdir(parents=True)
        for src in (data_dir / "eval/mmlu" / split).glob("*.csv"):
            if src.name != "anatomy_dev.csv":
                (tmp_path / "eval/mmlu" / split / src.name).symlink_to(src)
    assert missing_data("mmlu", tmp_path) == [tmp_path / "eval/mmlu/dev/anatomy_dev.csv"]

    report = evaluate(model, tokenizer, ["arc_easy", "mmlu", "piqa"], data_dir=tmp_path, limit=2)
    assert list(report) == ["arc_easy", "mmlu", "piqa"]
    assert str(tmp_path / "eval/arc/ARC-Easy-test.jsonl") in report["arc_easy"]["skipped"]
    assert str(tmp_path / "eval/mmlu/dev/anatomy_dev.csv") in report["mmlu"]["skipped"]
    assert report["piqa"]["n"] == 2
    with pytest.raises(ValueError, match="data_dir"):
        evaluate(model, tokenizer, ["piqa"])
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, tokenizer, ["boolq"], data_dir=data_dir)


TEXT = (
    "The quick brown fox jumps over the lazy dog. Linear attention replaces the softmax with a "
    "feature map, so the state is a fixed-size matrix and each new token costs the same. "
) * 3


def direct_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ids[1:], each token given all tokens before it. ids: (N,) -> (N - 1,)"""
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def test_perplexity_in_one_window_is_exp_mean_nll(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[0]
    nll = direct_nll(model, ids)
    out = perplexity(model, tokenizer, TEXT, seq_len=1024, stride=512)
    assert out["tokens"] == len(ids) - 1
    assert out["nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


@pytest.mark.parametrize("n,seq_len,stride", [(10, 4, 2), (37, 16, 5), (64, 16, 8), (5, 8, 3)])
def test_sliding_windows_score_every_token_once(n, seq_len, stride):
    windows = window_targets(n, seq_len, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in windows:
        assert end - begin <= seq_len and begin < first
        assert first - begin >= min(seq_len - stride, first)  # carried-over context


def test_sliding_perplexity_equals_hand_windows(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[0]
    seq_len, stride = 16, 6
    out = perplexity(model, tokenizer, TEXT, seq_len=seq_len, stride=stride)
    # The transformers docs' loop: each window's labels mask all but the not-yet-scored tokens.
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        window = ids[begin:end]
        nll = direct_nll(model, window)[-(end - prev_end) :] if begin else direct_nll(model, window)
        total, count, prev_end = total + nll.sum().item(), count + len(nll), end
        if end == len(ids):
            break
    assert out["tokens"] == count == len(ids) - 1
    assert out["nll"] == pytest.approx(total / count, rel=1e-5)
    disjoint = perplexity(model, tokenizer, TEXT, seq_len=seq_len, stride=seq_len)
    assert disjoint["tokens"] == len(ids) - math.ceil(len(ids) / seq_len)


def test_wikitext2_text_is_the_raw_file(data_dir):
    text = wikitext2_text(data_dir)
    assert len(text.encode("utf-8")) == 1_290_590 and text.startswith(" \n = Robert Boulter = \n")
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        wikitext2_text(data_dir / "nowhere")
