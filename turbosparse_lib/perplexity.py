"""Perplexity of a causal LM over one long token sequence: the one function every notebook uses.

Method (Hugging Face's "perplexity of fixed-length models", with the label shift made explicit):

- A sequence of ``n`` tokens gives ``n - 1`` predictions: input position ``p`` predicts token
  ``p + 1``. Each prediction is scored exactly once, so ``n_tokens == n - 1`` always (only the
  first token, which has nothing to be predicted from, is never scored).
- Windows of at most ``context_length`` input positions start every ``stride`` positions. The
  first window scores all its predictions; each later one scores only the predictions not
  scored yet, its last ``stride``, so those see at least ``context_length - stride`` tokens of
  context. ``stride == context_length`` gives disjoint windows (fastest, least context).
- A sequence whose ``n - 1`` inputs fit in one window is scored in one pass, which equals the
  ordinary ``model(ids, labels=ids).loss``.

Design:

- Windows of equal length are batched (``batch_size`` windows per forward pass); only the last
  window may be shorter and runs on its own, so no padding or attention mask is ever needed.
- Only the logits that are scored are computed (transformers' ``logits_to_keep``), since the
  (B, T, vocab) logits dominate memory for small models with a large vocabulary.
- The summed NLL is accumulated in float64 from float32 log-probabilities.
- Runs under ``torch.inference_mode`` with the model in eval mode (restored afterwards), so
  dropout never inflates the number; hooks such as ``sparsity.topk_mask`` still apply.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_tokens: int  # predictions scored: len(token_ids) - 1
    n_windows: int  # forward windows run
    context_length: int
    stride: int


def windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window over the ``n_tokens - 1`` input positions.

    The window's inputs are ``ids[begin:end]``, its labels ``ids[begin + 1:end + 1]``, and its
    last ``n_scored`` predictions are scored.
    """
    if not 1 <= stride <= context_length:
        raise ValueError(f"need 1 <= stride <= context_length; got stride={stride}, context_length={context_length}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one prediction; got {n_tokens}")
    n_pred = n_tokens - 1
    out, prev_end = [], 0
    for begin in range(0, n_pred, stride):
        end = min(begin + context_length, n_pred)
        out.append((begin, end, end - prev_end))  # prev_end >= begin since stride <= context_length
        prev_end = end
        if end == n_pred:
            break
    return out


def _progress_enabled(progress: bool | None) -> bool:
    """``None``: on only for an interactive terminal, off under CI, papermill or a pipe."""
    if progress is not None:
        return progress
    if os.environ.get("CI") or os.environ.get("PAPERMILL"):
        return False
    return sys.stderr.isatty()


def perplexity(
    model,
    token_ids,
    context_length: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D ``token_ids`` (list, NumPy array or tensor), method above.

    ``stride`` defaults to ``context_length`` (disjoint windows).
    """
    ids = (token_ids if torch.is_tensor(token_ids) else torch.as_tensor(np.asarray(token_ids))).long().cpu()
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D; got shape {tuple(ids.shape)}")
    stride = context_length if stride is None else stride
    wins = windows(len(ids), context_length, stride)

    # Batches of consecutive windows of equal length (all are context_length but maybe the last).
    batches: list[list[tuple[int, int, int]]] = []
    for w in wins:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] - batches[-1][0][0] == w[1] - w[0]:
            batches[-1].append(w)
        else:
            batches.append([w])

    device = next(model.parameters()).device
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not _progress_enabled(progress)):
                x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # (B, T)
                y = torch.stack([ids[b + 1 : e + 1] for b, e, _ in batch]).to(device)  # (B, T)
                n_keep = max(n for _, _, n in batch)
                kw = {"logits_to_keep": n_keep} if keep_arg else {}
                logits = model(input_ids=x, use_cache=False, **kw).logits[:, -n_keep:]  # (B, n_keep, V)
                for i, (_, _, n) in enumerate(batch):
                    nll_sum += F.cross_entropy(logits[i, -n:].float(), y[i, -n:], reduction="sum").item()
    finally:
        model.train(was_training)

    n_scored = len(ids) - 1
    nll = nll_sum / n_scored
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, n_tokens=n_scored, n_windows=len(wins), context_length=context_length, stride=stride
    )
