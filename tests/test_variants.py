"""Gated-MLP variants against plain PyTorch formulas; the GatedMLP module; registry errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from turbosparse_lib.models.variants import VARIANTS, GatedMLP, combined_activation, get_variant

# Each variant written out by hand, independently of ACT2FN.
REFERENCE = {
    "swiglu": lambda g, u: g * torch.sigmoid(g) * u,
    "geglu": lambda g, u: 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u,
    "reglu": lambda g, u: torch.clamp(g, min=0) * u,
    "shifted_relu": lambda g, u: torch.clamp(g - 1.0, min=0) * u,
    "drelu": lambda g, u: torch.clamp(g, min=0) * torch.clamp(u, min=0),
    "relu2": lambda g, u: torch.clamp(g, min=0) ** 2 * u,
}


def test_registry_is_the_six_variants():
    assert set(VARIANTS) == set(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_combined_matches_reference(name):
    torch.manual_seed(0)
    g, u = torch.randn(3, 5, 16) * 2, torch.randn(3, 5, 16) * 2  # (B, T, F)
    torch.testing.assert_close(combined_activation(name, g, u), REFERENCE[name](g, u), rtol=1e-5, atol=1e-6)


def test_shifted_relu_threshold_is_configurable():
    g = torch.tensor([0.2, 0.5, 0.7, 2.0])
    u = torch.ones(4)
    assert combined_activation("shifted_relu", g, u, b=0.5).tolist() == pytest.approx([0.0, 0.0, 0.2, 1.5])


def test_drelu_zero_when_either_branch_is_negative():
    g = torch.tensor([1.0, -1.0, 1.0, -1.0])
    u = torch.tensor([2.0, 2.0, -2.0, -2.0])
    assert combined_activation("drelu", g, u).tolist() == [2.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_gated_mlp_forward(name):
    torch.manual_seed(0)
    mlp = GatedMLP(32, 64, name)
    x = torch.randn(2, 3, 32)  # (B, T, H)
    gate_pre, up_pre = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)  # (B, T, F)
    expected = F.linear(REFERENCE[name](gate_pre, up_pre), mlp.down_proj.weight)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_gated_mlp_has_llama_names_and_no_bias():
    mlp = GatedMLP(32, 64, "drelu")
    assert set(mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    assert mlp.gate_proj.weight.shape == (64, 32) and mlp.down_proj.weight.shape == (32, 64)
    assert set(GatedMLP(32, 64, bias=True).state_dict()) >= {"gate_proj.bias", "down_proj.bias"}


def test_from_linears_shares_weights_and_set_variant_keeps_them():
    torch.manual_seed(0)
    src = GatedMLP(32, 64, "swiglu")
    mlp = GatedMLP.from_linears(src.gate_proj, src.up_proj, src.down_proj, "drelu")
    assert mlp.gate_proj is src.gate_proj
    w = mlp.up_proj.weight.clone()
    mlp.set_variant("shifted_relu", b=0.25)
    assert torch.equal(mlp.up_proj.weight, w) and mlp.act_fn.b == 0.25 and mlp.variant_kwargs == {"b": 0.25}


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="unknown gated-MLP variant 'gelu'.*swiglu.*drelu"):
        get_variant("gelu")
    with pytest.raises(ValueError):
        GatedMLP(8, 16, "nope")


def test_unknown_variant_argument_raises():
    with pytest.raises(ValueError, match="accepted: none"):
        combined_activation("drelu", torch.zeros(2), torch.zeros(2), b=1.0)
    with pytest.raises(ValueError, match="accepted: b"):
        GatedMLP(8, 16, "shifted_relu", shift=1.0)
