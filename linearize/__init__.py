"""linearize: convert a pretrained softmax-attention LLM into a linear-attention one."""

__version__ = "0.1.0"
