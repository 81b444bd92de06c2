"""``stage=generate``: answer a prompt (or prompts read in a loop) with the run's latest converted
model, streaming the tokens (:func:`linearize.generate.generate` does the decoding)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

from linearize.fingerprint import check_chain, converted_source
from linearize.generate import format_prompt, generate
from linearize.log import get_logger
from linearize.models.convert import apply_converted
from linearize.stages.prepare import Prepared

log = get_logger(__name__)


def run(prepared: Prepared, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> Path:
    """Load the run's latest converted model and answer ``prompt`` (or prompts read in a loop)."""
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
