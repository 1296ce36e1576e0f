"""Bytes per token: what a bandwidth-bound decoder must read, counted from a model's shapes.

Attention weights, FFN rows read, the lm_head (the whole vocabulary matrix, tied or not), the KV
cache, and mask indices where they exist; block formats count their scales in their bytes per
weight (Q8_0: 34 bytes per 32 weights, Q4_0: 18). Dense bytes over sparse bytes is the speed-up a
bandwidth-bound decoder can reach.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..inference.simd import BLOCK, Q4_BLOCK_BYTES, Q8_BLOCK_BYTES


@dataclass(frozen=True)
class ModelShape:
    """What a decoder reads per token depends only on these sizes (MoE: experts per layer, routed per token)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False  # lm_head is the embedding matrix (read once per token either way)
    n_experts: int = 1
    experts_per_token: int = 1

    @classmethod
    def of_engine(cls, engine, name: str = "model") -> ModelShape:
        c = engine.config
        return cls(
            name,
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size,
            tied=engine.weights.tied,
        )

    @property
    def attention_params(self) -> int:
        """q, k, v, o of all layers."""
        q = (self.heads + 2 * self.kv_heads) * self.head_dim
        return self.layers * (q * self.hidden + self.hidden * self.heads * self.head_dim)

    @property
    def ffn_params(self) -> int:
        """gate, up, down of all experts of all layers."""
        return self.layers * self.n_experts * 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        """All parameters, a tied embedding counted once."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        router = self.layers * self.n_experts * self.hidden if self.n_experts > 1 else 0
        norms = (2 * self.layers + 1) * self.hidden
        return self.attention_params + self.ffn_params + embeddings + router + norms


@dataclass(frozen=True)
class Precision:
    """Bytes per stored value: ``weight`` (attention, lm_head, embedding) and ``ffn`` (block scales
    included), ``kv`` per KV-cache value; ``ffn_out_scales``: H float32 output scales of the down
    projection per FFN (our engine's Q formats, ``inference.bundles``)."""

    name: str
    weight: float
    ffn: float
    kv: float = 4.0
    ffn_out_scales: bool = False


FP32 = Precision("f32", 4, 4, 4)
FP16 = Precision("fp16", 2, 2, 2)
_Q8, _Q4 = Q8_BLOCK_BYTES / BLOCK, Q4_BLOCK_BYTES / BLOCK  # the engine's block layouts (inference.simd)
Q8_0 = Precision(f"int8 (llama.cpp Q8_0: {Q8_BLOCK_BYTES} bytes per {BLOCK} weights)", _Q8, _Q8, 2)
Q4_0 = Precision(f"int4 (llama.cpp Q4_0: {Q4_BLOCK_BYTES} bytes per {BLOCK} weights)", _Q4, _Q4, 2)
_BY_FORMAT = {"f32": FP32, "q8_0": Q8_0, "q4_0": Q4_0}


def engine_precision(fmt: str) -> Precision:
    """Our engine in weight format ``fmt`` ('f32', 'q8_0', 'q4_0'): every matrix in it, a float32 KV cache."""
    if fmt not in _BY_FORMAT:
        raise ValueError(f"unknown weight format {fmt!r}; valid: {', '.join(_BY_FORMAT)}")
    return replace(_BY_FORMAT[fmt], name=f"ours {fmt}", kv=4.0, ffn_out_scales=fmt != "f32")


def llama_cpp_precision(fmt: str) -> Precision:
    """llama.cpp on a GGUF of type ``fmt`` (every matrix in it), with its default F16 KV cache."""
    if fmt not in _BY_FORMAT:
        raise ValueError(f"unknown weight format {fmt!r}; valid: {', '.join(_BY_FORMAT)}")
    return replace(_BY_FORMAT[fmt], name=f"llama.cpp {fmt}", kv=2.0)


def bytes_per_token(
    shape: ModelShape, ffn_active: float | None = None, context: float = 0.0, precision: Precision = FP32
) -> dict[str, float]:
    """Bytes read (and the KV row written) to decode one token at position ``context``.

    ``ffn_active=None`` is the dense path (all N neurons); a fraction runs the sparse path (bundled
    neurons): the gate, up and down rows of the active neurons of each routed expert and their
    int64 indices. Components: ``attention``
    (q, k, v, o weights), ``router``, ``ffn``, ``mask_indices``, ``norms`` (float32 RMSNorm
    weights), ``embedding`` (one row), ``lm_head`` (the whole vocabulary matrix), ``kv_cache``
    (``context + 1`` positions read, one written), and ``total``.
    """
    s, p = shape, precision
    if ffn_active is not None and not 0.0 <= ffn_active <= 1.0:
        raise ValueError(f"ffn_active must be in [0, 1] or None; got {ffn_active}")
    experts = s.layers * s.experts_per_token  # FFN blocks run per token
    if ffn_active is None:
        ffn, indices = experts * 3 * s.intermediate * s.hidden * p.ffn, 0.0
    else:
        k = ffn_active * s.intermediate
        ffn, indices = experts * 3 * k * s.hidden * p.ffn, experts * 8 * k
    if p.ffn_out_scales:
        ffn += experts * 4 * s.hidden
    kv_row = s.layers * 2 * s.kv_heads * s.head_dim * p.kv
    out = {
        "attention": s.attention_params * p.weight,
        "router": (s.layers * s.n_experts * s.hidden * p.weight) if s.n_experts > 1 else 0.0,
        "ffn": ffn,
        "mask_indices": indices,
        "norms": (2 * s.layers + 1) * s.hidden * 4.0,
        "embedding": s.hidden * p.weight,
        "lm_head": s.vocab * s.hidden * p.weight,
        "kv_cache": kv_row * (context + 2),  # read context + 1 rows, write 1
    }
    out["total"] = sum(out.values())
    return out


def activated_params(shape: ModelShape, ffn_active: float = 1.0) -> float:
    """Parameters used per token (attention, routed FFN neurons, router, lm_head; not the embedding)."""
    router = shape.layers * shape.n_experts * shape.hidden if shape.n_experts > 1 else 0
    routed_ffn = shape.ffn_params * shape.experts_per_token / shape.n_experts
    return shape.attention_params + router + ffn_active * routed_ffn + shape.vocab * shape.hidden


def ffn_active_from_activated(shape: ModelShape, activated: float) -> float:
    """The FFN active fraction that makes ``activated_params`` equal ``activated`` (clipped to [0, 1])."""
    fixed = activated_params(shape, 0.0)
    return float(np.clip((activated - fixed) / (activated_params(shape, 1.0) - fixed), 0.0, 1.0))


def measured_bytes_per_token(
    shape: ModelShape, profile: dict, context: float, precision: Precision, index_bytes: bool = True
) -> dict[str, float]:
    """``bytes_per_token`` with the FFN bytes an engine profile counted: the gate, up and down rows its
    kernels read (``rows_gate``, ``rows_up``, ``rows_down``) and, with ``index_bytes``, 8 bytes per
    active neuron of a mask that was handed to the kernel (not for dense or the in-line oracle)."""
    n = profile["tokens"]
    rows = (profile["rows_gate"] + profile["rows_up"] + profile["rows_down"]) / n
    out = bytes_per_token(shape, None, context, precision)
    out["ffn"] = rows * shape.hidden * precision.ffn + (
        shape.layers * 4 * shape.hidden if precision.ffn_out_scales else 0
    )
    out["mask_indices"] = 8.0 * profile["active_neurons"] / n if index_bytes else 0.0
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out


def weights_mb(engine) -> float:
    """Weight bytes an engine decodes with, in MB (lm_head counted once when tied)."""
    return engine.weights.nbytes / 1e6
