"""Greedy decoding, one loop for the dense and the MoE engine (as gpt-fast's ``generate`` serves its models).

The prompt is checked once here, prefilled densely by the engine, and each new token after the first is one
engine step; the engines differ only in their ``prefill`` and ``step``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def prompt_tokens(prompt_ids, max_new_tokens, vocab_size: int, max_positions: int | None = None) -> np.ndarray:
    """The prompt as int64 token ids, after checking it and ``max_new_tokens`` against the model's vocabulary and
    positions; a clear error says what was wrong."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    prompt = np.asarray(prompt_ids)
    if prompt.size and not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_ids must be integer token ids; got dtype {prompt.dtype}")
    prompt_T = prompt.astype(np.int64).reshape(-1)
    if prompt_T.size and (prompt_T.min() < 0 or prompt_T.max() >= vocab_size):
        raise ValueError(f"prompt_ids must lie in [0, {vocab_size}); got {prompt_T.min()}..{prompt_T.max()}")
    if max_positions is not None and prompt_T.shape[0] + max_new_tokens > max_positions:
        raise ValueError(
            f"prompt ({prompt_T.shape[0]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{max_positions} positions"
        )
    return prompt_T


def greedy(
    prefill: Callable[[np.ndarray], np.ndarray],
    step: Callable[[int], np.ndarray],
    prompt_T: np.ndarray,
    max_new_tokens: int,
    vocab_size: int,
    eos_token_id: int | None = None,
    return_logits: bool = False,
):
    """Greedy tokens after ``prompt_T`` from an engine reset to hold them: the first from ``prefill``'s logits, each
    next from ``step(previous token)``. Stops early after ``eos_token_id``. Returns the new token ids (int64), with
    ``return_logits`` also the (new tokens, V) logits each was chosen from."""
    tokens, all_logits = [], []
    logits_V = prefill(prompt_T)
    for i in range(max_new_tokens):
        if i > 0:
            logits_V = step(tokens[-1])
        tokens.append(int(np.argmax(logits_V)))
        if return_logits:
            all_logits.append(logits_V)
        if tokens[-1] == eos_token_id:
            break
    tokens_T = np.array(tokens, dtype=np.int64)
    if not return_logits:
        return tokens_T
    return tokens_T, np.stack(all_logits) if all_logits else np.empty((0, vocab_size), np.float32)
