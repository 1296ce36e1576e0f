"""Mixture-of-experts blocks with any gated-MLP variant, and per-expert hook points for the instruments.

transformers (5.x, the version this project pins) stores the routed experts of Mixtral, Qwen2-MoE and Qwen3-MoE
*fused*: one ``MixtralExperts`` / ``Qwen2MoeExperts`` / ``Qwen3MoeExperts`` module per layer holding two 3-D
parameters, ``gate_up_proj`` (experts, 2F, H: the F gate rows, then the F up rows) and ``down_proj``
(experts, H, F), and dispatching its forward to ``eager``, ``batched_mm`` or ``grouped_mm`` code
(``config._experts_implementation``; ``grouped_mm`` by default, also on CPU). No expert has an ``nn.Linear`` a
hook could sit on, and the activation is ``ACT2FN[hidden_act]`` inside that code, so neither a top-k mask nor a
dReLU could be put in from outside.

Design:

- ``GatedExperts`` replaces the fused experts module and *shares* its two parameters (same names and shapes:
  the model's state dict is unchanged, and ``save_pretrained`` still writes an ordinary checkpoint; for
  Mixtral transformers converts it back to the hub's per-expert ``block_sparse_moe.experts.<e>.w1/w2/w3``
  layout, and ``from_pretrained`` fuses it again). Its forward is
  transformers' eager algorithm with batched bookkeeping (the experts that received tokens, in order, each on
  its rows in the eager loop's order; outputs scaled by the routing weights and summed per token), so with the
  native activation and top-2 routing the logits equal those of ``experts_implementation="eager"`` bit for bit.
- Each expert is reached through an ``ExpertMLP`` (``GatedExperts.mlps[e]``) whose ``gate_proj``, ``up_proj`` and
  ``down_proj`` are ``ExpertProjection`` modules: parameter-free views of rows of the fused tensors that behave
  like ``nn.Linear`` (``weight``, ``forward(x)``), and whose ``act_fn`` / ``up_act_fn`` are the variant's. The
  expert's computation runs through them, so every instrument of ``sparsity`` (forward hooks on gate and up,
  a forward pre-hook on ``down_proj`` that sees and may edit *combined*) works on one expert as on one dense
  MLP, on exactly the tokens routed to that expert.
- ``ExpertMLP.token_index`` holds, during its call, the flat (batch x time) positions of the tokens routed to the
  expert, so an instrument given an attention mask can leave padded positions out of an expert's counts.
- The router (``block.gate``) is left alone: its logits are still recorded by transformers
  (``output_router_logits``) and give the load-balancing loss.
- Qwen2-MoE's shared expert is a dense MLP with ``nn.Linear`` projections; it is swapped like any dense MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .registration import family
from .variants import get_variant

# model_type -> (config attribute: number of routed experts, config attribute: width F of one routed expert)
MOE_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "mixtral": ("num_local_experts", "intermediate_size"),
    "qwen2_moe": ("num_experts", "moe_intermediate_size"),
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
}


@dataclass(frozen=True)
class MoESettings:
    """The routing of an MoE model: experts per layer, experts per token, one routed expert's width."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int


def moe_settings(config) -> MoESettings:
    """Routing settings of a Mixtral / Qwen2-MoE / Qwen3-MoE config; other model types raise."""
    model_type = family(getattr(config, "model_type", None))
    if model_type not in MOE_MODEL_TYPES:
        raise NotImplementedError(
            f"model_type {model_type!r} is not a supported MoE; supported: {', '.join(MOE_MODEL_TYPES)}"
        )
    n_attr, f_attr = MOE_MODEL_TYPES[model_type]
    return MoESettings(getattr(config, n_attr), config.num_experts_per_tok, getattr(config, f_attr))


def is_moe_block(mlp: nn.Module) -> bool:
    """Whether a decoder layer's ``mlp`` is a routed block (a router ``gate`` and fused ``experts``)."""
    return isinstance(getattr(mlp, "experts", None), nn.Module) and hasattr(mlp.experts, "gate_up_proj")


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation, whose gradient is the gather ``grad[inverse]``: autograd's own backward of an
    index would scatter-add, which on CPU is several times slower than the gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class ExpertProjection(nn.Module):
    """One expert's gate, up or down projection: a view of rows of the fused tensors that acts as an ``nn.Linear``.

    It holds no parameter (the owning ``GatedExperts`` does), so hooks can be registered on it and the state dict
    is unchanged. ``weight`` is read on every call, so it follows the owner across ``.to()`` and in-place edits.
    """

    bias = None  # transformers' fused experts of these families have no biases

    def __init__(self, owner: GatedExperts, expert: int, which: Literal["gate", "up", "down"]):
        super().__init__()
        if which not in ("gate", "up", "down"):
            raise ValueError(f"which must be 'gate', 'up' or 'down'; got {which!r}")
        self.__dict__["_owner"] = owner  # a plain reference, not a submodule: the owner holds *us*
        self.expert, self.which = expert, which

    @property
    def weight(self) -> torch.Tensor:
        """(out, in) as in ``nn.Linear``: (F, H) for gate and up, (H, F) for down; a view, not a copy."""
        o, F_ = self._owner, self._owner.intermediate_size
        if self.which == "gate":
            return o.gate_up_proj[self.expert, :F_]
        if self.which == "up":
            return o.gate_up_proj[self.expert, F_:]
        return o.down_proj[self.expert]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T``; ``weight`` (this view's rows, passed by ``GatedExperts.forward``) saves a lookup."""
        return F.linear(x, self.weight if weight is None else weight)

    def extra_repr(self) -> str:
        return f"expert={self.expert}, {self.which}, in={self.in_features}, out={self.out_features}"


class ExpertMLP(nn.Module):
    """Expert ``e`` of a ``GatedExperts`` as a gated MLP:
    ``down_proj(act_fn(gate_proj(x)) * up_act_fn(up_proj(x)))``."""

    def __init__(self, owner: GatedExperts, expert: int):
        super().__init__()
        self.expert = expert
        self.gate_proj = ExpertProjection(owner, expert, "gate")
        self.up_proj = ExpertProjection(owner, expert, "up")
        self.down_proj = ExpertProjection(owner, expert, "down")
        self.token_index: torch.Tensor | None = None  # during a call: flat positions of the routed tokens

    def forward(self, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (n routed tokens, H) -> (n, H); ``weights``: the expert's (gate_up (2F, H), down (H, F)) rows, or None.

        Without hooks on ``gate_proj`` and ``up_proj`` (training, plain inference) gate and up are one matmul over
        the fused rows, as transformers computes them; with hooks each goes through its view, so the hooks see it.
        Both give the same values (a matmul over a block of rows equals that block of the fused matmul).
        """
        gate_up, down = weights if weights is not None else (None, None)
        if gate_up is not None and not (_hooked(self.gate_proj) or _hooked(self.up_proj)):
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        else:
            F_ = self.gate_proj.out_features
            gate = self.gate_proj(x, None if gate_up is None else gate_up[:F_])
            up = self.up_proj(x, None if gate_up is None else gate_up[F_:])
        return self.down_proj(self.act_fn(gate) * self.up_act_fn(up), down)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook (the module's own or a global one) would see this module's call."""
    from torch.nn.modules import module as _m

    return bool(
        module._forward_hooks or module._forward_pre_hooks or _m._global_forward_hooks or _m._global_forward_pre_hooks
    )


class GatedExperts(nn.Module):
    """The routed experts of one MoE layer, fused as in transformers, with any gated-MLP variant."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, variant: str = "swiglu", **variant_kwargs
    ):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.mlps = nn.ModuleList(ExpertMLP(self, e) for e in range(num_experts))
        self.set_variant(variant, **variant_kwargs)

    @classmethod
    def from_native(cls, native: nn.Module, variant: str = "swiglu", **variant_kwargs) -> GatedExperts:
        """A ``GatedExperts`` that *shares* the parameters of transformers' fused experts module (no copy)."""
        for flag, want in (
            ("has_gate", True),
            ("has_bias", False),
            ("is_transposed", False),
            ("is_concatenated", True),
        ):
            if getattr(native, flag, want) != want:
                raise NotImplementedError(
                    f"{type(native).__name__} has {flag}={not want}; only gated, bias-free experts "
                    "with [gate; up] rows in (experts, out, in) layout are supported"
                )
        E, twoF, H = native.gate_up_proj.shape
        if native.down_proj.shape != (E, H, twoF // 2):
            raise NotImplementedError(
                f"{type(native).__name__}: down_proj {tuple(native.down_proj.shape)} does not "
                f"match gate_up_proj {tuple(native.gate_up_proj.shape)}"
            )
        experts = cls.__new__(cls)
        nn.Module.__init__(experts)
        experts.num_experts, experts.hidden_dim, experts.intermediate_size = E, H, twoF // 2
        experts.gate_up_proj, experts.down_proj = native.gate_up_proj, native.down_proj
        experts.mlps = nn.ModuleList(ExpertMLP(experts, e) for e in range(E))
        experts.set_variant(variant, **variant_kwargs)
        experts.train(native.training)
        return experts

    def set_variant(self, variant: str, **variant_kwargs) -> None:
        """Switch every expert's activations in place; the weights are untouched."""
        spec = get_variant(variant)
        self.variant, self.variant_kwargs = spec.name, spec.kwargs(**variant_kwargs)
        self.act_fn = spec.gate_activation(**self.variant_kwargs)
        self.up_act_fn = spec.up_activation()
        for mlp in self.mlps:  # one activation module shared by all experts (activations hold no parameters)
            mlp.act_fn, mlp.up_act_fn = self.act_fn, self.up_act_fn

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states (T, H); top_k_index, top_k_weights (T, k) from the router -> (T, H).

        The (token, slot) pairs are sorted by expert, then slot, then token (the order in which the eager loop
        gathers an expert's rows), each expert runs once on its contiguous block, and the outputs, scaled by the
        routing weights, are summed over each token's k slots: transformers' ``batched_mm`` bookkeeping with a
        loop over experts. On CPU, ``index_add_`` (the eager path) and a full-size gradient buffer per sliced
        parameter cost more than the expert matmuls. Sums of two slots are order-free, so for top-2 (Mixtral)
        the result is the eager path's bit for bit; for top-k > 2 it is to float rounding.
        """
        T, k = top_k_index.shape
        flat_e = top_k_index.reshape(-1)  # (T*k,) expert of each (token, slot)
        pair = torch.arange(T * k, device=flat_e.device)
        # sorted by (expert, slot, token): each expert's rows in the order the eager loop gathers them
        order = torch.argsort(flat_e * (T * k) + (pair % k) * T + pair // k)
        inverse = torch.empty_like(order).index_copy_(0, order, pair)
        counts = torch.bincount(flat_e, minlength=self.num_experts).tolist()
        tokens = order // k  # the token of each sorted pair
        x_pairs = hidden_states[:, None, :].expand(T, k, hidden_states.shape[-1]).reshape(T * k, -1)
        blocks = _PermuteRows.apply(x_pairs, order, inverse).split(counts)  # split: one gradient buffer, not E
        # one view per expert, taken once: autograd then builds one gradient per parameter (unbind -> stack)
        gate_ups, downs = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outs, start = [], 0
        for e, (n, x_e) in enumerate(zip(counts, blocks)):
            if n == 0:
                continue
            mlp = self.mlps[e]
            mlp.token_index = tokens[start : start + n]
            try:
                outs.append(mlp(x_e, (gate_ups[e], downs[e])))
            finally:
                mlp.token_index = None
            start += n
        out = _PermuteRows.apply(torch.cat(outs), inverse, order)  # (T*k, H) back in (token, slot) order
        out = out * top_k_weights.reshape(-1, 1)
        return out.view(T, k, -1).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        kw = "".join(f", {k}={v}" for k, v in self.variant_kwargs.items())
        return (
            f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_size}, "
            f"variant={self.variant!r}{kw}"
        )
