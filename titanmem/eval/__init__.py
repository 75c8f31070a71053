"""Evaluation: held-out perplexity, factual recall on the bundled facts, and memory-layer telemetry."""
