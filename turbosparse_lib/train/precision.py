"""bf16 autocast or fp32: measured on the model being trained, on this machine.

The answer depends on the CPU and the model: on an early Intel machine bf16 autocast trained notebook 02's
7M-parameter model about 1.5x faster than fp32, while on the AMD machines of later runs it was ~17x *slower* for the
same model (notebook 02's committed cpu run: 80.5 against 4.8 s per step) and ~20x slower for SmolLM2-135M. No rule
of thumb holds, so ``measure_precision`` times a few optimiser steps of each on a copy of the very model the run trains.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn


def autocast(precision: str):
    """``torch.autocast`` to bf16 for ``precision == "bf16"``, else nothing."""
    if precision != "bf16":
        return nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def measure_precision(
    model: nn.Module,
    micro_batch_size: int,
    context_length: int,
    steps: int = 2,
    vocab_size: int | None = None,
    give_up_ratio: float = 3.0,
) -> dict:
    """Seconds per training step (forward, backward, AdamW) in fp32 and in bf16 autocast, each the median of
    ``steps`` after one warm-up step, on a deep copy of ``model`` (the original is untouched) at the run's
    micro batch. Returns both times, the speed-up of bf16 and the faster one (``chosen``).

    bf16 is timed second, and given up as soon as one of its steps (the warm-up included) takes more than
    ``give_up_ratio`` times fp32's median: for SmolLM2-135M on these CPUs a bf16 step is about 20x slower,
    and timing it fully would cost minutes. Its time is then a lower bound (``bf16_gave_up``)."""
    vocab = vocab_size or model.config.vocab_size
    x = torch.randint(0, vocab, (micro_batch_size, context_length), generator=torch.Generator().manual_seed(0))
    times, gave_up = {}, False
    for precision in ("fp32", "bf16"):
        trial = copy.deepcopy(model).train()
        opt = torch.optim.AdamW([p for p in trial.parameters() if p.requires_grad], lr=1e-6)
        ts = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            with autocast(precision):
                loss = trial(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ts.append(time.perf_counter() - t0)
            if precision == "bf16" and ts[-1] > give_up_ratio * times["fp32"]:
                gave_up = True
                break
        times[precision] = float(np.median(ts[1:])) if len(ts) > 1 and not gave_up else float(max(ts))
        del trial, opt
    return {
        "fp32_s_per_step": times["fp32"],
        "bf16_s_per_step": times["bf16"],
        "bf16_speedup": times["fp32"] / times["bf16"],
        "chosen": min(times, key=times.get),
        "bf16_gave_up": gave_up,
        "threads": torch.get_num_threads(),
        "micro_batch": micro_batch_size,
        "context": context_length,
    }
