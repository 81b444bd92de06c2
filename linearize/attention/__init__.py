"""The attention zoo: pure PyTorch modules, no training code."""
