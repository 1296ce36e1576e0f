"""Decoding an MoE model with dense experts against sparse experts: tokens/s, bytes per token, the byte limit.

Each configuration is a ``MoERun`` of ``inference.moe_engine.MoEEngine``, with the same ``decode`` interface as
``bench.decoding.EngineRun``, so ``bench.decoding.bench_decoding`` times them (round-robin, medians) and
``bench.decoding.decoding_limits`` sets each run's bytes per token (``bench.bytes_model`` with the routed experts:
``n_experts`` per layer, ``experts_per_token`` read per token) beside its speed. Mask sources as in notebook 06:
``exact`` records the exact-zero masks of every routed expert on a first run and replays them at no cost (an ideal
predictor, one per expert as section 7 trains them); ``oracle`` computes them in line from the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter
from typing import Literal

import numpy as np
import pandas as pd

from ..inference.moe_engine import ExpertExactZeroOracle, MoEEngine, RecordedExpertMasks
from .bytes_model import ModelShape

MOE_MASK_SOURCES = {
    None: "dense experts (every neuron of each routed expert read)",
    "exact": "exact zeros of each routed expert, recorded then replayed at no cost (an ideal per-expert predictor)",
    "oracle": "exact zeros of each routed expert computed in line from the weights (oracle cost paid every token)",
}
PROFILE_PARTS = ("embed", "attention", "router", "mask", "ffn", "lm_head")


def moe_shape(engine: MoEEngine, name: str = "moe") -> ModelShape:
    """The bytes-model shape of a Mixtral-style engine (every layer routed, no shared expert)."""
    c = engine.config
    if any(layer.router_EH is None or layer.shared is not None for layer in engine.layers):
        raise NotImplementedError(
            "the bytes model covers layers of routed experts only (no shared expert or dense MLP layer, as in Mixtral)"
        )
    return ModelShape(
        name,
        c.hidden_size,
        c.intermediate_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
        tied=engine.lm_head_VH is engine.embed_VH,
        n_experts=c.num_experts,
        experts_per_token=c.experts_per_token,
    )


@dataclass
class MoERun:
    """One configuration of the MoE engine: ``masks`` None (dense experts), 'exact' (replayed) or 'oracle'."""

    engine: MoEEngine
    masks: Literal["exact", "oracle"] | None = None
    profile: dict = field(default_factory=dict)  # accumulated over timed runs
    precision: str = "f32"
    _replay: RecordedExpertMasks | None = None

    def __post_init__(self):
        if self.masks not in MOE_MASK_SOURCES:
            raise ValueError(f"masks must be one of {list(MOE_MASK_SOURCES)}; got {self.masks!r}")
        if self.precision != "f32":
            raise ValueError("the MoE engine decodes float32 experts only")

    def _provider(self):
        if self.masks is None:
            return None
        if self.masks == "oracle":
            return ExpertExactZeroOracle(self.engine)
        if self._replay is None:
            self._replay = RecordedExpertMasks(ExpertExactZeroOracle(self.engine))
        else:
            self._replay.rewind()
        return self._replay

    def decode(self, prompt_ids: np.ndarray, new_tokens: int, profile: dict | None = None) -> tuple[np.ndarray, float]:
        """Greedy tokens (the first from prefill) and the seconds of the ``new_tokens - 1`` decode steps."""
        eng, provider = self.engine, self._provider()
        eng.reset(len(prompt_ids) + new_tokens)
        tokens = [int(np.argmax(eng.prefill(prompt_ids)))]
        t0 = perf_counter()
        for _ in range(new_tokens - 1):
            tokens.append(int(np.argmax(eng.step(tokens[-1], provider is not None, provider, profile))))
        return np.array(tokens, dtype=np.int64), perf_counter() - t0


def moe_runs(engine: MoEEngine, label: str) -> tuple[dict[str, MoERun], pd.DataFrame]:
    """Dense experts, exact replayed and exact in-line, named ``"<label> · ..."``; and their legend."""
    spec = {
        None: "dense experts",
        "exact": "sparse experts · exact replayed",
        "oracle": "sparse experts · exact in-line",
    }
    runs = {f"{label} · {name}": MoERun(engine, masks) for masks, name in spec.items()}
    legend = pd.DataFrame(
        [{"run": f"{label} · {name}", "mask_source": MOE_MASK_SOURCES[m]} for m, name in spec.items()]
    )
    return runs, legend.set_index("run")


def moe_profile_table(runs: dict) -> pd.DataFrame:
    """Milliseconds per token per engine component (router included), and the routed experts' active fraction."""
    rows = []
    for name, run in runs.items():
        p = run.profile
        if not p.get("tokens"):
            continue
        row = {"run": name, **{k: 1e3 * p.get(k, 0.0) / p["tokens"] for k in PROFILE_PARTS}}
        row["total"] = sum(row[k] for k in PROFILE_PARTS)
        row["expert_calls_per_token"] = p["ffn_calls"] / p["tokens"]
        row["ffn_active"] = p["active_neurons"] / (p["ffn_calls"] * run.engine.config.intermediate_size)
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
