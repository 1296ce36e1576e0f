"""Activation instruments for gated MLPs: streaming statistics, histograms and samples, over a whole token stream.

Every instrument is a context manager over a model that registers PyTorch hooks on each
layer's MLP and removes them on exit; weights are never touched.

Design:

- Three hook points, valid for transformers' native MLPs and for ``GatedMLP`` alike:
  a forward hook on ``gate_proj`` (its output through the MLP's own ``act_fn`` is *gate*, the
  post-activation of paper eq. 1), a forward hook on ``up_proj`` (its output is *up*, the
  pre-activation; for dReLU also *up_act* = relu(up)), and a forward pre-hook on ``down_proj``
  (its input is *combined*: both MLP classes feed ``down_proj`` exactly Combined(x)).
- Bounded memory: per (layer, kind) only counts, a running mean / sum of squared deviations
  (Chan et al.'s parallel update, float64), a histogram with fixed bin edges and optionally a
  fixed-size uniform random sample are kept, whatever the number of tokens.
- Histograms follow ``np.histogram``: bins are ``[e_i, e_{i+1})``, the last one closed; values
  outside ``[e_0, e_n]`` are counted in ``below`` / ``above`` rather than silently dropped.
- The random sample is a bottom-k sample: every value draws a uniform key and the
  ``sample_size`` smallest keys are kept, which is a uniform sample without replacement of the
  whole stream, computed batch by batch from a seeded generator.
- Padding: set ``instrument.attention_mask`` (B, T) before a forward pass, or call
  ``instrument.run(input_ids, attention_mask)``, and padded positions are left out of every
  count. Without a mask every position counts (inputs are taken to be unpadded).
- Mixture-of-experts models (``models.moe``): every routed expert is one unit, hooked like a dense
  MLP and seeing only the tokens routed to it (``ExpertMLP.token_index`` says which, for the
  padding mask); a shared expert is one more unit. ``units`` labels each unit (layer, expert,
  role); tables of an MoE model carry ``expert`` and ``role`` columns beside ``layer``.
- Hooks run in registration order: an instrument entered *before* a mask (``sparsity.masks``)
  sees unmasked combined values, one entered inside the mask sees masked ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..models.swap import mlp_units

Kind = Literal["gate", "up", "up_act", "combined"]
KINDS: tuple[str, ...] = ("gate", "up", "up_act", "combined")  # "up_act" only where the variant has one (dReLU)

DEFAULT_BINS = np.linspace(-4.0, 4.0, 161)  # 160 bins of width 0.05


# ---------------------------------------------------------------------------------------------
# Bounded-memory accumulators


@dataclass
class Histogram:
    """Counts over fixed bin edges, as ``np.histogram(values, edges)`` gives, plus out-of-range counts."""

    counts: np.ndarray  # (n_bins,) int64
    edges: np.ndarray  # (n_bins + 1,) float64
    below: int = 0  # values < edges[0]
    above: int = 0  # values > edges[-1]

    def __add__(self, other: Histogram) -> Histogram:
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("histograms with different bin edges cannot be added")
        return Histogram(self.counts + other.counts, self.edges, self.below + other.below, self.above + other.above)

    def total_variation(self, other: Histogram) -> float:
        """Total-variation distance between the two distributions as binned (below / above the range count as two
        more bins): half the L1 distance of the probability masses; 0 for the same shape, 1 for disjoint ones."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("histograms with different bin edges cannot be compared")
        p, q = (np.concatenate([[h.below], h.counts, [h.above]]).astype(np.float64) for h in (self, other))
        if p.sum() == 0 or q.sum() == 0:
            raise ValueError("an empty histogram has no distribution")
        return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())

    @property
    def density(self) -> np.ndarray:
        """``np.histogram(..., density=True)``: in-range counts / (their total * bin width)."""
        total = self.counts.sum()
        return self.counts / (total * np.diff(self.edges)) if total else np.zeros(len(self.counts))


def _check_edges(bins) -> np.ndarray:
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or not np.all(np.diff(edges) > 0):
        raise ValueError("bins must be a 1-D, strictly increasing array of at least 2 edges")
    return edges


class _Accumulator:
    """Streaming statistics of one (layer, kind) stream of values."""

    def __init__(self, edges: np.ndarray, eps: float, sample_size: int, generator: torch.Generator):
        self.edges, self.eps, self.sample_size, self.generator = edges, eps, sample_size, generator
        self._edges_t: torch.Tensor | None = None  # float64 copy on the values' device
        self.count = self.n_zero = self.n_near_zero = self.n_neg = 0
        self.mean = self.m2 = 0.0  # running mean and sum of squared deviations (float64)
        self.hist = np.zeros(len(edges) - 1, dtype=np.int64)
        self.below = self.above = 0
        self._sample: torch.Tensor | None = None  # (<= sample_size,) float32
        self._keys: torch.Tensor | None = None  # the sample's random keys

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).double()  # (N,) float64: bin edges compare exactly as in NumPy
        n = x.numel()
        if n == 0:
            return
        self.count += n
        self.n_zero += int((x == 0).sum())
        self.n_near_zero += int((x.abs() <= self.eps).sum())
        self.n_neg += int((x < 0).sum())

        # Chan et al.: merge this batch's (n, mean, M2) into the running one, no cancellation
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        n_old = self.count - n
        delta = b_mean - self.mean
        self.mean += delta * n / self.count
        self.m2 += b_m2 + delta * delta * n_old * n / self.count

        if self._edges_t is None or self._edges_t.device != x.device:
            self._edges_t = torch.as_tensor(self.edges, dtype=torch.float64, device=x.device)
        e = self._edges_t
        # right=True: idx = i with e[i-1] <= x < e[i]; 0 below the range, len(e) at or above e[-1]
        idx = torch.bucketize(x, e, right=True)
        binned = torch.bincount(idx, minlength=len(e) + 1).cpu().numpy()
        at_last_edge = int((x == e[-1]).sum())  # np.histogram's last bin is closed
        self.hist += binned[1:-1]
        self.hist[-1] += at_last_edge
        self.below += int(binned[0])
        self.above += int(binned[-1]) - at_last_edge

        if self.sample_size:
            keys = torch.rand(n, generator=self.generator, dtype=torch.float64)
            vals = x.float().cpu()
            if self._sample is not None:
                keys, vals = torch.cat([self._keys, keys]), torch.cat([self._sample, vals])
            if len(keys) > self.sample_size:
                keep = torch.topk(keys, self.sample_size, largest=False).indices
                keys, vals = keys[keep], vals[keep]
            self._keys, self._sample = keys, vals

    def merge_moments(self, other: _Accumulator) -> None:
        """Add ``other``'s counts and moments into this one (for totals over layers)."""
        n = self.count + other.count
        if n:
            delta = other.mean - self.mean
            self.m2 += other.m2 + delta * delta * self.count * other.count / n
            self.mean += delta * other.count / n
        self.count = n
        self.n_zero += other.n_zero
        self.n_near_zero += other.n_near_zero
        self.n_neg += other.n_neg

    def row(self) -> dict:
        c = self.count or 1  # an empty stream reports zeros, not NaN fractions
        return {
            "zero_frac": self.n_zero / c,
            "near_zero_frac": self.n_near_zero / c,
            "neg_frac": self.n_neg / c,
            "mean": self.mean if self.count else math.nan,
            "std": math.sqrt(self.m2 / self.count) if self.count else math.nan,  # population std (ddof=0)
            "count": self.count,
        }

    def histogram(self) -> Histogram:
        return Histogram(self.hist.copy(), self.edges, self.below, self.above)

    def sample(self) -> np.ndarray:
        return np.empty(0, np.float32) if self._sample is None else self._sample.numpy().copy()


# ---------------------------------------------------------------------------------------------
# Instruments


class MLPInstrument:
    """Hooks on every MLP of ``model`` for the duration of a ``with`` block."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.units = mlp_units(model)  # labels: layer, expert, role
        self.mlps = [u.mlp for u in self.units]
        self.is_moe = any(u.role != "dense" for u in self.units)
        self.attention_mask: torch.Tensor | None = None  # (B, T): 1 = real token, 0 = padding
        self._handles: list = []

    def _register(self) -> None:  # subclasses add their hooks
        raise NotImplementedError

    def __enter__(self):
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already active")
        self._register()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _tokens(self, x: torch.Tensor, mlp: nn.Module | None = None) -> torch.Tensor:
        """(B, T, F), or a routed expert's (n, F), -> (N, F): the rows of real tokens (all of them without an
        attention mask)."""
        if self.attention_mask is None:
            return x.reshape(-1, x.shape[-1])
        mask = self.attention_mask.to(device=x.device, dtype=torch.bool)
        routed = getattr(mlp, "token_index", None)
        if routed is not None:  # a routed expert sees the flat (B*T) positions routed to it
            return x[mask.reshape(-1)[routed]]
        if x.shape[:-1] == mask.shape:
            return x[mask]
        if x.ndim == 2 and x.shape[0] == mask.numel():  # an MoE block's shared expert runs on flat (B*T, H) rows
            return x[mask.reshape(-1)]
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; the activations are {tuple(x.shape)}")

    def labels(self, i: int) -> dict:
        """Column values that name unit ``i``: its layer, and for an MoE model its expert and role."""
        u = self.units[i]
        return (
            {"layer": u.layer, "expert": -1 if u.expert is None else u.expert, "role": u.role}
            if self.is_moe
            else {"layer": u.layer}
        )

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """``model(input_ids, attention_mask=...)`` with padded positions left out of the counts."""
        self.attention_mask = attention_mask
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self.attention_mask = None


class ActivationRecorder(MLPInstrument):
    """Streaming per-layer statistics, histograms and samples of gate, up, (up_act) and combined."""

    def __init__(
        self,
        model: nn.Module,
        kinds: tuple[str, ...] | None = None,
        eps: float = 1e-3,
        bins=DEFAULT_BINS,
        sample_size: int = 0,
        seed: int = 0,
    ):
        super().__init__(model)
        kinds = KINDS if kinds is None else tuple(kinds)
        bad = set(kinds) - set(KINDS)
        if bad:
            raise ValueError(f"unknown activation kinds {sorted(bad)}; valid: {', '.join(KINDS)}")
        self.kinds, self.eps, self.sample_size = kinds, float(eps), int(sample_size)
        # one set of edges per kind: a single array for all, or a {kind: edges} dict
        if isinstance(bins, dict):
            self.edges = {k: _check_edges(bins.get(k, DEFAULT_BINS)) for k in KINDS}
        else:
            self.edges = dict.fromkeys(KINDS, _check_edges(bins))
        self.generator = torch.Generator().manual_seed(seed)
        self._acc: dict[tuple[int, str], _Accumulator] = {}

    def _add(self, unit: int, kind: str, x: torch.Tensor) -> None:
        key = (unit, kind)
        if key not in self._acc:
            self._acc[key] = _Accumulator(self.edges[kind], self.eps, self.sample_size, self.generator)
        self._acc[key].update(self._tokens(x, self.mlps[unit]))

    def _register(self) -> None:
        for i, mlp in enumerate(self.mlps):
            up_act = getattr(mlp, "up_act_fn", None)  # GatedMLP only; Identity unless dReLU
            has_up_act = up_act is not None and not isinstance(up_act, nn.Identity)

            def on_gate(mod, args, out, i=i, mlp=mlp):
                with torch.no_grad():
                    self._add(i, "gate", mlp.act_fn(out))  # (B, T, F) post-activation

            def on_up(mod, args, out, i=i, mlp=mlp, has_up_act=has_up_act):
                with torch.no_grad():
                    if "up" in self.kinds:
                        self._add(i, "up", out)  # (B, T, F) pre-activation
                    if "up_act" in self.kinds and has_up_act:
                        self._add(i, "up_act", mlp.up_act_fn(out))

            def on_down(mod, args, i=i):
                with torch.no_grad():
                    self._add(i, "combined", args[0])  # (B, T, F), the input of down_proj
                # returning None leaves the input unchanged

            if "gate" in self.kinds:
                self._handles.append(mlp.gate_proj.register_forward_hook(on_gate))
            if "up" in self.kinds or ("up_act" in self.kinds and has_up_act):
                self._handles.append(mlp.up_proj.register_forward_hook(on_up))
            if "combined" in self.kinds:
                self._handles.append(mlp.down_proj.register_forward_pre_hook(on_down))

    def _order(self):
        return sorted(self._acc, key=lambda lk: (lk[0], KINDS.index(lk[1])))

    def to_frame(self) -> pd.DataFrame:
        """One row per (unit, kind): layer (MoE: expert, role; expert -1 for a shared expert or dense MLP), kind,
        zero_frac, near_zero_frac, neg_frac, mean, std, count. Units that saw no token have no row."""
        rows = [{**self.labels(u), "kind": kind, **self._acc[(u, kind)].row()} for u, kind in self._order()]
        cols = [*self.labels(0), "kind", "zero_frac", "near_zero_frac", "neg_frac", "mean", "std", "count"]
        return pd.DataFrame(rows, columns=cols)

    def overall(self) -> pd.DataFrame:
        """One row per kind, pooled over all layers (every value weighs the same)."""
        rows = []
        for kind in KINDS:
            accs = [self._acc[k] for k in self._order() if k[1] == kind]
            if accs:
                total = _Accumulator(self.edges[kind], self.eps, 0, self.generator)
                for a in accs:
                    total.merge_moments(a)
                rows.append({"kind": kind, **total.row()})
        return pd.DataFrame(rows, columns=["kind", "zero_frac", "near_zero_frac", "neg_frac", "mean", "std", "count"])

    def _keys(self, layer: int | None, kind: str, expert: int | None) -> list[tuple[int, str]]:
        keys = [
            k
            for k in self._order()
            if k[1] == kind
            and (layer is None or self.units[k[0]].layer == layer)
            and (expert is None or self.units[k[0]].expert == expert)
        ]
        if not keys:
            raise KeyError(f"nothing recorded for layer={layer}, expert={expert}, kind={kind!r}")
        return keys

    def histogram(self, layer: int | None, kind: str, expert: int | None = None) -> Histogram:
        """Histogram of one layer's ``kind`` values, or of all layers together (``layer=None``); in an MoE model
        of one routed ``expert`` of the layer(s), or of all its units (``expert=None``)."""
        hists = [self._acc[k].histogram() for k in self._keys(layer, kind, expert)]
        return sum(hists[1:], hists[0])

    def samples(self, layer: int | None, kind: str, expert: int | None = None) -> np.ndarray:
        """The random sample (float32, at most ``sample_size`` per unit); ``None`` joins all layers' (experts')."""
        return np.concatenate([self._acc[k].sample() for k in self._keys(layer, kind, expert)])


def record_activations(
    model: nn.Module,
    kinds: tuple[str, ...] | None = None,
    eps: float = 1e-3,
    bins=DEFAULT_BINS,
    sample_size: int = 0,
    seed: int = 0,
) -> ActivationRecorder:
    """``with record_activations(model) as rec: model(ids)`` then ``rec.to_frame()``, ``rec.histogram(0, "up")``.

    ``eps``: the near-zero threshold (``|x| <= eps``); ``bins``: histogram edges, one array or a
    ``{kind: edges}`` dict; ``sample_size``: raw values kept per (layer, kind), 0 for none.
    """
    return ActivationRecorder(model, kinds=kinds, eps=eps, bins=bins, sample_size=sample_size, seed=seed)


# ---------------------------------------------------------------------------------------------
# Over a whole token stream: what the notebooks call


def _chunks_of(token_ids, context_length: int) -> torch.Tensor:
    """Non-overlapping (N, context_length) rows of a 1-D stream (the tail that does not fill a row is dropped)."""
    ids = (token_ids if torch.is_tensor(token_ids) else torch.as_tensor(np.asarray(token_ids))).long()
    n = len(ids) // context_length
    if n == 0:
        raise ValueError(f"need at least {context_length} tokens; got {len(ids)}")
    return ids[: n * context_length].view(n, context_length)


def run_over_stream(instrument: MLPInstrument, token_ids, context_length: int = 512, batch_size: int = 4):
    """Run the instrument's model over ``token_ids`` in windows of ``context_length`` with the
    instrument's hooks on (eval mode, no autograd); returns the instrument, now filled."""
    model = instrument.model
    rows = _chunks_of(token_ids, context_length)
    was_training = model.training
    model.eval()
    try:
        with instrument, torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                model(input_ids=rows[i : i + batch_size], use_cache=False)
    finally:
        model.train(was_training)
    return instrument


def activation_stats(
    model: nn.Module, token_ids, context_length: int = 512, batch_size: int = 4, **recorder_kwargs
) -> ActivationRecorder:
    """Run ``model`` over ``token_ids`` in windows of ``context_length`` and return the filled recorder."""
    return run_over_stream(ActivationRecorder(model, **recorder_kwargs), token_ids, context_length, batch_size)
