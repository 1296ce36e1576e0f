"""Projections onto the paper's machines (tables 7-9): their bandwidths divided by our bytes per token.

Values not in the paper (GPU and phone bandwidths, the phone's memory budget) are labelled as
spec-sheet values or our assumptions in ``PAPER_MACHINES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..paper import values as paper
from ..sparsity.frequencies import hot_share, inclusion_probabilities
from ..sparsity.masks import kept_count
from .bytes_model import FP16, Q4_0, ModelShape, Precision, bytes_per_token

MISTRAL_7B = ModelShape("Mistral-7B", 4096, 14336, 32, 32, 8, 128, 32000)
MIXTRAL_47B = ModelShape("Mixtral-47B", 4096, 14336, 32, 32, 8, 128, 32000, n_experts=8, experts_per_token=2)
# TurboSparse's activated parameters (paper, table 6)
PAPER_ACTIVATED = {
    "Mistral-7B": paper.get("table6/TurboSparse-Mistral-7B/activated_params"),
    "Mixtral-47B": paper.get("table6/TurboSparse-Mixtral-47B/activated_params"),
}

# paper tables 7-9, tokens/s; "sparse" = PowerInfer (-2) on TurboSparse, "dense" = llama.cpp on the original
PAPER_TABLES = paper.table("speed")

_PAPER_MODELS = {"Mistral-7B-FP16": (MISTRAL_7B, FP16), "Mixtral-47B-INT4": (MIXTRAL_47B, Q4_0)}


@dataclass(frozen=True)
class Machine:
    """A machine of section 7.1. Every number carries where it comes from in ``sources``."""

    name: str
    host_gbs: float  # CPU memory bandwidth
    gpu_gb: float = 0.0  # GPU memory (table 8)
    gpu_gbs: float = 0.0  # GPU memory bandwidth
    weights_budget_gb: float = math.inf  # memory for weights in the fast tier (table 9)
    flash_gbs: float = 0.0  # storage read bandwidth (table 9)
    sources: tuple[str, ...] = ()


PAPER_MACHINES = {
    "PC-2080Ti": Machine(
        "PC-2080Ti",
        host_gbs=paper.get("section7.1/PC-2080Ti/host_bandwidth"),
        gpu_gb=11,
        gpu_gbs=616,
        sources=(
            "host 38.4 GB/s, GPU 11 GB: paper section 7.1",
            "GPU 616 GB/s: RTX 2080 Ti spec sheet, not in the paper",
        ),
    ),
    "PC-Laptop": Machine(
        "PC-Laptop",
        host_gbs=paper.get("section7.1/PC-Laptop/host_bandwidth"),
        gpu_gb=16,
        gpu_gbs=576,
        sources=(
            "host 67.2 GB/s, GPU 16 GB: paper section 7.1",
            "GPU 576 GB/s: RTX 4090 Laptop spec sheet, not in the paper",
        ),
    ),
    "OnePlus-12": Machine(
        "OnePlus-12",
        host_gbs=76.8,
        weights_budget_gb=16,
        flash_gbs=4.2,
        sources=(
            "24 GB DRAM, UFS 4.0: paper section 7.1",
            "DRAM 76.8 GB/s (LPDDR5X, Snapdragon 8 Gen 3) and "
            "UFS 4.0 4.2 GB/s sequential read: spec sheets, not in the paper",
            "16 GB of the 24 GB for weights: our assumption",
        ),
    ),
}

GPU_RESERVE_GB = 1.0  # GPU memory kept for KV cache and scratch buffers (our assumption)


def _weights_gb(shape: ModelShape, precision: Precision) -> float:
    """GB of the weights a decoder keeps in fast memory (the embedding stays in host memory)."""
    router = shape.layers * shape.n_experts * shape.hidden if shape.n_experts > 1 else 0
    other = shape.attention_params + router + shape.vocab * shape.hidden
    return (other * precision.weight + shape.ffn_params * precision.ffn) / 1e9


def _hot_share(freq: np.ndarray | None, ffn_active: float, capacity_fraction: float) -> float:
    """Share of the active neurons' traffic caught by the hottest ``capacity_fraction`` of each
    layer's neurons, with each layer's frequencies rescaled to ``ffn_active`` (mean over layers).
    Without frequencies (``None``) neurons are taken as equally hot."""
    if freq is None:
        return capacity_fraction
    shares = []
    for f in np.atleast_2d(np.asarray(freq, dtype=np.float64)):
        q = inclusion_probabilities(f, kept_count(1 - ffn_active, f.size))
        shares.append(hot_share(q, capacity_fraction))
    return float(np.mean(shares))


def project(
    table: str,
    machine: Machine,
    shape: ModelShape,
    precision: Precision,
    ffn_active: float,
    freq: np.ndarray | None = None,
    context: float = 256,
    efficiency: float = 1.0,
) -> dict:
    """Projected tokens/s, dense (llama.cpp-like) and sparse (PowerInfer-like), on a paper machine.

    Per token, time = sum over memory tiers of bytes read there / the tier's bandwidth, times
    1 / ``efficiency`` (1: the bandwidth limit).

    - table 7 (CPU only): everything from host memory.
    - table 8 (CPU+GPU): dense offloads whole layers to the GPU until it is full (less
      ``GPU_RESERVE_GB``), so that share of every token's bytes is read by the GPU; sparse puts
      attention on the GPU, then in the rest the hottest neurons of each layer (by ``freq``, the
      (layers, N) measured frequencies rescaled to the active fraction), and the GPU reads their
      share of the active neurons. The two devices are added, not overlapped (conservative for
      PowerInfer, which overlaps them). PCIe is not modelled: only activations cross it.
    - table 9 (phone): weights beyond the memory budget live in flash. Dense: a cyclic scan larger
      than the page cache misses on every page under LRU, so all active weights stream from
      flash; sparse (PowerInfer-2): attention and the hottest neurons stay in DRAM, the active cold
      neurons are read from flash.
    """
    if not 0.0 < efficiency <= 1.0:
        raise ValueError(f"efficiency must be in (0, 1]; got {efficiency}")
    dense_b = bytes_per_token(shape, None, context, precision)
    sparse_b = bytes_per_token(shape, ffn_active, context, precision)
    host = machine.host_gbs * 1e9
    model_gb = _weights_gb(shape, precision)
    ffn_gb_all = shape.ffn_params * precision.ffn / 1e9  # every neuron of every expert
    attn_gb = shape.attention_params * precision.weight / 1e9
    ffn_sparse = sparse_b["ffn"] + sparse_b["mask_indices"]
    rest_sparse = sparse_b["total"] - ffn_sparse  # attention, lm_head, KV cache, ...
    if table.startswith("table 7"):
        t_dense, t_sparse = dense_b["total"] / host, sparse_b["total"] / host
    elif table.startswith("table 8"):
        gpu, cap = machine.gpu_gbs * 1e9, machine.gpu_gb - GPU_RESERVE_GB
        on_gpu = min(1.0, cap / model_gb)
        t_dense = dense_b["total"] * ((1 - on_gpu) / host + on_gpu / gpu)
        room = float(np.clip((cap - attn_gb) / ffn_gb_all, 0.0, 1.0))  # fraction of all neurons that fit
        hot = _hot_share(freq, ffn_active, room) if cap > attn_gb else 0.0
        attn_on_gpu = sparse_b["attention"] if cap > attn_gb else 0.0
        t_sparse = (attn_on_gpu + hot * ffn_sparse) / gpu + (rest_sparse - attn_on_gpu + (1 - hot) * ffn_sparse) / host
    elif table.startswith("table 9"):
        flash, budget = machine.flash_gbs * 1e9, machine.weights_budget_gb
        fits = model_gb <= budget
        t_dense = dense_b["total"] / host if fits else dense_b["total"] / flash
        hot = _hot_share(freq, ffn_active, float(np.clip((budget - attn_gb) / ffn_gb_all, 0.0, 1.0)))
        t_sparse = (rest_sparse + hot * ffn_sparse) / host + (1 - hot) * ffn_sparse / (host if fits else flash)
    else:
        raise ValueError(f"unknown table {table!r}; valid: 'table 7 ...', 'table 8 ...', 'table 9 ...'")
    return {
        "dense tok/s": efficiency / t_dense,
        "sparse tok/s": efficiency / t_sparse,
        "speed-up": t_dense / t_sparse,
        "dense GB/token": dense_b["total"] / 1e9,
        "sparse GB/token": sparse_b["total"] / 1e9,
    }


def project_paper_tables(
    ffn_active: dict[str, float], freq: np.ndarray | None = None, efficiency: float = 1.0, context: float = 256
) -> pd.DataFrame:
    """Every row of the paper's tables 7-9 with our projection beside it.

    ``ffn_active``: model name ('Mistral-7B', 'Mixtral-47B') -> FFN active fraction to project
    with; ``freq``: (layers, N) measured per-neuron frequencies (their skew decides how much of the
    active traffic the hot neurons in the fast tier catch); ``efficiency``: fraction of the bandwidth a
    decoder reaches (1: the limit), applied to every tier. Also the GB/s the paper's own tokens/s
    imply with our bytes per token.
    """
    rows = []
    for rec in PAPER_TABLES.to_dict("records"):
        shape, precision = _PAPER_MODELS[rec["model"]]
        if shape.name not in ffn_active:
            raise KeyError(f"no FFN active fraction for {shape.name}; give one for each of {sorted(PAPER_ACTIVATED)}")
        proj = project(
            rec["table"],
            PAPER_MACHINES[rec["setting"]],
            shape,
            precision,
            ffn_active[shape.name],
            freq,
            context,
            efficiency,
        )
        rows.append(
            {
                **rec,
                "ffn_active": ffn_active[shape.name],
                **{f"{k} (projection)": v for k, v in proj.items()},
                # the bandwidth the paper's own numbers imply, if our bytes per token are right
                "dense GB/s implied (paper)": rec["dense tok/s (paper)"] * proj["dense GB/token"],
                "sparse GB/s implied (paper)": rec["sparse tok/s (paper)"] * proj["sparse GB/token"],
            }
        )
    return pd.DataFrame(rows)


SHOW = [
    "table",
    "setting",
    "model",
    "ffn_active",
    "sparse tok/s (paper)",
    "dense tok/s (paper)",
    "speed-up (paper)",
    "sparse tok/s (projection)",
    "dense tok/s (projection)",
    "speed-up (projection)",
]


def projection_table(
    paper_active: dict[str, float], active_here: float, freq: np.ndarray | None, efficiency: float
) -> pd.DataFrame:
    """Tables 7-9 projected three ways: the paper's activated parameters at the bandwidth limit, our measured
    active fraction at the limit, and the paper's at our dense engine's fraction of bandwidth (``basis`` column)."""
    eff = min(1.0, efficiency)  # a measured efficiency above 1 means the bandwidth reading was low (noise)
    return pd.concat(
        [
            project_paper_tables(paper_active, freq).assign(basis="paper's activated params, bandwidth limit"),
            project_paper_tables({k: active_here for k in paper_active}, freq).assign(
                basis=f"our measured active fraction {active_here:.3f}, bandwidth limit"
            ),
            project_paper_tables(paper_active, freq, efficiency=eff).assign(
                basis=f"paper's activated params, at our dense engine's {eff:.0%} of bandwidth"
            ),
        ],
        ignore_index=True,
    )
