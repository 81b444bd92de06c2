"""Causal softmax attention (the teacher's): `reference` holds its oracle and dense weights; it
has no kernel."""
