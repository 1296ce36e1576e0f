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
- The summed NLL is accumulated in float64 from float32 log-probabilities, per window, so that
  ``bootstrap_interval`` can resample windows (a percentile bootstrap over evaluation windows)
  and ``paired_interval`` can compare two models scored on the same windows.
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
    window_nll: np.ndarray | None = None  # (n_windows,) summed NLL of each window's scored predictions
    window_tokens: np.ndarray | None = None  # (n_windows,) predictions each window scored

    def interval(self, samples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
        """``bootstrap_interval`` of this result."""
        return bootstrap_interval(self, samples, level, seed)


def _resampled_ppl(nll_W: np.ndarray, tok_W: np.ndarray, idx_SW: np.ndarray) -> np.ndarray:
    return np.exp(nll_W[idx_SW].sum(axis=1) / tok_W[idx_SW].sum(axis=1))


def bootstrap_interval(
    result: PerplexityResult, samples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the perplexity, resampling evaluation windows with replacement.

    Windows, not tokens, are resampled: tokens inside a window share their context, so they are
    not independent. With a single window there is nothing to resample and the interval is the
    point itself.
    """
    if result.window_nll is None:
        raise ValueError("this PerplexityResult has no per-window NLL (computed by an older version?)")
    if not 0 < level < 1 or samples < 1:
        raise ValueError(f"need 0 < level < 1 and samples >= 1; got {level}, {samples}")
    W = len(result.window_nll)
    idx = np.random.default_rng(seed).integers(0, W, size=(samples, W))
    ppl = _resampled_ppl(result.window_nll, result.window_tokens, idx)
    a = (1 - level) / 2
    return float(np.quantile(ppl, a)), float(np.quantile(ppl, 1 - a))


def paired_interval(
    a: PerplexityResult, b: PerplexityResult, samples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict:
    """How ``b``'s perplexity compares with ``a``'s on the same windows: the ratio b/a, its paired
    percentile bootstrap interval (the same resampled windows for both), and ``distinguishable``,
    True when the interval excludes 1."""
    if (
        a.window_nll is None
        or b.window_nll is None
        or len(a.window_nll) != len(b.window_nll)
        or not np.array_equal(a.window_tokens, b.window_tokens)
    ):
        raise ValueError("paired_interval needs two results over the same windows (same tokens, context and stride)")
    W = len(a.window_nll)
    idx = np.random.default_rng(seed).integers(0, W, size=(samples, W))
    ratio = _resampled_ppl(b.window_nll, b.window_tokens, idx) / _resampled_ppl(a.window_nll, a.window_tokens, idx)
    q = (1 - level) / 2
    lo, hi = float(np.quantile(ratio, q)), float(np.quantile(ratio, 1 - q))
    return {"ratio": b.ppl / a.ppl, "ratio_lo": lo, "ratio_hi": hi, "distinguishable": not (lo <= 1.0 <= hi)}


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


def progress_enabled(progress: bool | None) -> bool:
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
    raw = token_ids if torch.is_tensor(token_ids) else torch.as_tensor(np.asarray(token_ids))
    if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
        raise ValueError(f"token_ids must be integer token ids; got dtype {raw.dtype}")
    ids = raw.long().cpu()
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D; got shape {tuple(ids.shape)}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"token_ids must lie in [0, {vocab}), the model's vocabulary; got {int(ids.min())}.."
            f"{int(ids.max())}: were they made by another tokenizer?"
        )
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is not None and context_length > positions:
        raise ValueError(f"context_length {context_length} exceeds the model's {positions} positions")
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
    nll_W = np.zeros(len(wins), dtype=np.float64)
    w = 0
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress_enabled(progress)):
                x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # (B, T)
                y = torch.stack([ids[b + 1 : e + 1] for b, e, _ in batch]).to(device)  # (B, T)
                n_keep = max(n for _, _, n in batch)
                kw = {"logits_to_keep": n_keep} if keep_arg else {}
                logits = model(input_ids=x, use_cache=False, **kw).logits[:, -n_keep:]  # (B, n_keep, V)
                for i, (_, _, n) in enumerate(batch):
                    nll_W[w] = F.cross_entropy(logits[i, -n:].float(), y[i, -n:], reduction="sum").item()
                    w += 1
    finally:
        model.train(was_training)

    n_scored = len(ids) - 1
    nll = float(nll_W.sum()) / n_scored
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        n_tokens=n_scored,
        n_windows=len(wins),
        context_length=context_length,
        stride=stride,
        window_nll=nll_W,
        window_tokens=np.array([n for _, _, n in wins], dtype=np.int64),
    )
