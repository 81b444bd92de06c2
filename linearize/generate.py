"""``stage=generate``: stream text from a run's converted model.

Decoding uses the constant-size recurrent state (:mod:`linearize.attention.cache`): the prompt
is absorbed by the chunked form in one forward, then each new token is one recurrent step, so
the cost of a token does not grow with the context. ``generate()`` builds that cache by itself.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

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


def run_generate(
    prepared, accelerator=None, tracker=None, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
) -> Path:  # fmt: skip
    """Load the run's latest converted model and answer ``prompt`` (or prompts read in a loop)."""
    from linearize.fingerprint import check_chain, converted_source
    from linearize.models.convert import apply_converted

    cfg = prepared.config
    source = converted_source(Path(cfg.run.dir), "generate")
    check_chain(source)
    model = apply_converted(prepared.teacher, source, seed=cfg.run.seed).eval()
    log.info("generating with the converted model in %s", source)
    prompts = [cfg.prompt] if cfg.prompt else []
    while True:
        if not prompts:
            if not cfg.generate.interactive:
                break
            try:
                line = read("prompt> ").strip()
            except EOFError:
                break
            if line in ("", "exit", "quit"):
                break
            prompts.append(line)
        text = format_prompt(prompts.pop(0), cfg.data.format)
        result = generate(model, prepared.tokenizer, text, cfg.generate, stream=out)
        log.info(
            "%d prompt + %d new tokens in %.2f s (%.1f tokens/s); decoding state %.1f KiB",
            result["prompt_tokens"], result["new_tokens"], result["seconds"],
            result["new_tokens"] / max(result["seconds"], 1e-9), result["state_bytes"] / 1024,
        )  # fmt: skip
    return source
