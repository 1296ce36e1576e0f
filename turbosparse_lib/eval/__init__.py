"""Evaluation: perplexity with bootstrap intervals (``perplexity``), zero-shot tasks built from
held-out text (``zeroshot``) and sparsity sweeps (``sweeps``)."""
