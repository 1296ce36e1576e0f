"""Same precision, same quality: held-out perplexity of our engine in each weight format beside llama.cpp's.

A speed comparison "at Q4_0" only means something if both sides lose the same to quantisation.
Both score the same held-out tokens in the same chunks, each chunk from an empty cache: token t
of a chunk is predicted from tokens 0..t-1 of that chunk. Our engine decodes token by token
through its fused step (the path the speed tables time); llama.cpp evaluates each chunk at once
with every position's logits kept. The ratio is paired: exp of the mean per-token difference in
negative log-likelihood, so it compares the two models on identical predictions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..inference.engine import Engine
from .llamacpp import llama_cpp_nll, next_token_nll


def engine_nll(engine: Engine, ids: np.ndarray, chunk: int) -> np.ndarray:
    """Negative log-likelihood (nats) of every token of ``ids`` after the first of its chunk, by our engine."""
    if chunk < 2:
        raise ValueError(f"chunk must hold at least 2 tokens; got {chunk}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    nll = []
    for lo in range(0, len(ids) - 1, chunk):
        part = ids[lo : lo + chunk]
        if len(part) < 2:
            break
        engine.reset(len(part))
        logits = np.stack([engine.step(int(t)) for t in part[:-1]]).astype(np.float64)
        nll.append(next_token_nll(logits, part[1:]))
    return np.concatenate(nll)


def quality_table(engines: dict[str, Engine], ggufs: dict, ids: np.ndarray, chunk: int, threads: int) -> pd.DataFrame:
    """Perplexity per weight format: ``engines`` maps a format to our engine in it, ``ggufs`` to llama.cpp's
    GGUF of the same model in it (or None: not scored). One row per format: both perplexities, the paired
    ratio ours / llama.cpp, and the tokens scored."""
    rows = []
    for fmt, engine in engines.items():
        ours = engine_nll(engine, ids, chunk)
        row = {"fmt": fmt, "tokens": len(ours), "ppl_ours": float(np.exp(ours.mean()))}
        if ggufs.get(fmt) is not None:
            theirs = llama_cpp_nll(ggufs[fmt], ids, chunk, threads)
            row.update(
                ppl_llama_cpp=float(np.exp(theirs.mean())), ours_over_llama_cpp=float(np.exp((ours - theirs).mean()))
            )
        rows.append(row)
    return pd.DataFrame(rows).set_index("fmt")
