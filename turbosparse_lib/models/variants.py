"""Gated-MLP variants by name: SwiGLU, GeGLU, ReGLU, shifted ReLU, dReLU, squared ReLU.

A gated MLP (paper eq. 1) computes ``down(Combined(x))`` with
``Combined(x) = act_gate(x W_gate) * act_up(x W_up)``; a variant is the pair of activations.

Design:

- The registry holds *gated-MLP variants*, not activation functions: dReLU (paper eq. 2) puts a
  ReLU on both branches, which no single ``hidden_act`` can say.
- Activations come from transformers' ``ACT2FN`` (``silu``, ``gelu_pytorch_tanh``, ``relu``,
  ``relu2``), so swapping a Llama's native MLP for ``GatedMLP("swiglu")`` runs the very same
  ops and reproduces its logits bit for bit. Only the shifted ReLU is our own module.
- ``GatedMLP`` keeps Llama's names ``gate_proj``, ``up_proj``, ``down_proj`` (and ``act_fn``
  for the gate activation), so a checkpoint's state dict maps one to one, and instruments
  written for transformers' native MLPs work on it unchanged.
- The input of ``down_proj`` is always ``Combined(x)``: forward hooks on ``down_proj`` see
  (and top-k masks edit) exactly the paper's combined activation.
- Variant keyword arguments (only ``b`` of ``shifted_relu`` today) are validated against the
  variant's own defaults, so a typo raises instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers.activations import ACT2FN

VariantName = Literal["swiglu", "geglu", "reglu", "shifted_relu", "drelu", "relu2"]


class ShiftedReLU(nn.Module):
    """``relu(x - b)``: a ReLU whose threshold is moved to ``b`` (shifted ReLU, paper ref. [42])."""

    def __init__(self, b: float = 1.0):
        super().__init__()
        self.b = float(b)  # a plain float, not a parameter: it is recorded in the config, not the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x - self.b)

    def extra_repr(self) -> str:
        return f"b={self.b}"


# The activations a variant is built from. Each has a torch module (``ACT2FN`` where transformers has
# one) and an integer code for the Numba kernels (``inference.kernels``), which implement each one.
GATE_ACTIVATIONS: dict[str, int] = {"silu": 0, "gelu_pytorch_tanh": 1, "relu": 2, "shifted_relu": 3, "relu2": 4}
UP_ACTIVATIONS: dict[str, int] = {"identity": 0, "relu": 1}
# Gate activations that are exactly zero on part of their domain, so a neuron whose gate is off
# can be skipped (its up row never read).
EXACT_ZERO_GATES = frozenset({"relu", "shifted_relu", "relu2"})


@dataclass(frozen=True)
class GatedVariant:
    """One gated-MLP variant: ``combined = gate_act(gate_pre) * up_act(up_pre)``.

    This one table drives the torch modules (``GatedMLP``), the Numba kernels (``kernel_code``)
    and the mapping from a transformers config's activation name (``hf_acts``): a variant added
    here, built from the activations above, reaches all three.
    """

    name: str
    gate_act: str  # a key of GATE_ACTIVATIONS
    up_act: str  # a key of UP_ACTIVATIONS: "relu" for dReLU only (paper eq. 2)
    formula: str  # for error messages, tables and the docs
    defaults: dict[str, Any] = field(default_factory=dict)  # accepted keyword arguments
    hf_acts: tuple[str, ...] = ()  # transformers activation names whose native MLP is this variant

    def __post_init__(self):
        if self.gate_act not in GATE_ACTIVATIONS or self.up_act not in UP_ACTIVATIONS:
            raise ValueError(
                f"variant {self.name!r}: gate_act must be one of {sorted(GATE_ACTIVATIONS)} and up_act "
                f"one of {sorted(UP_ACTIVATIONS)}; got {self.gate_act!r}, {self.up_act!r}"
            )

    @property
    def relu_up(self) -> bool:
        return self.up_act == "relu"

    @property
    def exact_zeros(self) -> bool:
        """Whether combined has exact zeros (a ReLU-family gate): the engine's lossless oracle needs them."""
        return self.gate_act in EXACT_ZERO_GATES

    def kwargs(self, **kw) -> dict[str, Any]:
        """The variant's keyword arguments: its defaults updated by ``kw``; unknown keys raise."""
        unknown = set(kw) - set(self.defaults)
        if unknown:
            accepted = ", ".join(self.defaults) or "none"
            raise ValueError(f"variant {self.name!r} got unknown arguments {sorted(unknown)}; accepted: {accepted}")
        return {**self.defaults, **kw}

    def gate_activation(self, **kw) -> nn.Module:
        kw = self.kwargs(**kw)
        if self.gate_act == "shifted_relu":
            return ShiftedReLU(**kw)
        return ACT2FN[self.gate_act]  # ACT2FN builds a fresh module on each lookup

    def up_activation(self) -> nn.Module:
        return nn.ReLU() if self.relu_up else nn.Identity()

    def kernel_code(self, **kw) -> tuple[int, float]:
        """``(code, shift)`` for the Numba kernels: code = 2 * gate code + up code; shift = b of shifted ReLU."""
        kw = self.kwargs(**kw)
        return 2 * GATE_ACTIVATIONS[self.gate_act] + UP_ACTIVATIONS[self.up_act], float(kw.get("b", 0.0))


VARIANTS: dict[str, GatedVariant] = {}


def register_variant(variant: GatedVariant) -> GatedVariant:
    """Add ``variant`` to the registry (torch modules, kernels and engine all read it); a name is registered once."""
    if variant.name in VARIANTS and VARIANTS[variant.name] != variant:
        raise ValueError(f"a different variant named {variant.name!r} is already registered")
    VARIANTS[variant.name] = variant
    return variant


for _v in (
    GatedVariant("swiglu", "silu", "identity", "silu(gate) * up", hf_acts=("silu", "swish")),  # swish is SiLU in ACT2FN
    GatedVariant("geglu", "gelu_pytorch_tanh", "identity", "gelu_tanh(gate) * up", hf_acts=("gelu_pytorch_tanh",)),
    GatedVariant("reglu", "relu", "identity", "relu(gate) * up", hf_acts=("relu",)),
    GatedVariant("shifted_relu", "shifted_relu", "identity", "relu(gate - b) * up", {"b": 1.0}),
    GatedVariant("drelu", "relu", "relu", "relu(gate) * relu(up)"),  # paper eq. 2
    GatedVariant("relu2", "relu2", "identity", "relu(gate)**2 * up", hf_acts=("relu2",)),
):
    register_variant(_v)


def variant_of_hf_act(act: str) -> str:
    """The variant a native transformers MLP computes, given its config's activation name.

    Only exact matches: HF's ``gelu`` is the erf GELU, which no variant here computes (GeGLU is
    ``gelu_pytorch_tanh``), so it raises instead of decoding a slightly different model.
    """
    for v in VARIANTS.values():
        if act in v.hf_acts:
            return v.name
    known = sorted(a for v in VARIANTS.values() for a in v.hf_acts)
    raise NotImplementedError(f"no gated-MLP variant for activation {act!r}; known: {', '.join(known)}")


def get_variant(name: str) -> GatedVariant:
    """The variant called ``name``; an unknown name raises with the valid names listed."""
    try:
        return VARIANTS[name]
    except KeyError:
        valid = ", ".join(f"{v.name} ({v.formula})" for v in VARIANTS.values())
        raise ValueError(f"unknown gated-MLP variant {name!r}; valid variants: {valid}") from None


def combined_activation(name: str, gate_pre: torch.Tensor, up_pre: torch.Tensor, **kw) -> torch.Tensor:
    """``Combined`` of variant ``name`` from the projections' outputs ``gate_pre``, ``up_pre`` (same shape)."""
    v = get_variant(name)
    return v.gate_activation(**kw)(gate_pre) * v.up_activation()(up_pre)


class GatedMLP(nn.Module):
    """``down_proj(act_fn(gate_proj(x)) * up_act_fn(up_proj(x)))`` for any variant in ``VARIANTS``.

    Same parameter names and shapes as transformers' ``LlamaMLP``.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        variant: str = "swiglu",
        bias: bool = False,
        **variant_kwargs,
    ):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.set_variant(variant, **variant_kwargs)

    @classmethod
    def from_linears(
        cls, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, variant: str = "swiglu", **variant_kwargs
    ) -> GatedMLP:
        """A GatedMLP that *shares* the given projections (no copy: same weights, device and dtype)."""
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate_proj, up_proj, down_proj
        mlp.set_variant(variant, **variant_kwargs)
        return mlp

    def set_variant(self, variant: str, **variant_kwargs) -> None:
        """Switch the activations in place; the weights are untouched."""
        spec = get_variant(variant)
        self.variant = spec.name
        self.variant_kwargs = spec.kwargs(**variant_kwargs)
        self.act_fn = spec.gate_activation(**self.variant_kwargs)  # the name LlamaMLP uses
        self.up_act_fn = spec.up_activation()

    def set_up_slope(self, slope: float) -> None:
        """The negative slope of a ReLU up branch (dReLU): 0 is the variant itself, 1 a linear up (ReGLU's).

        ReLUfication can bring dReLU's up ReLU in gradually (``TrainConfig.up_anneal_fraction``); only the
        variant's own slope, 0, is ever saved. A variant whose up branch is linear refuses."""
        if not get_variant(self.variant).relu_up:
            raise ValueError(f"variant {self.variant!r} has a linear up branch: there is no up ReLU to anneal")
        if not 0.0 <= slope <= 1.0:
            raise ValueError(f"the up branch's negative slope must be in [0, 1]; got {slope}")
        self.up_act_fn = nn.LeakyReLU(slope) if slope > 0 else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H)
        combined = self.act_fn(self.gate_proj(x)) * self.up_act_fn(self.up_proj(x))  # (B, T, F)
        return self.down_proj(combined)  # (B, T, H)

    def extra_repr(self) -> str:
        kw = "".join(f", {k}={v}" for k, v in self.variant_kwargs.items())
        return f"variant={self.variant!r}{kw}"
