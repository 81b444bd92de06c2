"""Sliding-window perplexity (the transformers docs' "perplexity of fixed-length models").

The text is tokenized once and scored in windows of ``seq_len`` tokens whose starts are
``stride`` apart. Each window scores only the tokens that the previous window did not, each
predicted from the tokens before it inside the window. With ``stride < seq_len`` every token
after the first is scored exactly once, with at least ``seq_len - stride`` tokens of context
once past the first window. With ``stride == seq_len`` the windows are disjoint and, as in the
transformers docs, the first token of each window (which has no context in it) is not scored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from linearize.log import get_logger

log = get_logger(__name__)


def window_targets(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the sliding evaluation.

    Returns:
        ``[(begin, end, first), ...]``: the window holds tokens ``[begin, end)`` and scores
        tokens ``[first, end)``. The scored ranges are disjoint; with ``stride < seq_len`` they
        tile ``[1, n_tokens)``.
    """
    if not 0 < stride <= seq_len:
        raise ValueError(f"need 0 < stride <= seq_len, got stride={stride}, seq_len={seq_len}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)  # a window's first token has no context in it
        if end > first:
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seq_len: int = 1024,
    stride: int = 512,
    max_tokens: Optional[int] = None,
    buckets: Sequence[int] = (),
) -> dict:
    """Perplexity of ``model`` on ``text``, scored in sliding windows on the model's device.

    Args:
        model: a causal LM whose forward takes ``input_ids`` (1, T) and returns ``.logits``
            (1, T, V).
        tokenizer: its tokenizer; special tokens are added as it adds them by default.
        text: the text to score.
        seq_len: tokens per forward (the context budget).
        stride: tokens between window starts; ``seq_len - stride`` is the minimum carried-over
            context of every window after the first.
        max_tokens: score only the first ``max_tokens`` tokens (for quick checks).
        buckets: edges of position buckets, increasing (e.g. ``[64, 256, 512]``: positions
            0-64, 64-256, 256-512 and 512 on). A token's position is its index in the window
            it is scored in: the context it is predicted from.

    Returns:
        ``{"ppl": exp(nll), "nll": mean negative log-likelihood per scored token (nats),
        "tokens": number of scored tokens, "by_position": [{"from", "to", "tokens", "nll"},
        ...]}`` (``to`` is None for the last bucket; buckets no token falls in are left out;
        ``by_position`` is empty without ``buckets``).
    """
    edges = [0, *buckets]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"position buckets {list(buckets)} must be positive and increasing")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # (N,)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score, got {ids.numel()}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    nll_sum, scored = 0.0, 0
    bucket_nll, bucket_tokens = [0.0] * len(edges), [0] * len(edges)
    bounds = torch.tensor(edges[1:], device=device)
    windows = window_targets(ids.numel(), seq_len, stride)
    try:
        for begin, end, first in tqdm(windows, desc="perplexity", unit="window"):
            logits = model(input_ids=ids[None, begin:end]).logits[0]  # (end - begin, V)
            # Position j predicts token j + 1: the logits for tokens [first, end).
            pred = logits[first - begin - 1 : end - begin - 1].float()
            nll = F.cross_entropy(pred, ids[first:end], reduction="none").double()  # (end - first,), summed in fp64
            nll_sum += nll.sum().item()
            scored += end - first
            if buckets:
                positions = torch.arange(first - begin, end - begin, device=device)
                which = torch.bucketize(positions, bounds, right=True)  # bucket i: edges[i] <= pos < edges[i+1]
                sums = torch.zeros(len(edges), device=device, dtype=nll.dtype).index_add_(0, which, nll)
                counts = torch.bincount(which, minlength=len(edges))
                for i in range(len(edges)):
                    bucket_nll[i] += sums[i].item()
                    bucket_tokens[i] += int(counts[i])
    finally:
        model.train(was_training)
    nll = nll_sum / scored
    log.info("perplexity %.3f over %d tokens (seq_len=%d, stride=%d)", math.exp(nll), scored,
             seq_len, stride)
    by_position = [
        {"from": edges[i], "to": edges[i + 1] if i + 1 < len(edges) else None, "tokens": bucket_tokens[i],
         "nll": bucket_nll[i] / bucket_tokens[i]}
        for i in range(len(edges)) if buckets and bucket_tokens[i]
    ]  # fmt: skip
    return {"ppl": math.exp(nll), "nll": nll, "tokens": scored, "by_position": by_position}


def wikitext2_text(data_dir: str | Path) -> str:
    """WikiText-2 (raw, v1) test as one string, from ``<data_dir>/eval/wikitext2/wiki.test.raw``.

    The file verbatim, i.e. the hub rows joined as they were split (one newline each), not the
    ``"\\n\\n".join`` of the transformers docs' example, which doubles every line break.
    """
    path = Path(data_dir).expanduser() / "eval" / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 test file missing: {path}")
    return path.read_text(encoding="utf-8")
