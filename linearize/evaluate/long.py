"""What a fixed-size state forgets: recall at distance (lm-eval's RULER tasks) and the loss by
position in long windows, at the context lengths ``eval.long``.

RULER's synthetic tasks build their samples on the machine, sized in the model's own tokens to
each length: a needle (a 7-digit number, a word, a uuid) hidden in a haystack, variables bound
through a chain (``ruler_vt``), the most common or most frequent words of a long list
(``ruler_cwe``, ``ruler_fwe``). The model generates its answer greedily; the score is the share
of expected strings found in it. The harness takes the lengths from task metadata
(``max_seq_lengths``) and names the metric after the length (``"1024"``); it builds 500 samples
per length and ``limit`` scores the first ones, so the lengths are scored one harness call each
(a limit over several lengths would take the first length's samples only). The samples come
from fixed seeds, so the teacher and the converted model answer the same prompts.

The loss by position scores WikiText-2 (its test articles, joined as the file holds them) in
disjoint windows of ``eval.long_ppl_len`` tokens (default ``max(eval.long)``), so every position
bucket holds the same text mix and a bucket's loss differs from the next one's only by the context
its tokens are predicted from.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from linearize.evaluate.perplexity import perplexity, wikitext2_text
from linearize.log import get_logger

log = get_logger(__name__)


def ruler_dir() -> Path:
    """The installed harness's RULER task folder (its yaml files and the data builders)."""
    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / "ruler"
    if not (folder / "niah_single_1.yaml").is_file():
        raise FileNotFoundError(
            f"the installed lm-eval has no RULER tasks ({folder} is missing); eval.long needs them: "
            "pip install -U 'lm-eval[ruler]'"
        )
    return folder


def position_edges(length: int) -> list[int]:
    """Bucket edges for windows of ``length`` tokens: 64 (the lolcats window), 256, then 1K, 2K,
    4K, ... below ``length``."""
    edges, edge = [64, 256], 1024
    while edge < length:
        edges.append(edge)
        edge *= 2
    return [e for e in edges if e < length]


def check_lengths(model, e) -> None:
    """Refuse an ``eval.long`` length or ``eval.long_ppl_len`` over the model's context
    (``max_position_embeddings``) before any scoring: past it the rotary positions were never
    trained and the figures would mean nothing."""
    limit = getattr(model.config, "max_position_embeddings", None)
    too_long = [n for n in [*e.long, e.long_ppl_len or 0] if limit is not None and n > limit]
    if too_long:
        raise ValueError(
            f"eval.long={list(e.long)} / eval.long_ppl_len={e.long_ppl_len} ask for {too_long} tokens, over the "
            f"model's context of {limit} (config.max_position_embeddings); set them to lengths <= {limit}"
        )


class RulerSamples:
    """Each length's RULER tasks, built once with the model's tokenizer (seconds to minutes per
    length) and answered by every model scored after: the teacher and the converted model get the
    same prompts."""

    def __init__(self, tokenizer, tasks: list[str]):
        self.tokenizer, self.tasks = tokenizer, list(tasks)
        self._built: dict[int, tuple] = {}

    def at(self, length: int) -> tuple:
        """``(tasks, manager)``: the built tasks at ``length`` and the task manager that built them
        (``simple_evaluate`` without one would index every task the harness ships, each call)."""
        if length not in self._built:
            from lm_eval.tasks import TaskManager

            with tempfile.TemporaryDirectory() as tok_dir:
                self.tokenizer.save_pretrained(tok_dir)  # the builders read a tokenizer by path
                manager = TaskManager(include_path=str(ruler_dir()), include_defaults=False,
                                      metadata={"tokenizer": tok_dir, "max_seq_lengths": [length]})  # fmt: skip
                log.info("RULER at %d tokens: building %s", length, ", ".join(self.tasks))
                self._built[length] = (list(manager.load(self.tasks)["tasks"].values()), manager)
        return self._built[length]


def ruler(model, samples: RulerSamples, lengths: list[int], *, limit: int, batch_size: int) -> dict[str, dict]:
    """RULER scores of ``model`` per task and length, on the first ``limit`` samples of each.

    Returns:
        ``{task: {length: {"value", "stderr", "n"}}}`` (lengths as strings, the harness's
        metric names): the mean share of expected strings found in the answers, its standard
        error and the number of samples scored.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # No max_length: the harness then takes the model's context (max_position_embeddings). The
    # samples are sized to the length with the answer's room, but the answer prefix the task adds
    # (gen_prefix, ~15 tokens) is not counted: a max_length of the length itself would cut the
    # instruction off the front of the longest prompts.
    lm = HFLM(pretrained=model, tokenizer=samples.tokenizer, batch_size=batch_size)
    scores: dict[str, dict] = {task: {} for task in samples.tasks}
    for length in lengths:
        built, manager = samples.at(length)
        log.info("RULER at %d tokens: %d samples per task", length, limit)
        results = lm_eval.simple_evaluate(model=lm, tasks=built, limit=limit, task_manager=manager, log_samples=False)
        for task in samples.tasks:
            row = results["results"][task]
            n = int(results["n-samples"][task]["effective"])
            if n == 0 or row[f"{length},none"] < 0:  # the harness's -1: no sample of this length
                raise RuntimeError(f"RULER task {task} scored no sample at {length} tokens; the figure would be "
                                   "the harness's placeholder -1")  # fmt: skip
            stderr = row.get(f"{length}_stderr,none")
            scores[task][str(length)] = found = {
                "value": float(row[f"{length},none"]),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "n": n,
            }
            log.info("%s @ %d: %.3f (n=%d)", task, length, found["value"], found["n"])
    return scores


def long_score(model, tokenizer, cfg, samples: RulerSamples) -> dict[str, Any]:
    """The long-context figures of one model: ``{"lengths", "ruler", "position"}`` (``position``:
    :func:`~linearize.evaluate.perplexity.perplexity`'s result in disjoint windows of
    ``eval.long_ppl_len`` tokens, with that ``seq_len``; or ``{"skipped": reason}``)."""
    e = cfg.eval
    lengths = list(e.long)  # checked against the model's context by the caller (check_lengths)
    out: dict[str, Any] = {"lengths": lengths}
    if e.long_tasks:
        out["ruler"] = ruler(model, samples, lengths, limit=e.long_samples, batch_size=e.batch_size)
    if e.long_ppl_tokens:
        try:
            text = wikitext2_text(cfg.data_dir)
        except FileNotFoundError as err:
            out["position"] = {"skipped": f"local data missing: {err}"}
        else:
            n = e.long_window
            found = perplexity(model, tokenizer, text, seq_len=n, stride=n, max_tokens=e.long_ppl_tokens,
                               buckets=position_edges(n))  # fmt: skip
            out["position"] = {**found, "seq_len": n}
    return out
