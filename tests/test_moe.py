"""Mixture-of-experts models: the variant swap per expert, checkpoints, and the instruments inside experts.

Tiny random Mixtral, Qwen2-MoE and Qwen3-MoE models (hidden 32, 2 layers, 4 experts, top-2). Where bookkeeping
must be exact, a fixed router (token t -> experts t mod E and t+1 mod E) replaces the learned one, and the
experts' gate and up matrices are +-1 diagonals, so every combined value and every zero is known by hand.
"""

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from turbosparse_lib.models.architecture import MoEConfig
from turbosparse_lib.models.build import build_model
from turbosparse_lib.models.moe import ExpertMLP, GatedExperts, moe_settings
from turbosparse_lib.models.swap import apply_variant, count_parameters, load_model, mlp_units, native_variant
from turbosparse_lib.models.variants import combined_activation
from turbosparse_lib.sparsity.experts import ActivityCounter, expert_activity
from turbosparse_lib.sparsity.frequencies import neuron_frequencies
from turbosparse_lib.sparsity.instruments import record_activations
from turbosparse_lib.sparsity.masks import kept_count, threshold_mask, topk_keep, topk_mask

VOCAB, H, E, K = 128, 32, 4, 2
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=H,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    num_experts_per_tok=K,
)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**BASE, intermediate_size=16, num_local_experts=E),
    # a shared expert, and layer 1 a dense MLP (mlp_only_layers): every kind of unit in one model
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **BASE,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=E,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **BASE, intermediate_size=48, moe_intermediate_size=16, num_experts=E, norm_topk_prob=True
    ),
}


def tiny(family: str, experts_implementation: str | None = None):
    torch.manual_seed(0)
    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return AutoModelForCausalLM.from_config(CONFIGS[family](), **kw).eval()


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 12))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


class FixedRouter(nn.Module):
    """Flat token t goes to experts (t mod E, t+1 mod E) with weights (0.75, 0.25): known routing."""

    def forward(self, hidden_states):
        T = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        t = torch.arange(T)
        index = torch.stack([t % E, (t + 1) % E], dim=1)
        weights = torch.tensor([0.75, 0.25]).expand(T, 2)
        return torch.zeros(T, E), weights, index


def fixed_moe(variant: str):
    """A from-scratch MoE (hidden 32 = expert width, 2 layers, 4 experts) with the fixed router in every layer and
    gate = up = a +-1 diagonal per expert, so that combined = act(d * x) * up_act(d * x) exactly."""
    model = build_model(
        variant,
        hidden_size=H,
        num_layers=2,
        num_heads=4,
        intermediate_size=2 * H,
        vocab_size=VOCAB,
        context_length=64,
        moe=MoEConfig(E, K, H),
        seed=0,
    ).eval()
    model.config.output_router_logits = False  # the fixed router has no logits for the load-balancing loss
    signs = torch.where(torch.rand(2, E, H, generator=torch.Generator().manual_seed(3)) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        for li, layer in enumerate(model.model.layers):
            layer.mlp.gate = FixedRouter()
            for e in range(E):
                d = torch.diag(signs[li, e])
                layer.mlp.experts.gate_up_proj[e] = torch.cat([d, d])
    return model, signs


def block_inputs(model, ids):
    """The input of every layer's MoE block (after attention and norm), as the model computes it."""
    seen = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].reshape(-1, H).clone()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


# --- swap, checkpoints ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_native_swap_is_eager_bit_for_bit_and_shares_the_weights(family, ids):
    model = tiny(family, "eager")
    expected, default = logits(model, ids), logits(tiny(family), ids)  # eager, and the default grouped_mm
    native = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    keys = set(model.state_dict())
    apply_variant(model, native_variant(model.config))
    assert torch.equal(logits(model, ids), expected)
    assert torch.allclose(logits(model, ids), default, atol=1e-6)
    swapped = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert all(
        isinstance(s, GatedExperts) and s.gate_up_proj is n.gate_up_proj and s.down_proj is n.down_proj
        for s, n in zip(swapped, native)
    )
    assert set(model.state_dict()) == keys  # the views add no parameter: an ordinary transformers checkpoint
    assert count_parameters(model) == count_parameters(tiny(family))


def test_gradients_through_the_swapped_experts_are_transformers(ids):
    native, swapped = tiny("mixtral", "eager").train(), apply_variant(tiny("mixtral", "eager"), "swiglu").train()
    for m in (native, swapped):
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in native.named_parameters()}
    assert all(torch.allclose(p.grad, grads[n], atol=1e-7) for n, p in swapped.named_parameters())
    assert swapped.model.layers[0].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_hooked_and_plain_expert_paths_agree_bit_for_bit(ids):
    model = apply_variant(tiny("qwen3_moe"), "drelu")
    plain = logits(model, ids)  # gate and up as one matmul over the fused rows
    with record_activations(model, kinds=("gate", "up")):  # hooks on the views: gate and up one by one
        assert torch.equal(logits(model, ids), plain)


def test_units_are_labelled_by_layer_and_expert():
    units = mlp_units(apply_variant(tiny("qwen2_moe"), "drelu"))
    assert [(u.layer, u.expert, u.role) for u in units] == [(0, e, "routed") for e in range(E)] + [
        (0, None, "shared"),
        (1, None, "dense"),
    ]
    routed = units[2].mlp
    assert isinstance(routed, ExpertMLP) and routed.gate_proj.weight.shape == (16, H)
    assert routed.down_proj.weight.shape == (H, 16) and routed.act_fn is units[0].mlp.act_fn
    assert moe_settings(tiny("mixtral").config).expert_intermediate_size == 16


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_variant_changes_every_expert_and_round_trips_through_a_checkpoint(family, ids, tmp_path):
    model = tiny(family)
    before = logits(model, ids)
    apply_variant(model, "shifted_relu", b=0.25)
    after = logits(model, ids)
    assert not torch.allclose(after, before)
    assert all(u.mlp.act_fn.b == 0.25 for u in mlp_units(model))
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config.mlp_variant == "shifted_relu" and loaded.config.mlp_variant_kwargs == {"b": 0.25}
    assert torch.equal(logits(loaded, ids), after)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_from_scratch_moe_checkpoint_round_trips(ids, tmp_path):
    model = build_model(
        "drelu",
        hidden_size=H,
        num_layers=2,
        num_heads=4,
        intermediate_size=2 * H,
        vocab_size=VOCAB,
        moe=MoEConfig(E, K, H),
        seed=0,
    ).eval()
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.output_router_logits
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert isinstance(loaded.model.layers[0].mlp.experts, GatedExperts) and loaded.config.mlp_variant == "drelu"
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_native_experts_and_foreign_layouts_raise_clear_errors():
    with pytest.raises(NotImplementedError, match="apply_variant"):
        record_activations(tiny("mixtral"))
    native = tiny("mixtral").model.layers[0].mlp.experts
    native.has_bias = True
    with pytest.raises(NotImplementedError, match="has_bias"):
        GatedExperts.from_native(native)
    with pytest.raises(ValueError, match="experts_per_token"):
        MoEConfig(num_experts=2, experts_per_token=3)
    with pytest.raises(TypeError, match="unknown MoE fields"):
        build_model("drelu", preset="smoke", moe={"experts": 4})


# --- instruments and masks inside experts --------------------------------------------------------------------


def test_records_each_expert_on_its_routed_tokens_exactly(ids):
    model, signs = fixed_moe("drelu")
    x = block_inputs(model, ids)
    with record_activations(model, kinds=("gate", "combined")) as rec:
        logits(model, ids)
    df = rec.to_frame().set_index(["layer", "expert", "kind"])
    T = ids.numel()
    for li in range(2):
        for e in range(E):
            routed = [t for t in range(T) if e in (t % E, (t + 1) % E)]
            c = torch.relu(signs[li, e] * x[li][routed]) ** 2  # drelu of d * x, both branches
            row = df.loc[(li, e, "combined")]
            assert row["count"] == len(routed) * H
            assert row.zero_frac == (c == 0).double().mean().item()
            hist = rec.histogram(li, "combined", expert=e)
            assert hist.counts.sum() + hist.below + hist.above == len(routed) * H


def test_topk_masks_each_expert_within_its_own_neurons(ids):
    model, signs = fixed_moe("swiglu")
    x = block_inputs(model, ids)
    k = kept_count(0.75, H)
    out = {}
    hook = model.model.layers[0].mlp.register_forward_hook(lambda mod, a, o: out.__setitem__(0, o.reshape(-1, H)))
    with topk_mask(model, 0.75) as m:
        got = logits(model, ids)
    hook.remove()
    T = ids.numel()
    assert m.entries == [T * K // E * H] * (2 * E)  # the fixed router gives every expert T*K/E tokens
    assert sum(m.zeros) == 2 * T * K * (H - k)  # SwiGLU has no zeros of its own: exactly the masked ones
    assert m.realized_sparsity == (H - k) / H
    # the masked block by hand, layer 0: per token, each routed expert keeps the top-k of its own neurons
    experts = model.model.layers[0].mlp.experts
    ref = torch.zeros(T, H)
    for t in range(T):
        for e, w in ((t % E, 0.75), ((t + 1) % E, 0.25)):
            c = combined_activation("swiglu", signs[0, e] * x[0][t], signs[0, e] * x[0][t])
            ref[t] += w * (topk_keep(c, k) @ experts.down_proj[e].T)
    assert torch.allclose(out[0], ref, atol=1e-6)
    assert not torch.equal(got, logits(model, ids))


def test_threshold_mask_and_padding_inside_experts(ids):
    model, _ = fixed_moe("drelu")
    with threshold_mask(model, tau=1e9) as m:  # every entry below tau: all zero
        logits(model, ids)
    assert m.realized_sparsity == 1.0
    pad = torch.ones_like(ids)
    pad[:, -4:] = 0  # the last 4 positions of each row are padding
    with record_activations(model, kinds=("combined",)) as rec:
        rec.run(ids, attention_mask=pad)
    counted = rec.to_frame().groupby("layer")["count"].sum()
    assert (counted == int(pad.sum()) * K * H).all()  # each real token counted once per routed expert


def test_active_parameters_are_counted_exactly(ids):
    model, signs = fixed_moe("drelu")
    stream = ids.reshape(-1)
    x = block_inputs(model, stream[None, :24])
    units, act, counter = expert_activity(model, stream, context_length=24, batch_size=1)
    T = 24
    active_neurons = 0
    for li in range(2):
        for e in range(E):
            routed = [t for t in range(T) if e in (t % E, (t + 1) % E)]
            n = int((signs[li, e] * x[li][routed] > 0).sum())  # relu(dx) * relu(dx) != 0 iff dx > 0
            active_neurons += n
            row = units[(units.layer == li) & (units.expert == e)].iloc[0]
            assert row.tokens == len(routed) and row.load == len(routed) / (T * K)
            assert row.zero_frac == 1 - n / (len(routed) * H)
    total = count_parameters(model)
    expert_params = 2 * E * 3 * H * H
    always = total - expert_params
    assert act["always_active_params"] == always and act["routed_params"] == expert_params
    assert act["active_params"] == always + active_neurons * 3 * H / T
    assert act["routing_fraction"] == K / E
    assert act["routed_active_fraction"] == active_neurons * 3 * H / T / expert_params
    freq = counter.neuron_frequencies()
    assert freq.shape == (2, E, H)
    assert np.array_equal(neuron_frequencies(model, stream, context_length=24, batch_size=1), freq.reshape(2 * E, H))
    # under a top-k mask keeping 1 of 32 neurons, at most 1 neuron per routed expert is active
    _, masked, _ = expert_activity(model, stream, context_length=24, batch_size=1, mask=topk_mask(model, 1 - 1 / H))
    assert masked["routed_active_fraction"] <= K / E / H + 1e-12


def test_shared_expert_and_dense_layer_count_for_every_token(ids):
    model = apply_variant(tiny("qwen2_moe"), "drelu")
    units, act, _ = expert_activity(model, ids.reshape(-1), context_length=12, batch_size=2)
    T = ids.numel()
    assert (units[units.role != "routed"].tokens == T).all()
    assert units[units.role == "routed"].tokens.sum() == T * K
    assert units[units.role == "routed"].load.sum() == pytest.approx(1.0)
    assert act["routing_fraction"] == pytest.approx(K / E)
    with pytest.raises(ValueError, match="different widths"):
        neuron_frequencies(model, ids.reshape(-1), context_length=12)
    with pytest.raises(ValueError, match="no 'routed' units"):
        ActivityCounter(build_model("drelu", preset="smoke")).neuron_frequencies()
