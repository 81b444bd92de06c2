"""The attention math. Only this module chooses an implementation (reference or Triton)."""
