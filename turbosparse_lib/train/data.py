"""A run's training and validation sequences: disjoint windows in a seeded order, the data position being the step."""

from __future__ import annotations

import numpy as np
import torch

from .config import TrainConfig

VALIDATION_SEED = 1234  # one fixed validation set for every run of a given context length


def make_sequences(tokens: np.ndarray, context_length: int, n_sequences: int, seed: int) -> torch.Tensor:
    """Disjoint ``context_length`` windows of ``tokens`` in a seeded random order, ``n_sequences`` of them."""
    n_avail = len(tokens) // context_length
    if n_avail < n_sequences:
        raise ValueError(f"{len(tokens)} tokens make {n_avail} sequences of {context_length}; {n_sequences} needed")
    seqs = torch.from_numpy(np.asarray(tokens[: n_avail * context_length], dtype=np.int64)).view(
        n_avail, context_length
    )
    order = np.random.default_rng(seed).permutation(n_avail)[:n_sequences]
    return seqs[torch.from_numpy(order)]


def training_sequences(cfg: TrainConfig) -> torch.Tensor:
    """The run's training data, (steps * batch_size, context_length), from the mixture sampler (training split)."""
    from ..data.build import training_stream

    needed = cfg.steps * cfg.batch_size
    # a little headroom: the sampler draws whole documents, so it lands near, not on, the target
    sample = training_stream(
        int(needed * cfg.context_length * 1.02) + cfg.context_length,
        cfg.mixture,
        seed=cfg.seed,
        tokenizer=cfg.tokenizer,
    )
    return make_sequences(sample.tokens, cfg.context_length, needed, cfg.seed)


def validation_sequences(cfg: TrainConfig) -> torch.Tensor:
    """A fixed validation set (the same for every run of a given context length and tokenizer)."""
    from ..data.build import load_token_stream

    stream = load_token_stream("validation", tokenizer=cfg.tokenizer)
    return make_sequences(stream, cfg.context_length, cfg.eval_sequences, seed=VALIDATION_SEED)
