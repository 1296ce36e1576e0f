"""Same precision, same quality: held-out perplexity of our engine in each weight format beside llama.cpp's.

A speed comparison "at Q4_0" only means something if both sides lose the same to quantisation.
Both score the same held-out tokens in the same chunks, each chunk from an empty cache: token t
of a chunk is predicted from tokens 0..t-1 of that chunk. Our engine decodes token by token
through its fused step (the path the speed tables time); llama.cpp evaluates each chunk at once
with every position's logits kept. The ratio is paired: exp of the mean per-token difference in
negative log-likelihood, so it compares the two models on identical predictions.

On the same teacher-forced positions the table also says how far the two agree, which greedy decoding cannot
(one early divergence sends the rest of a greedy run elsewhere): the share of positions whose top-1 token is the
same, the first position (over the scored tokens, chunk after chunk) where it differs, and the largest logit
difference, absolute and over the largest |logit| of llama.cpp's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..inference.engine import Engine
from .llamacpp import llama_cpp_chunk_logits, next_token_nll


def engine_chunk_logits(engine: Engine, ids: np.ndarray, chunk: int):
    """As ``llamacpp.llama_cpp_chunk_logits``, by our engine's fused decode step, token by token."""
    if chunk < 2:
        raise ValueError(f"chunk must hold at least 2 tokens; got {chunk}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    for lo in range(0, len(ids) - 1, chunk):
        part = ids[lo : lo + chunk]
        if len(part) < 2:
            break
        engine.reset(len(part))
        yield np.stack([engine.step(int(t)) for t in part[:-1]]).astype(np.float64), part[1:]


def engine_nll(engine: Engine, ids: np.ndarray, chunk: int) -> np.ndarray:
    """Negative log-likelihood (nats) of every token of ``ids`` after the first of its chunk, by our engine."""
    return np.concatenate([next_token_nll(z, nxt) for z, nxt in engine_chunk_logits(engine, ids, chunk)])


def pytorch_nll(model, ids: np.ndarray, chunk: int) -> np.ndarray:
    """As ``engine_nll``, by a PyTorch causal LM: the same chunks, each from scratch, the same tokens scored."""
    import torch

    if chunk < 2:
        raise ValueError(f"chunk must hold at least 2 tokens; got {chunk}")
    ids, out = np.asarray(ids, dtype=np.int64).reshape(-1), []
    for lo in range(0, len(ids) - 1, chunk):
        part = ids[lo : lo + chunk]
        if len(part) < 2:
            break
        with torch.inference_mode():
            logits = model(torch.as_tensor(part[None])).logits[0, :-1].double().numpy()
        out.append(next_token_nll(logits, part[1:]))
    return np.concatenate(out)


def agreement(ours, theirs) -> dict:
    """Teacher-forced agreement of two iterables of (logits (n, V), next tokens (n,)) chunks on the same tokens:
    both negative log-likelihoods, top-1 agreement, the first differing position (None if none) and the largest
    logit difference (absolute, and over the largest |logit| of ``theirs``)."""
    nll_a, nll_b, same, top, worst = [], [], [], 0.0, 0.0
    for (a, nxt), (b, nxt_b) in zip(ours, theirs, strict=True):
        if not np.array_equal(nxt, nxt_b):
            raise ValueError("the two sides scored different tokens")
        nll_a.append(next_token_nll(a, nxt))
        nll_b.append(next_token_nll(b, nxt))
        same.append(a.argmax(1) == b.argmax(1))
        worst, top = max(worst, float(np.abs(a - b).max())), max(top, float(np.abs(b).max()))
    same = np.concatenate(same)
    differ = np.flatnonzero(~same)
    return {
        "nll_ours": np.concatenate(nll_a),
        "nll_theirs": np.concatenate(nll_b),
        "top1_agreement": float(same.mean()),
        "first_top1_difference": int(differ[0]) if len(differ) else None,
        "max_logit_diff": worst,
        "max_logit_diff_rel": worst / top if top else float("nan"),
    }


def quality_table(engines: dict[str, Engine], ggufs: dict, ids: np.ndarray, chunk: int, threads: int) -> pd.DataFrame:
    """Perplexity per weight format: ``engines`` maps a format to our engine in it, ``ggufs`` to llama.cpp's
    GGUF of the same model in it (or None: not scored). One row per format: both perplexities, the paired
    ratio ours / llama.cpp, the tokens scored, and how far the two agree position by position (``agreement``)."""
    rows = []
    for fmt, engine in engines.items():
        if ggufs.get(fmt) is None:
            ours = engine_nll(engine, ids, chunk)
            rows.append({"fmt": fmt, "tokens": len(ours), "ppl_ours": float(np.exp(ours.mean()))})
            continue
        a = agreement(engine_chunk_logits(engine, ids, chunk), llama_cpp_chunk_logits(ggufs[fmt], ids, chunk, threads))
        ours, theirs = a.pop("nll_ours"), a.pop("nll_theirs")
        rows.append(
            {
                "fmt": fmt,
                "tokens": len(ours),
                "ppl_ours": float(np.exp(ours.mean())),
                "ppl_llama_cpp": float(np.exp(theirs.mean())),
                "ours_over_llama_cpp": float(np.exp((ours - theirs).mean())),
                **a,
            }
        )
    return pd.DataFrame(rows).set_index("fmt")


def model_in_format(model, fmt: str, engine: Engine | None = None, dense_layout: bool = False):
    """A copy of the PyTorch ``model`` whose weight matrices are the ones our engine decodes with in ``fmt``
    (quantised as ``Engine.quantized`` does, then dequantised): the perplexity of a format on long held-out
    text at PyTorch's speed, with the same hooks (masks, predictors) as the float model. What it leaves out is
    the Q8_0 rounding of the activations that the engine's (and llama.cpp's) quantised dot products add;
    ``engine_nll`` scores the engine itself, token by token. ``f32`` returns ``model`` itself. ``dense_layout``:
    the down projection as the dense layout holds it (quantised along the neurons, ``Engine.quantized``), the
    weights a dense run in a Q format decodes with."""
    import copy

    import torch

    from ..inference import quant

    quant.format_code(fmt)
    if fmt == "f32":
        return model
    w = (engine if engine is not None else Engine.from_transformers(model)).quantized(fmt, dense_layout).weights
    qkv, o, lm_head = quant.dequantize(w.qkv), quant.dequantize(w.o), quant.dequantize(w.lm_head)
    gate, up = w.ffn.dequantized(0), w.ffn.dequantized(1)
    down_NH = np.swapaxes(w.ffn.dense_down(), -1, -2) if dense_layout else w.ffn.dequantized(2)
    copy_ = copy.deepcopy(model)

    def put(param, array):
        param.copy_(torch.as_tensor(np.ascontiguousarray(array), dtype=param.dtype))

    with torch.no_grad():
        for li, block in enumerate(copy_.model.layers):
            att, q_k_v = block.self_attn, np.cumsum([0, *(p.weight.shape[0] for p in _qkv(block.self_attn))])
            for proj, lo, hi in zip(_qkv(att), q_k_v[:-1], q_k_v[1:], strict=True):
                put(proj.weight, qkv[li, lo:hi])
            put(att.o_proj.weight, o[li])
            put(block.mlp.gate_proj.weight, gate[li])
            put(block.mlp.up_proj.weight, up[li])
            put(block.mlp.down_proj.weight, down_NH[li].T)
        put(copy_.lm_head.weight, lm_head)  # a tied embedding is the same tensor
        if not w.tied:
            put(copy_.model.embed_tokens.weight, quant.dequantize(w.embed))
    return copy_


def _qkv(attention) -> tuple:
    return attention.q_proj, attention.k_proj, attention.v_proj
