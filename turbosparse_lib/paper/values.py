"""Every number the paper reports that this companion compares against, keyed by where it appears.

Song et al., *Turbo Sparse: Achieving LLM SOTA Performance with Minimal Activated Parameters*
(2024). A value is a ``PaperValue``: the number, its unit, the table / figure / section that
gives it, and a note where the paper's wording matters. Keys read ``"<where>/<row>/<column>"``.

``table(name)`` returns one of the paper's tables as a DataFrame; ``get(key)`` one number.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class PaperValue:
    key: str
    value: float
    unit: str  # "perplexity", "%", "fraction", "tokens/s", "tokens", "parameters", "GB/s", ...
    where: str  # "table 3", "section 6.2", ...
    note: str = ""


_VALUES: list[PaperValue] = []


def _add(key: str, value: float, unit: str, where: str, note: str = "") -> None:
    _VALUES.append(PaperValue(key, float(value), unit, where, note))


# --- table 1: sparsity of combined after ReLUfication (Llama-2-7B family) -----------------------
for model, v in (("Llama-2-7B", 40), ("ReLULlama-7B", 67), ("ShiftedReLULlama-7B", 71)):
    _add(f"table1/{model}/sparsity", v, "%", "table 1", "fraction of combined activations that are zero")

# --- table 2 and table 3: 300M from scratch, WikiText-2 perplexity under top-k ---------------
_TABLE3 = {"dReLU": (28.45, 28.45, 28.45, 28.65, 29.19), "SwiGLU": (28.48, 28.62, 36.28, 48.55, 112.36)}
TOPK_LEVELS = (0.0, 0.5, 0.8, 0.85, 0.9)
for variant, ppls in _TABLE3.items():
    for s, p in zip(TOPK_LEVELS, ppls):
        _add(f"table3/{variant}/{s}", p, "perplexity", "table 3", f"WikiText-2, 300M model, top-k sparsity {s:.0%}")
_add("table2/dReLU/wikitext2_ppl", 28.45, "perplexity", "table 2 / table 3 (0%)", "300M, 5B tokens of fineweb")
_add("table2/SwiGLU/wikitext2_ppl", 28.48, "perplexity", "table 2 / table 3 (0%)", "300M, 5B tokens of fineweb")

# --- table 10: zero-shot accuracy of the 300M models ----------------------------------------
_TABLE10_TASKS = ("ARC:E", "ARC:C", "PIQA", "Winogrande", "BoolQ", "HellaSwag", "LAMBADA", "Average")
_TABLE10 = {
    "SwiGLU": (40.03, 22.95, 62.68, 52.72, 60.92, 31.63, 24.34, 42.18),
    "dReLU": (40.07, 22.44, 63.82, 52.33, 61.50, 31.08, 24.35, 42.23),
}
for variant, accs in _TABLE10.items():
    for task, a in zip(_TABLE10_TASKS, accs):
        _add(f"table10/{variant}/{task}", a, "%", "table 10", "accuracy, 300M model")

# --- table 4: the continued-pretraining mixture (percent of tokens) -----------------------------
_TABLE4 = {
    "academic": {"Pile-Arxiv + Pile-PubMed + Pile-Philpapers": 2.69, "Dolma_peS2o": 7.83},
    "web": {"Wanjuan-CC": 73.55, "RedPajama-Wiki": 0.65, "Pile-OpenWebtext2": 0.44},
    "books": {"RedPajama-books": 6.54, "Pile-PG19": 0.37},
    "math": {"Open-web-math": 1.46, "Proof-pile-2": 0.76, "algebraic-stack": 0.54},
    "code": {
        "Starcode-Java": 0.77,
        "Starcode-C#": 0.74,
        "Starcode-Typescript": 0.52,
        "Starcode-remaining": 1.73,
        "GitHub-Code": 1.41,
    },
}
for cat, d in _TABLE4.items():
    for ds, pct in d.items():
        _add(f"table4/{cat}/{ds}", pct, "%", "table 4", "share of continued-pretraining tokens")

# --- table 5 and section 5: the ReLUfication recipe ---------------------------------------------
_add("table5/sequence_length", 4096, "tokens", "table 5")
_add("table5/batch_size", 2048, "sequences", "table 5")
_add("table5/lr_max", 5e-5, "learning rate", "table 5", "cosine 5e-5 -> 5e-6")
_add("table5/lr_min", 5e-6, "learning rate", "table 5")
_add("table5/warmup_steps", 1000, "steps", "table 5")
_add("section5/tokens", 150e9, "tokens", "section 5", "continued pretraining of Mistral-7B and Mixtral-47B")

# --- tables 11, 12: the 300M architecture and its training ------------------------------------
for k, v, u in (
    ("hidden", 1024, "units"),
    ("context", 2048, "tokens"),
    ("heads", 16, "heads"),
    ("layers", 24, "layers"),
    ("vocab", 32000, "tokens"),
):
    _add(f"table11/{k}", v, u, "table 11")
for k, v, u in (
    ("sequence_length", 2048, "tokens"),
    ("batch_size", 128, "sequences"),
    ("lr", 1e-4, "learning rate"),
    ("warmup_steps", 2000, "steps"),
):
    _add(f"table12/{k}", v, u, "table 12")
_add("section3.2/tokens", 5e9, "tokens", "section 3.2", "300M models pretrained on fineweb")

# --- tables 6 and 13: downstream results of the ReLUfied models -------------------------------
_MODELS_6 = ("Gemma-2B", "Mistral-7B", "TurboSparse-Mistral-7B", "Mixtral-47B", "TurboSparse-Mixtral-47B")
_TABLE6 = {
    "ARC-challenge": (48.55, 61.43, 62.2, 68.09, 67.49),
    "Hellaswag": (71.02, 83.32, 82.17, 86.62, 85.22),
    "MMLU": (40.05, 62.65, 63.89, 70.53, 70.48),
    "TruthfulQA": (34.38, 44.06, 46.64, 48.59, 56.64),
    "WinoGrande": (66.06, 79.24, 76.16, 83.35, 82.24),
    "GSM8k": (18.72, 40.17, 50.84, 58.91, 68.50),
    "CommonSense": (63.4, 75.8, 76.2, 78.07, 78.52),
    "OpenLLM Leaderboard Avg.": (46.46, 61.57, 63.65, 69.34, 71.76),
}
for task, accs in _TABLE6.items():
    for model, a in zip(_MODELS_6, accs):
        _add(f"table6/{model}/{task}", a, "%", "table 6")
_TABLE13 = {
    "SciQ": (93.8, 96.4, 96.4, 96.7, 97.9),
    "PIQA": (76.71, 80.79, 80.58, 82.43, 82.15),
    "OpenBookQA": (39.8, 46, 47, 49.4, 49),
    "ARC-Easy": (74.12, 80.3, 81.06, 83.75, 85.06),
    "All Avg.": (71.11, 75.87, 76.26, 78.07, 78.53),
}
for task, accs in _TABLE13.items():
    for model, a in zip(_MODELS_6, accs):
        _add(f"table13/{model}/{task}", a, "%", "table 13")
for model, total, active in (
    ("Gemma-2B", 2e9, 2e9),
    ("Mistral-7B", 7e9, 7e9),
    ("TurboSparse-Mistral-7B", 7e9, 2.5e9),
    ("Mixtral-47B", 47e9, 13e9),
    ("TurboSparse-Mixtral-47B", 47e9, 4.3e9),
):
    _add(f"table6/{model}/total_params", total, "parameters", "table 6")
    _add(f"table6/{model}/activated_params", active, "parameters", "table 6")

# --- section 4, figure 5: sparsity inside MoE experts ---------------------------------------------
_add(
    "figure5a/drop_at_0.5",
    2.0,
    "%",
    "section 4 / figure 5a",
    "performance drops by about 1-2% at within-expert sparsity 0.5 (upper end of the range)",
)
_add("figure5a/drop_at_0.5_min", 1.0, "%", "section 4 / figure 5a", "lower end of the 1-2% range")
_add(
    "figure5a/negligible_until",
    0.5,
    "fraction",
    "figure 5 caption",
    "the impact of activation sparsity is negligible until the sparsity ratio exceeds 0.5 (Deepseek-MoE, "
    "Qwen1.5-MoE, Mixtral; downstream tasks, not perplexity)",
)

# --- section 6.2, figure 6: sparsity of the ReLUfied models --------------------------------------
_add(
    "section6.2/TurboSparse-Mistral-7B/sparsity",
    90,
    "%",
    "section 6.2 / figure 6",
    "neurons inactive per layer on average (zero-valued activations, fineweb)",
)
_add(
    "section6.2/TurboSparse-Mixtral-47B/expert_sparsity",
    85,
    "%",
    "section 6.2 / figure 6",
    "neurons inactive per expert FFN on average",
)
_add("section6.2/Mixtral-47B/routing_sparsity", 75, "%", "section 6.2", "top-2 of 8 experts")
_add(
    "section6.2/Mixtral-47B/active_moe_params",
    25,
    "%",
    "section 6.2",
    "only 25% of the FLOPs of each MoE layer computed per token (2 of 8 experts)",
)
_add(
    "section6.2/TurboSparse-Mixtral-47B/active_neurons",
    15,
    "%",
    "section 6.2",
    "each routed expert activates about 15% of its neurons after ReLUfication",
)
_add(
    "section1/TurboSparse-Mixtral-47B/moe_sparsity",
    97,
    "%",
    "section 1",
    "sparsity of the MoE layers raised from 75% (routing) to 97% by ReLUfication",
)
_add(
    "section6.2/TurboSparse-Mixtral-47B/active_moe_params",
    3,
    "%",
    "section 6.2",
    "parameters of each MoE layer activated per token (25% routed x 15% of neurons)",
)

# --- section 7, tables 7-9: decoding speed (tokens/s) ---------------------------------------------
_SPEED = (
    ("table7", "PC-2080Ti", "Mistral-7B-FP16", 9.94, 4.78),
    ("table7", "PC-2080Ti", "Mixtral-47B-INT4", 11.98, 4.26),
    ("table7", "PC-Laptop", "Mistral-7B-FP16", 8.71, 4.13),
    ("table7", "PC-Laptop", "Mixtral-47B-INT4", 16.1, 6.91),
    ("table8", "PC-2080Ti", "Mistral-7B-FP16", 35.5, 7.64),
    ("table8", "PC-2080Ti", "Mixtral-47B-INT4", 22.24, 6.63),
    ("table8", "PC-Laptop", "Mixtral-47B-INT4", 33.12, 13.1),
    ("table9", "OnePlus-12", "Mixtral-47B-INT4", 11.1, 0.5),
)
for tab, setting, model, sparse, dense in _SPEED:
    _add(
        f"{tab}/{setting}/{model}/sparse",
        sparse,
        "tokens/s",
        tab.replace("table", "table "),
        "PowerInfer (table 9: PowerInfer-2) on the TurboSparse model",
    )
    _add(
        f"{tab}/{setting}/{model}/dense",
        dense,
        "tokens/s",
        tab.replace("table", "table "),
        "llama.cpp on the original model",
    )
_add("section7.1/PC-2080Ti/host_bandwidth", 38.4, "GB/s", "section 7.1")
_add("section7.1/PC-Laptop/host_bandwidth", 67.2, "GB/s", "section 7.1")
_add("abstract/speedup_min", 2.0, "x", "abstract / section 8", "2-5x decoding speed-up")
_add("abstract/speedup_max", 5.0, "x", "abstract / section 8")
_add("section7.2/cpu_speedup_min", 2.08, "x", "section 7.2")
_add("section7.2/cpu_speedup_max", 2.28, "x", "section 7.2", "as the text states; table 7's own ratios reach 2.81")

PAPER: dict[str, PaperValue] = {v.key: v for v in _VALUES}


def get(key: str) -> float:
    """The paper's number under ``key``; an unknown key raises with the keys that share its prefix."""
    try:
        return PAPER[key].value
    except KeyError:
        prefix = key.split("/")[0]
        near = [k for k in PAPER if k.startswith(prefix)][:12]
        raise KeyError(f"no paper value {key!r}; keys under {prefix!r}: {near or 'none'}") from None


def table(name: str) -> pd.DataFrame:
    """One of the paper's tables as a DataFrame, its values labelled as the paper's.

    ``table1``, ``table3`` (index: top-k sparsity), ``table4`` (category, dataset, percent),
    ``table6``, ``table10``, ``table13``, ``speed`` (tables 7-9: table, setting, model, sparse
    and dense tokens/s, speed-up).
    """
    if name == "table1":
        return pd.DataFrame(
            [(m, get(f"table1/{m}/sparsity")) for m in ("Llama-2-7B", "ReLULlama-7B", "ShiftedReLULlama-7B")],
            columns=["model", "sparsity % (paper, table 1)"],
        )
    if name == "table3":
        return pd.DataFrame(
            {f"{v} 300M (paper)": [get(f"table3/{v}/{s}") for s in TOPK_LEVELS] for v in _TABLE3},
            index=pd.Index(TOPK_LEVELS, name="sparsity"),
        )
    if name == "table4":
        return pd.DataFrame(
            [(c, ds, pct) for c, d in _TABLE4.items() for ds, pct in d.items()],
            columns=["category", "dataset", "percent (paper, table 4)"],
        )
    if name in ("table6", "table13"):
        rows = _TABLE6 if name == "table6" else _TABLE13
        return pd.DataFrame(
            {m: [get(f"{name}/{m}/{t}") for t in rows] for m in _MODELS_6},
            index=pd.Index(list(rows), name=f"task ({name.replace('table', 'paper, table ')})"),
        )
    if name == "table10":
        return pd.DataFrame(
            {f"{v} (paper)": [get(f"table10/{v}/{t}") for t in _TABLE10_TASKS] for v in _TABLE10},
            index=pd.Index(_TABLE10_TASKS, name="task"),
        )
    if name == "speed":
        df = pd.DataFrame(
            [
                (t.replace("table", "table "), s, m, get(f"{t}/{s}/{m}/sparse"), get(f"{t}/{s}/{m}/dense"))
                for t, s, m, _, _ in _SPEED
            ],
            columns=["table", "setting", "model", "sparse tok/s (paper)", "dense tok/s (paper)"],
        )
        df["speed-up (paper)"] = df["sparse tok/s (paper)"] / df["dense tok/s (paper)"]
        return df
    raise KeyError(f"unknown paper table {name!r}; valid: table1, table3, table4, table6, table10, table13, speed")
