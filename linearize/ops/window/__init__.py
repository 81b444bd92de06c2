"""The LoLCATs window hybrid: `reference` holds its PyTorch forms (the oracle)."""
