"""One model's scores: lm-eval tasks and WikiText-2 perplexity (``stage=eval`` runs it on the
teacher and the converted model: :mod:`linearize.stages.eval`)."""

from __future__ import annotations

from typing import Any

from linearize.evaluate.harness import evaluate
from linearize.evaluate.perplexity import perplexity, wikitext2_text
from linearize.log import get_logger

log = get_logger(__name__)


def score(model, tokenizer, cfg) -> dict[str, Any]:
    """Task scores (lm-eval) and WikiText-2 perplexity of one model."""
    e = cfg.eval
    by_limit: dict[Any, list[str]] = {}  # one harness call per distinct limit
    for task in e.tasks:
        by_limit.setdefault(e.task_limits.get(task, e.limit), []).append(task)
    scored: dict[str, Any] = {}
    for limit, tasks in by_limit.items():
        scored.update(evaluate(model, tokenizer, tasks, data_dir=cfg.data_dir, limit=limit,
                               batch_size=e.batch_size, local=e.local))  # fmt: skip
    results = {task: scored[task] for task in e.tasks}
    if e.ppl_tokens != 0:
        try:
            text = wikitext2_text(cfg.data_dir)
        except FileNotFoundError as err:
            results["wikitext2"] = {"skipped": f"local data missing: {err}"}
        else:
            ppl = perplexity(model, tokenizer, text, seq_len=e.ppl_seq_len, stride=e.ppl_stride,
                             max_tokens=e.ppl_tokens, buckets=e.ppl_buckets)  # fmt: skip
            results["wikitext2"] = {"metric": "ppl", "value": ppl["ppl"], "n": ppl["tokens"],
                                    "by_position": ppl["by_position"]}  # fmt: skip
    return results


