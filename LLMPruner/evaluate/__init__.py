"""Evaluation: perplexity, zero-shot accuracy (lm-eval), efficiency statistics, generation."""
