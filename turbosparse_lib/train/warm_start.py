"""The layer-wise least-squares warm start of a ReLUfication (``relufication.relufy`` calls it before training).

Every swapped MLP is fitted in closed form to the original's, layer by layer in one forward pass: the sign of each
up row whose rectified half keeps more of the original signal (or, with ``split``, the layer's best halves of
neurons, both halves of the strongest), then ``down_proj`` by least squares on the new combined activations.
``warm_start(fit=False)`` measures the same error on tokens the fit did not see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WarmStart:
    target: str = "function"  # "function": match the original MLP on the student's inputs; "residual": restore
    ridge: float = 1e-3  # ridge term, relative to the mean diagonal of the Gram matrix
    sign_flip: bool = True  # pick each neuron's up sign (variants with a ReLU on up only)
    split: bool = False  # pick the layer's best halves of neurons instead, both halves of some (see ``_split_halves``)


# ----------------------------------------------------------------------------------------------
# the layer-wise warm start


def _gram_solve(C: torch.Tensor, Y: torch.Tensor, ridge: float, chunk: int = 4096) -> torch.Tensor:
    """argmin_W ||C W^T - Y||^2 + lam ||W||^2 for C (N, F), Y (N, H): W (H, F).

    The Gram matrix is accumulated in float32 chunks and solved in float64."""
    F_, H = C.shape[1], Y.shape[1]
    A = torch.zeros(F_, F_, dtype=torch.float64)
    B = torch.zeros(F_, H, dtype=torch.float64)
    for i in range(0, C.shape[0], chunk):
        c, y = C[i : i + chunk].float(), Y[i : i + chunk].float()
        A += (c.T @ c).double()
        B += (c.T @ y).double()
    lam = ridge * float(A.diagonal().mean()) + 1e-12
    A.diagonal().add_(lam)
    return torch.linalg.solve(A, B).T.float()  # (H, F)


def _half_energies(mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F,) each: the energy of every neuron's two rectified halves over the tokens ``x`` (N, H),
    ``|act(gate) relu(up)|^2`` and ``|act(gate) relu(-up)|^2``."""
    g = mlp.act_fn(mlp.gate_proj(x))  # (N, F)
    u = mlp.up_proj(x)
    return ((g * torch.relu(u)) ** 2).sum(0), ((g * torch.relu(-u)) ** 2).sum(0)


def _choose_up_signs(mlp, x: torch.Tensor) -> torch.Tensor:
    """+1/-1 per neuron: the sign of the up row whose rectified half keeps more of act(gate) * up's energy."""
    keep_pos, keep_neg = _half_energies(mlp, x)
    return torch.where(keep_neg > keep_pos, -1.0, 1.0).to(x.dtype)


def _split_halves(mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rectified halves of the layer's neurons to keep, at the same width: (neuron index, up sign) per slot.

    Under a linear up, a neuron's output splits exactly into two halves, ``act(g) relu(u) d - act(g) relu(-u) d``.
    A ReLU on up keeps one. ``_choose_up_signs`` keeps the better half of every neuron; this keeps the ``F`` best of
    all ``2F`` halves, ranked by the energy each puts into the residual stream (``|act(g) relu(+-u)|^2 |d|^2`` over
    the tokens, ``d`` the original down column). A neuron whose halves are both large keeps both, in two slots (its
    gate row copied, its up row once negated); the weakest neurons give up their slots. The down projection is
    refitted afterwards, so the halves need not be exact; the slots are sorted by neuron for a stable layout."""
    keep_pos, keep_neg = _half_energies(mlp, x)
    d2 = (mlp.down_proj.weight.float() ** 2).sum(0)  # (F,) squared norm of each down column
    energy = torch.cat([keep_pos * d2, keep_neg * d2])
    F_ = keep_pos.shape[0]
    best = torch.topk(energy, F_).indices.sort().values  # halves 0..F-1 are positive, F..2F-1 negative
    neuron = best % F_
    sign = torch.where(best >= F_, -1.0, 1.0).to(x.dtype)
    order = torch.argsort(neuron * 2 + (best >= F_).long())  # each neuron's halves side by side
    return neuron[order], sign[order]


def _layer_outputs(model: nn.Module, layers, sequences: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after every layer of ``model`` on ``sequences``, in layer order."""
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for layer in layers
    ]
    try:
        model(input_ids=sequences, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _fit_mlp(mod: nn.Module, xf: torch.Tensor, y: torch.Tensor, out: torch.Tensor, cfg: WarmStart):
    """Fit one swapped MLP in place: the up rows' signs (``cfg.sign_flip``) or the halves kept (``cfg.split``),
    then ``down_proj`` by least squares so that it maps the new combined activations of inputs ``xf`` (N, H) to the
    targets ``y`` (N, H). Returns its new output and its relative errors before (``out``) and after the fit."""
    relu_up = getattr(mod, "up_act_fn", None) is not None and not isinstance(mod.up_act_fn, nn.Identity)
    if relu_up and (cfg.split or cfg.sign_flip):
        if cfg.split:  # slots re-filled with the chosen neurons' gate and up rows, then signed like the flip
            neuron, s = _split_halves(mod, xf)
            for lin in (mod.gate_proj, mod.up_proj):
                lin.weight.copy_(lin.weight[neuron])
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias[neuron])
        else:
            s = _choose_up_signs(mod, xf)
        mod.up_proj.weight.mul_(s[:, None])
        if mod.up_proj.bias is not None:
            mod.up_proj.bias.mul_(s)
    c = mod.act_fn(mod.gate_proj(xf)) * mod.up_act_fn(mod.up_proj(xf))
    before = _rel_err(out, y)
    bias = mod.down_proj.bias if mod.down_proj.bias is not None else 0
    mod.down_proj.weight.copy_(_gram_solve(c, y - bias, cfg.ridge))
    new = mod.down_proj(c)
    return new, before, _rel_err(new, y)


def _rel_err(out: torch.Tensor, y: torch.Tensor) -> float:
    return float(((out.reshape(-1, out.shape[-1]) - y) ** 2).sum() / (y**2).sum().clamp_min(1e-30))


@torch.no_grad()
def warm_start(
    student: nn.Module, teacher: nn.Module, sequences: torch.Tensor, cfg: WarmStart = WarmStart(), fit: bool = True
) -> dict:
    """Fit every swapped MLP of ``student`` to ``teacher``'s, layer by layer, in one forward pass (see the module
    docstring). ``sequences`` (B, T) are the captured tokens. Returns per-layer relative errors (before / after the
    fit) and the seconds it took; the student is changed in place. With ``fit=False`` nothing changes and each
    layer's ``rel_err`` on ``sequences`` is measured against the same target: on tokens the fit did not see, it
    tells whether the least squares generalise or only memorised its tokens."""
    from ..models.swap import decoder_layers, is_moe, mlp_modules

    if is_moe(student) or is_moe(teacher):
        raise NotImplementedError(
            "the warm start fits one dense MLP per layer; it is not implemented for "
            "mixture-of-experts models: use a recipe without the lstsq warm start"
        )
    if cfg.target not in ("function", "residual"):
        raise ValueError(f"unknown warm-start target {cfg.target!r}; choose 'function' or 'residual'")
    t0 = time.perf_counter()
    s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
    s_mlps, t_mlps = mlp_modules(student), mlp_modules(teacher)
    if len(s_mlps) != len(t_mlps):
        raise ValueError(f"student has {len(s_mlps)} layers, teacher {len(t_mlps)}")
    teacher_out = _layer_outputs(teacher, t_layers, sequences) if cfg.target == "residual" else []
    residual: dict[int, torch.Tensor] = {}
    report = []

    def make_hooks(i: int):
        def on_norm(mod, args):  # the residual stream entering the MLP's norm
            residual[i] = args[0]

        def on_mlp(mod, args, out):
            xf = args[0].reshape(-1, args[0].shape[-1])
            if cfg.target == "function":
                y = t_mlps[i](xf)  # the original MLP on the inputs the fitted layers below produce
            else:
                y = (teacher_out[i] - residual[i]).reshape(-1, xf.shape[-1])
            if not fit:
                report.append({"layer": i, "rel_err": _rel_err(out, y)})
                return None
            new, before, after = _fit_mlp(mod, xf, y, out, cfg)
            report.append({"layer": i, "rel_err_before": before, "rel_err_after": after})
            return new.reshape(out.shape)

        return on_norm, on_mlp

    hooks = []
    for i, (layer, mlp) in enumerate(zip(s_layers, s_mlps)):
        on_norm, on_mlp = make_hooks(i)
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(on_norm))
        hooks.append(mlp.register_forward_hook(on_mlp))
    try:
        was = student.training
        student.eval()
        student(input_ids=sequences, use_cache=False)
        student.train(was)
    finally:
        for h in hooks:
            h.remove()
    return {
        "layers": report,
        "seconds": time.perf_counter() - t0,
        "tokens": int(sequences.numel()),
        "target": cfg.target,
        "ridge": cfg.ridge,
        "sign_flip": cfg.sign_flip,
        "split": cfg.split,
    }
