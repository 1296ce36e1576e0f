"""Named run sizes shared by the library, the notebooks and the runner.

- ``smoke``: seconds per notebook, for CI; numbers are only checks that the code runs.
- ``cpu``: the default reproduction on a 2-core, 24 GB laptop-class machine.
- ``paper``: the paper's own sizes, for machines that can run them.

Sizes were chosen from the speeds measured in ``shared/data-sources.md``
(SmolLM2-135M: about 130 tokens/s of fp32 training on 2 cores; a 5-7M-parameter
model: a few thousand tokens/s). Modules with their own knobs (training) keep
their tables keyed by the same three names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRESET_NAMES = ("smoke", "cpu", "paper")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    mixture_tokens: int  # tokens the mixture sampler draws in notebook 00 (a demonstration)
    eval_tokens: int  # held-out tokens scored for perplexity (0 = the whole test split)
    stats_tokens: int  # tokens pushed through a model to collect activation statistics
    context_length: int  # evaluation window for perplexity, in tokens
    topk_sparsities: tuple[float, ...] = field(default=(0.0, 0.5, 0.8, 0.85, 0.9))  # table 3's levels
    topk_fine: tuple[float, ...] = ()  # extra levels for the finer curve of notebook 03
    notebook_timeout_s: int = 1800  # per-cell timeout used by the runner


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="CI: seconds per notebook; checks that the code runs, not the science",
        mixture_tokens=200_000,
        eval_tokens=512,
        stats_tokens=256,
        context_length=256,
        topk_sparsities=(0.0, 0.5, 0.9),
        notebook_timeout_s=600,
    ),
    "cpu": Preset(
        name="cpu",
        description="default reproduction: 2 cores, minutes per notebook",
        mixture_tokens=5_000_000,
        eval_tokens=16_384,
        stats_tokens=4_096,
        context_length=512,
        topk_sparsities=(0.0, 0.5, 0.8, 0.85, 0.9),
        topk_fine=(0.3, 0.6, 0.7, 0.75, 0.95),
        notebook_timeout_s=3600,
    ),
    "paper": Preset(
        name="paper",
        description="the paper's sizes (tables 11-12: context 2048); needs a GPU or a lot of patience",
        mixture_tokens=50_000_000,
        eval_tokens=0,
        stats_tokens=65_536,
        context_length=2048,
        topk_sparsities=(0.0, 0.5, 0.8, 0.85, 0.9),
        topk_fine=tuple(round(0.05 * i, 2) for i in range(1, 20) if round(0.05 * i, 2) not in (0.5, 0.8, 0.85, 0.9)),
        notebook_timeout_s=6 * 3600,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises with the valid ones listed."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} "
            "(smoke for CI, cpu for the default reproduction, paper for the paper's sizes)"
        ) from None
