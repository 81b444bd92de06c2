"""Causal linear attention: `reference` holds its PyTorch forms (the oracle), `triton` its kernels
(the dispatch in `linearize.ops` imports them on first use: this package imports without Triton)."""
