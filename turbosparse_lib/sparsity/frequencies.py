"""Which neurons fire, and how often: per-neuron frequencies of a model, and masks drawn from them.

``neuron_frequencies`` records, per layer and neuron, how often a model's combined value is
non-zero on a token stream; ``sample_masks`` carries that skewed (hot/cold) distribution to any
width and sparsity, so benchmarks of one FFN layer read the rows a real model would.
"""

from __future__ import annotations

import numpy as np
import torch

from .instruments import MLPInstrument, run_over_stream
from .masks import kept_count


class _NeuronCounter(MLPInstrument):
    """Counts, per layer and neuron, the tokens whose combined value (input of down_proj) is non-zero."""

    def __init__(self, model):
        super().__init__(model)
        self.counts: list[np.ndarray | None] = [None] * len(self.mlps)
        self.tokens = [0] * len(self.mlps)

    def _register(self) -> None:
        for i, mlp in enumerate(self.mlps):

            def on_down(mod, args, i=i, mlp=mlp):
                with torch.no_grad():
                    live_TN = self._tokens(args[0], mlp) != 0
                    c_N = live_TN.sum(0).cpu().numpy().astype(np.int64)
                self.counts[i] = c_N if self.counts[i] is None else self.counts[i] + c_N
                self.tokens[i] += live_TN.shape[0]

            self._handles.append(mlp.down_proj.register_forward_pre_hook(on_down))


def neuron_frequencies(model, token_ids, context_length: int = 256, batch_size: int = 4) -> np.ndarray:
    """(units, N): per layer (MoE: per layer and expert, ``mlp_units`` order), the fraction of the tokens reaching
    the unit on which each neuron's combined value is non-zero; NaN for a routed expert no token reached.

    ``model`` runs over ``token_ids`` in non-overlapping windows of ``context_length`` tokens.
    """
    counter = _NeuronCounter(model)
    widths = [m.gate_proj.out_features for m in counter.mlps]
    if len(set(widths)) > 1:
        raise ValueError(
            f"the model's gated MLPs have different widths {sorted(set(widths))} (a shared expert or "
            "dense layers beside experts): use sparsity.experts.ActivityCounter.neuron_frequencies"
        )
    run_over_stream(counter, token_ids, context_length, batch_size)
    return np.stack([c / t if t else np.full(w, np.nan) for c, t, w in zip(counter.counts, counter.tokens, widths)])


def frequency_summary(freq_LN: np.ndarray) -> dict:
    """How skewed a (layers, N) frequency table is: mean active fraction, the share of all
    activations carried by the hottest 10% and 20% of each layer's neurons, never-active neurons."""
    freq_LN = np.atleast_2d(np.asarray(freq_LN, dtype=np.float64))
    return {
        "active_fraction": float(freq_LN.mean()),
        "hot10_share": float(np.mean([hot_share(f, 0.1) for f in freq_LN])),
        "hot20_share": float(np.mean([hot_share(f, 0.2) for f in freq_LN])),
        "never_active": float((freq_LN == 0).mean()),
    }


def hot_share(freq_N: np.ndarray, fraction: float) -> float:
    """Share of expected activations that fall on the hottest ``fraction`` of neurons (linear
    between whole neurons); 0 <= fraction <= 1. A uniform distribution gives ``fraction``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
    f = np.sort(np.asarray(freq_N, dtype=np.float64).ravel())[::-1]
    total = f.sum()
    if total <= 0:
        return fraction
    cum = np.concatenate([[0.0], np.cumsum(f)]) / total  # cum[i]: share of the hottest i neurons
    return float(np.interp(fraction * len(f), np.arange(len(f) + 1), cum))


def resample_frequencies(freq: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` neuron frequencies with the distribution of ``freq``, in a random neuron order.

    Quantile mapping: neuron i of the new width gets the empirical quantile (i + 0.5) / n of
    ``freq`` (linear between order statistics), then the neurons are shuffled.
    """
    f = np.asarray(freq, dtype=np.float64).ravel()
    if f.size == 0 or n < 1 or np.any((f < 0) | (f > 1)):
        raise ValueError("need n >= 1 and a non-empty array of frequencies in [0, 1]")
    q = np.quantile(f, (np.arange(n) + 0.5) / n)
    return np.random.default_rng(seed).permutation(q)


def inclusion_probabilities(freq: np.ndarray, k: int) -> np.ndarray:
    """Per-neuron probabilities summing to exactly ``k``, in the frequencies' rank order.

    Shifting every logit by one constant, ``q_i = sigmoid(logit(f_i) + b)`` with ``b`` solved by
    bisection, is a shift of one firing threshold: hot neurons stay hot, cold ones cold, and
    ``k / N`` becomes the mean. Frequencies of exactly 0 or 1 are clipped to [1e-6, 1 - 1e-6].
    """
    f = np.clip(np.asarray(freq, dtype=np.float64).ravel(), 1e-6, 1 - 1e-6)
    n = f.size
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}]; got {k}")
    if k in (0, n):
        return np.full(n, float(k == n))
    logit = np.log(f) - np.log1p(-f)
    lo, hi = -60.0, 60.0
    for _ in range(200):  # sum(sigmoid(logit + b)) rises with b
        mid = 0.5 * (lo + hi)
        if (0.5 * (1 + np.tanh(0.5 * (logit + mid)))).sum() < k:
            lo = mid
        else:
            hi = mid
    q = 0.5 * (1 + np.tanh(0.5 * (logit + 0.5 * (lo + hi))))
    return np.minimum(q * (k / q.sum()), 1.0)


def _systematic_sample(q: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``k`` distinct indices, index i included with probability q_i (sum q = k, q_i <= 1).

    Systematic sampling over a random order: k points u, u+1, ..., u+k-1 (u uniform in (0, 1])
    fall on the cumulative sums of q; an index is taken when a point lands in its interval,
    which has length q_i <= 1, so no index is taken twice.
    """
    order = rng.permutation(q.size)
    cum = np.cumsum(q[order])
    cum[-1] = k  # absorb rounding so the last point u + k - 1 <= k always lands
    points = (1.0 - rng.random()) + np.arange(k)
    picked = np.sort(order[np.searchsorted(cum, points, side="left")]).astype(np.int64)
    if k > 1 and not np.all(np.diff(picked) > 0):  # only if rounding pushed some q_i above 1
        raise RuntimeError("systematic sampling picked a neuron twice; inclusion probabilities exceed 1")
    return picked


def sample_masks(freq: np.ndarray, n: int, sparsity: float, n_masks: int, seed: int = 0) -> list[np.ndarray]:
    """``n_masks`` masks of width ``n`` at ``sparsity``, drawn from measured neuron frequencies.

    ``freq`` is (layers, N_source) or (N_source,): per-neuron firing frequencies of a real dReLU
    model (``neuron_frequencies``). Mask m uses layer ``m % layers``, as consecutive FFN calls of a
    model visit its layers in turn. For each layer:

    1. ``resample_frequencies`` carries the layer's distribution to width ``n`` (quantile mapping,
       neurons in random positions), keeping the skew: a few hot neurons fire on most tokens,
       most are cold;
    2. ``inclusion_probabilities`` shifts all logits by one constant so they sum to
       ``k = kept_count(sparsity, n)``;
    3. each mask is a systematic sample: exactly ``k`` distinct neurons (so the sparsity is met
       exactly on every token), neuron i present with probability q_i.

    Each mask is a sorted int64 index array of length ``k``.
    """
    freq_LN = np.atleast_2d(np.asarray(freq, dtype=np.float64))
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1; got {n_masks}")
    k = kept_count(sparsity, n)
    q_per_layer = [inclusion_probabilities(resample_frequencies(f, n, seed + li), k) for li, f in enumerate(freq_LN)]
    rng = np.random.default_rng(seed)
    return [_systematic_sample(q_per_layer[m % len(q_per_layer)], k, rng) for m in range(n_masks)]
