"""The training loop and the stage objectives."""
