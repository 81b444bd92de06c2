"""Causal linear attention: `reference` holds its PyTorch forms (the oracle)."""
