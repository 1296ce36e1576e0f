"""Top-k and threshold masks on the combined activation (paper eq. 3-4), as PyTorch hooks.

- Top-k masking keeps, per token, the ``k = d - round(s * d)`` entries of combined with the
  largest magnitude, d the MLP width and ``round`` Python's (nearest, ties to even), the same
  count as the engine's ``inference.masks.TopKOracle``. Ties in |combined| go to the lower
  neuron index (a stable sort), so the kept set is deterministic and has exactly k entries.
- A mask is an ``MLPInstrument``: a forward pre-hook on every ``down_proj`` edits its input
  (combined) and counts the sparsity it realises, the model's own zeros included.
- In a mixture-of-experts model every routed expert is masked on its own (section 4: "the same
  method ... to control the sparsity in each expert"): per routed token, ``d`` is the expert's
  width, and only the tokens routed to the expert count towards its sparsity.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .instruments import MLPInstrument


def kept_count(sparsity: float, d: int) -> int:
    """Entries kept per token at ``sparsity`` over width ``d``: ``d - round(sparsity * d)``.

    Rounding the *zeroed* count to the nearest integer (Python's ``round``: ties to even)
    makes the realised sparsity the achievable one closest to ``sparsity``, and is immune to
    float noise such as ``(1 - 0.9) * 10 == 1.0000000000000002``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1]; got {sparsity}")
    return d - int(round(sparsity * d))


def topk_keep(c: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the ``k`` largest-magnitude entries of each row of ``c`` (..., F); ties: lower index kept."""
    d = c.shape[-1]
    if k >= d:
        return c
    if k <= 0:
        return torch.zeros_like(c)
    # a stable descending sort keeps equal magnitudes in index order, so ties are deterministic
    order = torch.sort(c.abs(), dim=-1, descending=True, stable=True).indices  # (..., F)
    keep = torch.zeros_like(c, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    return c.masked_fill(~keep, 0)


def threshold_keep(c: torch.Tensor, tau: float) -> torch.Tensor:
    """Zero the entries with ``|c| < tau`` (entries equal to ``tau`` are kept)."""
    return c.masked_fill(c.abs() < tau, 0)


class ActivationMask(MLPInstrument):
    """Masks combined (the input of every ``down_proj``) and counts the sparsity it realises.

    ``realized_sparsity`` is the fraction of combined entries that are zero after masking,
    including those that were zero already (the dReLU / ReGLU zeros).
    """

    def __init__(
        self,
        model: nn.Module,
        mode: Literal["topk", "threshold"],
        sparsity: float | None = None,
        tau: float | None = None,
    ):
        super().__init__(model)
        if mode == "topk":
            kept_count(sparsity, 1)  # validates sparsity
        elif mode == "threshold":
            if tau is None or tau < 0:
                raise ValueError(f"threshold masking needs tau >= 0; got {tau}")
        else:
            raise ValueError(f"unknown mask mode {mode!r}; valid: 'topk', 'threshold'")
        self.mode, self.sparsity, self.tau = mode, sparsity, tau
        self.zeros = [0] * len(self.mlps)  # per unit (layer; MoE: expert): zero entries after masking
        self.entries = [0] * len(self.mlps)  # per unit: entries seen

    def mask(self, c: torch.Tensor) -> torch.Tensor:
        """The masked copy of combined ``c`` (..., F)."""
        if self.mode == "topk":
            return topk_keep(c, kept_count(self.sparsity, c.shape[-1]))
        return threshold_keep(c, self.tau)

    def _register(self) -> None:
        for i, mlp in enumerate(self.mlps):

            def on_down(mod, args, i=i, mlp=mlp):
                masked = self.mask(args[0])  # (B, T, F); a routed expert's (n, F)
                with torch.no_grad():
                    counted = self._tokens(masked, mlp)
                    self.zeros[i] += int((counted == 0).sum())
                    self.entries[i] += counted.numel()
                return (masked, *args[1:])

            self._handles.append(mlp.down_proj.register_forward_pre_hook(on_down))

    @property
    def realized_sparsity(self) -> float:
        """Fraction of combined entries that were zero after masking, over all layers and tokens."""
        n = sum(self.entries)
        return sum(self.zeros) / n if n else math.nan

    def per_layer_sparsity(self) -> list[float]:
        """Realised sparsity per unit (``self.units``): per layer in a dense model, per expert in an MoE one."""
        return [z / n if n else math.nan for z, n in zip(self.zeros, self.entries)]


def topk_mask(model: nn.Module, sparsity: float) -> ActivationMask:
    """``with topk_mask(model, sparsity=0.9): ...`` keeps ``kept_count(sparsity, F)`` entries per token."""
    return ActivationMask(model, "topk", sparsity=sparsity)


def threshold_mask(model: nn.Module, tau: float) -> ActivationMask:
    """``with threshold_mask(model, tau=0.01): ...`` zeroes combined entries with ``|c| < tau``."""
    return ActivationMask(model, "threshold", tau=tau)
