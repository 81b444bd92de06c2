"""lm-evaluation-harness adapter, perplexity and reports."""
