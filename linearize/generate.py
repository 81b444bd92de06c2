"""Decoding from a converted model, streamed (``stage=generate``: :mod:`linearize.stages.generate`).

Decoding uses the constant-size recurrent state (:mod:`linearize.attention.cache`): the prompt
is absorbed by the chunked form in one forward, then each new token is one recurrent step, so
the cost of a token does not grow with the context. ``generate()`` builds that cache by itself.
"""

from __future__ import annotations

import time
from typing import Optional, TextIO

import torch
from transformers import TextStreamer

from linearize.attention.cache import RecurrentState
from linearize.config import GenerateConfig
from linearize.data import prompt_and_response
from linearize.log import get_logger

log = get_logger(__name__)


def format_prompt(prompt: str, data_format: str) -> str:
    """The prompt as the model saw instructions in training (Alpaca template), or as is."""
    if data_format == "alpaca":
        return prompt_and_response({"instruction": prompt, "input": "", "output": ""})[0]
    return prompt


def generate(
    model, tokenizer, text: str, cfg: GenerateConfig, *, stream: Optional[TextIO] = None,
) -> dict:  # fmt: skip
    """Generate a continuation of ``text``, printing tokens to ``stream`` as they come.

    Returns:
        ``text`` (the continuation), ``new_tokens``, ``prompt_tokens``, ``seconds`` and
        ``state_bytes`` (the recurrent state and any kept-softmax keys/values after the call).
    """
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
    streamer = _Streamer(tokenizer, stream) if stream is not None else None
    sampling = {"do_sample": True, "temperature": cfg.temperature} if cfg.temperature > 0 else {"do_sample": False}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
            streamer=streamer, return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id,
            top_p=None, top_k=None, **sampling,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1] :]
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()),
        "prompt_tokens": int(ids.shape[1]),
        "seconds": seconds,
        "state_bytes": cache_bytes(out.cache),
    }


def cache_bytes(cache) -> int:
    """Bytes a cache holds: recurrent states plus any kept-softmax keys and values."""
    if cache is None:
        return 0
    total = 0
    for entry in cache.layers:
        if isinstance(entry, RecurrentState):
            total += entry.nbytes()
        else:
            total += sum(t.numel() * t.element_size() for t in (entry.keys, entry.values) if t is not None)
    return total


class _Streamer(TextStreamer):
    """transformers' TextStreamer, writing to a chosen stream (stdout by default)."""

    def __init__(self, tokenizer, stream: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


