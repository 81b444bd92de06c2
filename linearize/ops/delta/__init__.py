"""The delta rule (DeltaNet, Gated DeltaNet): `reference` holds its PyTorch forms (the oracle)."""
