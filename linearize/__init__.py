"""linearize: convert a pretrained softmax-attention LLM into a linear-attention one."""

__version__ = "0.1.0"


def load_converted(path, **kwargs):
    """Load a converted model directory: ``(model, tokenizer)``. See ``linearize.models.convert``."""
    from linearize.models.convert import load_converted as load

    return load(path, **kwargs)
