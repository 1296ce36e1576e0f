"""Sample a training stream from categories at chosen ratios, as in the paper's table 4.

- Documents are drawn whole, in a seeded random order per category; when a category's
  target exceeds what it holds, it is repeated (a new shuffled epoch), and the report
  says how many epochs each category was read for. Small sources repeated many times
  are a real limit of laptop-scale data, and the report makes it visible.
- The last document drawn for a category is cut so each category meets its target
  exactly, and the documents of all categories are shuffled together before they are
  concatenated (EOS between documents).
- The report gives, per category: target share, tokens available, tokens drawn,
  actual share and epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# The paper's table 4 (``paper.table('table4')``) mapped onto our categories. Web (74.64%) is spread over our three
# web-like sources, web crawl first; Math has no packaged source, so its 2.76% goes
# to academic, its nearest neighbour. Sums to 1.
TABLE4_MAPPED = {
    "web": 0.4464,
    "encyclopedic": 0.2000,
    "news": 0.1000,
    "books": 0.0691,
    "code": 0.0517,
    "academic": 0.1328,
}

MIXTURES = {"table4": TABLE4_MAPPED}


def resolve_mixture(mixture: str | dict[str, float], categories: list[str]) -> dict[str, float]:
    """Ratios by category, normalised to 1. ``"natural"`` means proportional to size (filled by caller)."""
    if isinstance(mixture, str):
        if mixture not in MIXTURES:
            raise ValueError(f"unknown mixture {mixture!r}: choose one of {', '.join([*MIXTURES, 'natural'])} or pass a dict of ratios")
        mixture = MIXTURES[mixture]
    unknown = set(mixture) - set(categories)
    if unknown:
        raise ValueError(f"mixture names categories with no data: {sorted(unknown)}; available: {categories}")
    if any(v < 0 for v in mixture.values()) or sum(mixture.values()) <= 0:
        raise ValueError(f"mixture ratios must be non-negative and not all zero: {mixture}")
    total = sum(mixture.values())
    return {c: mixture.get(c, 0.0) / total for c in categories}


@dataclass
class MixtureSample:
    tokens: np.ndarray  # (N,) token ids, documents separated by EOS
    report: pd.DataFrame  # one row per category


def sample_mixture(
    docs: dict[str, list[np.ndarray]],
    total_tokens: int,
    mixture: str | dict[str, float] = "table4",
    eos_id: int = 0,
    seed: int = 0,
) -> MixtureSample:
    """Draw about ``total_tokens`` tokens (EOS separators included) from tokenised documents by category."""
    categories = sorted(docs)
    if mixture == "natural":
        ratios = resolve_mixture({c: sum(len(d) + 1 for d in docs[c]) for c in categories}, categories)
    else:
        ratios = resolve_mixture(mixture, categories)
    rng = np.random.default_rng(seed)
    drawn: list[np.ndarray] = []
    rows = []
    for c in categories:
        target = int(round(ratios[c] * total_tokens))
        avail = sum(len(d) + 1 for d in docs[c])
        if target > 0 and avail == 0:
            raise ValueError(f"category {c!r} has no documents but its ratio is {ratios[c]:.3f}")
        got, n_docs = 0, 0
        while got < target:
            for i in rng.permutation(len(docs[c])):
                doc = np.append(docs[c][i], eos_id)[: target - got]
                drawn.append(doc)
                got += len(doc)
                n_docs += 1
                if got >= target:
                    break
        rows.append(dict(category=c, target_share=ratios[c], tokens_available=avail, tokens_drawn=got,
                         documents_drawn=n_docs, epochs=got / avail if avail else 0.0))
    order = rng.permutation(len(drawn))
    tokens = np.concatenate([drawn[i] for i in order]) if drawn else np.zeros(0, np.int64)
    report = pd.DataFrame(rows)
    report["actual_share"] = report.tokens_drawn / max(1, report.tokens_drawn.sum())
    return MixtureSample(tokens.astype(np.int32), report)
