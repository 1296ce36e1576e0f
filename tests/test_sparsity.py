"""Activation instruments on hand-made inputs (exact counts) and top-k / threshold masks."""

import numpy as np
import pytest
import torch

from turbosparse_lib.models.build import build_model
from turbosparse_lib.models.swap import mlp_modules
from turbosparse_lib.sparsity.instruments import record_activations
from turbosparse_lib.sparsity.masks import kept_count, threshold_keep, threshold_mask, topk_keep, topk_mask

H = 8  # hidden == intermediate, so the projections can be identities


def tiny(variant="drelu", identity=False):
    torch.manual_seed(0)
    model = build_model(variant, hidden_size=H, num_layers=2, num_heads=2, intermediate_size=H, vocab_size=32)
    if identity:  # gate_pre == up_pre == x: every instrumented value is known by hand
        with torch.no_grad():
            for mlp in mlp_modules(model):
                mlp.gate_proj.weight.copy_(torch.eye(H))
                mlp.up_proj.weight.copy_(torch.eye(H))
    return model.eval()


# values that hit zero, the eps boundary, both bin-range ends and beyond them
X = torch.tensor(
    [
        [[-5.0, -2.0, -0.001, 0.0, 0.0005, 0.001, 2.0, 7.0], [1.0, -1.0, 0.5, -0.5, 0.0, 3.0, -3.0, 0.25]],
    ]
)  # (B=1, T=2, H=8)
EDGES = np.array([-3.0, -1.0, 0.0, 1.0, 2.0])


def test_counts_and_fractions_are_exact():
    model = tiny("drelu", identity=True)
    mlp = mlp_modules(model)[0]
    with record_activations(model, eps=1e-3, bins=EDGES) as rec, torch.no_grad():
        mlp(X)
        mlp(X)  # two batches: counts add up
    df = rec.to_frame().set_index("kind")
    assert list(df.index) == ["gate", "up", "up_act", "combined"]  # only layer 0 was called
    assert (df["count"] == 32).all()
    x = X.flatten().double().numpy()
    up = df.loc["up"]
    assert up.zero_frac == np.mean(x == 0) == 2 / 16  # two exact zeros in each batch
    assert up.near_zero_frac == np.mean(np.abs(x) <= 1e-3)  # -0.001, 0, 0.0005, 0.001, 0
    assert up.neg_frac == np.mean(x < 0)
    assert up["mean"] == pytest.approx(x.mean()) and up["std"] == pytest.approx(x.std())
    relu = np.maximum(x, 0)
    for kind, ref in [("gate", relu), ("up_act", relu), ("combined", relu**2)]:
        assert df.loc[kind].zero_frac == np.mean(ref == 0)
        assert df.loc[kind].neg_frac == 0
    assert df.loc["combined"]["mean"] == pytest.approx((relu**2).mean())


def test_histograms_match_numpy_and_count_out_of_range():
    model = tiny("drelu", identity=True)
    mlp = mlp_modules(model)[0]
    with record_activations(model, bins=EDGES) as rec, torch.no_grad():
        mlp(X[:, :1])
        mlp(X[:, 1:])
    x = X.flatten().double().numpy()
    h = rec.histogram(0, "up")
    np.testing.assert_array_equal(h.counts, np.histogram(x, EDGES)[0])  # 2.0 lands in the closed last bin
    assert (h.below, h.above) == (1, 2)  # -5; 3 and 7
    assert h.counts.sum() + h.below + h.above == x.size
    np.testing.assert_allclose(h.density, np.histogram(x, EDGES, density=True)[0])


def test_per_kind_bins_pooling_over_layers_and_samples():
    model = tiny("swiglu")
    bins = {"combined": np.linspace(-1, 1, 11)}
    with record_activations(model, bins=bins, sample_size=20, seed=0) as rec:
        rec.run(torch.randint(0, 32, (2, 6)))
    df = rec.to_frame()
    assert sorted(df.layer.unique()) == [0, 1] and "up_act" not in set(df.kind)  # SwiGLU has no up activation
    assert (df["count"] == 2 * 6 * H).all()
    assert len(rec.histogram(0, "combined").counts) == 10 and len(rec.histogram(0, "gate").counts) == 160
    both = rec.histogram(None, "up")
    assert (both.counts == rec.histogram(0, "up").counts + rec.histogram(1, "up").counts).all()
    overall = rec.overall().set_index("kind")
    assert overall.loc["up", "count"] == 2 * 2 * 6 * H
    up = df[df.kind == "up"]
    assert overall.loc["up", "neg_frac"] == pytest.approx(up.neg_frac.mean())
    assert overall.loc["up", "mean"] == pytest.approx(up["mean"].mean())
    assert rec.samples(0, "up").shape == (20,) and rec.samples(None, "up").shape == (40,)


def test_sample_is_bounded_and_drawn_from_the_stream():
    model = tiny("drelu", identity=True)
    mlp = mlp_modules(model)[0]
    values = torch.arange(64.0).reshape(8, 1, H)  # 64 distinct values in 8 batches
    with record_activations(model, kinds=("up",), sample_size=10, seed=1) as rec, torch.no_grad():
        for batch in values:
            mlp(batch[None])
    s = rec.samples(0, "up")
    assert s.shape == (10,) and len(set(s.tolist())) == 10 and set(s.tolist()) <= set(range(64))


def test_attention_mask_excludes_padding():
    model = tiny("drelu", identity=True)
    mlp = mlp_modules(model)[0]
    with record_activations(model, eps=1e-3) as rec, torch.no_grad():
        rec.attention_mask = torch.tensor([[1, 0]])  # the second position is padding
        mlp(X)
    up = rec.to_frame().set_index("kind").loc["up"]
    first = X[0, 0].double().numpy()
    assert up["count"] == H and up.zero_frac == np.mean(first == 0) and up.neg_frac == np.mean(first < 0)


def test_hooks_are_removed_on_exit():
    model = tiny()
    with record_activations(model), topk_mask(model, 0.5):
        pass
    assert all(not m.down_proj._forward_pre_hooks and not m.gate_proj._forward_hooks for m in mlp_modules(model))


@pytest.mark.parametrize(
    "sparsity, d, k",
    [(0.0, 64, 64), (0.5, 64, 32), (0.9, 64, 6), (0.9, 10, 1), (0.85, 20, 3), (0.5, 5, 3), (0.7, 5, 1), (1.0, 8, 0)],
)
def test_kept_count_rounding(sparsity, d, k):
    assert kept_count(sparsity, d) == k  # d - round(s * d), ties to even: round(2.5) == 2, round(3.5) == 4


def test_kept_count_rejects_out_of_range():
    with pytest.raises(ValueError):
        kept_count(1.5, 8)


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    torch.manual_seed(0)
    c = torch.randn(3, 5, 32)  # (B, T, F), distinct magnitudes
    out = topk_keep(c, 7)
    assert ((out != 0).sum(-1) == 7).all()
    top = torch.argsort(c.abs(), dim=-1, descending=True)[..., :7]
    ref = torch.zeros_like(c).scatter(-1, top, c.gather(-1, top))
    assert torch.equal(out, ref)


def test_topk_ties_keep_lower_indices():
    c = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert topk_keep(c, 3).tolist() == [[1.0, -1.0, 1.0, 0.0, 0.0], [0.0] * 5]
    assert torch.equal(topk_keep(c, 5), c) and not topk_keep(c, 0).any()


def test_threshold_keep():
    c = torch.tensor([-0.5, -0.25, 0.125, 0.25, 0.75, -0.0625])
    assert threshold_keep(c, 0.25).tolist() == [-0.5, -0.25, 0.0, 0.25, 0.75, 0.0]  # |c| == tau is kept


def test_topk_mask_on_a_model_and_realised_sparsity():
    model = tiny("swiglu")  # SwiGLU has no exact zeros: masking alone sets the sparsity
    ids = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        dense = model(ids).logits
        with topk_mask(model, sparsity=0.75) as mask, record_activations(model, kinds=("combined",)) as rec:
            sparse = model(ids).logits
        after = model(ids).logits
    k = kept_count(0.75, H)  # 2 of 8
    assert rec.to_frame().zero_frac.tolist() == [1 - k / H] * 2  # the recorder entered inside sees masked values
    assert mask.realized_sparsity == 1 - k / H and mask.per_layer_sparsity() == [0.75, 0.75]
    assert not torch.allclose(sparse, dense) and torch.equal(after, dense)  # hooks gone, weights untouched
    with torch.no_grad(), topk_mask(model, sparsity=0.0):
        assert torch.equal(model(ids).logits, dense)


def test_realised_sparsity_counts_existing_zeros_and_threshold_mode():
    model = tiny("drelu", identity=True)
    mlp = mlp_modules(model)[0]
    with threshold_mask(model, tau=0.5) as mask, torch.no_grad():
        mlp(X)
    combined = np.maximum(X.flatten().numpy(), 0) ** 2
    assert mask.realized_sparsity == np.mean(combined < 0.5)  # drelu zeros and small values alike
    with pytest.raises(ValueError):
        threshold_mask(model, tau=-1.0)


def test_native_transformers_mlp_gives_the_same_statistics_as_gated_mlp():
    from transformers import LlamaConfig, LlamaForCausalLM

    from turbosparse_lib.models.swap import apply_variant

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=H,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=32,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 32, (2, 5))
    frames = []
    for _ in range(2):  # native LlamaMLP first, then the same weights as GatedMLP("swiglu")
        with record_activations(model, eps=1e-2) as rec:
            rec.run(ids)
        frames.append(rec.to_frame())
        apply_variant(model, "swiglu")
    assert list(frames[0].kind[:3]) == ["gate", "up", "combined"]
    assert frames[0].equals(frames[1])


def test_activation_stats_and_topk_sweep_over_a_stream():
    from transformers import LlamaConfig, LlamaForCausalLM

    from turbosparse_lib.eval.sweeps import topk_sweep
    from turbosparse_lib.models.swap import apply_variant
    from turbosparse_lib.sparsity.instruments import activation_stats

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=64,
    )
    model = apply_variant(LlamaForCausalLM(cfg), "drelu")
    ids = torch.randint(0, 50, (70,))
    rec = activation_stats(model, ids, context_length=16, batch_size=3)
    frame = rec.to_frame()
    # 70 tokens -> 4 full windows of 16 = 64 tokens, 64 neurons each
    assert set(frame["count"]) == {64 * 64}
    sweep = topk_sweep(model, ids, [0.0, 0.5, 0.9], context_length=16)
    assert list(sweep.sparsity) == [0.0, 0.5, 0.9]
    assert sweep.realized_sparsity.iloc[2] >= 0.9 - 1e-9
    assert (sweep.ppl_lo <= sweep.ppl).all() and (sweep.ppl <= sweep.ppl_hi).all()
    assert sweep.ratio.iloc[0] == 1.0 and not sweep.distinguishable.iloc[0]  # the unmasked model against itself
    assert sweep.realized_sparsity.is_monotonic_increasing


def test_topk_sparsity_at_a_fixed_quality():
    """``limit_ppl``: the top-k level at which a model is still as good as a given perplexity; NaN if it never is.
    ``sparsity_table(matched_to=...)``: that level for every model at one model's quality."""
    from turbosparse_lib.eval.compare import sparsity_table
    from turbosparse_lib.eval.sweeps import topk_tolerance

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (256,), generator=g)
    a, b = build_model("drelu", preset="smoke", seed=0), build_model("drelu", preset="smoke", seed=1)
    own = topk_tolerance(a, ids, context_length=64, iters=3)
    assert topk_tolerance(a, ids, context_length=64, iters=3, limit_ppl=1e9)["sparsity"] == 0.99  # anything goes
    assert np.isnan(topk_tolerance(a, ids, context_length=64, limit_ppl=own["unmasked_ppl"] * 0.5)["sparsity"])
    t, _ = sparsity_table({"a": a, "b": b}, "a", ids, 64, ids, samples=50, matched_to="a")
    limit = 1.01 * t.loc["a", "tol_ppl"]
    assert np.allclose(t.matched_ppl, limit)  # the quality bar: a within 1%
    for m in ("a", "b"):  # NaN exactly when the model is worse than a's quality even unmasked
        assert np.isnan(t.loc[m, "topk_at_matched"]) == (t.loc[m, "tol_ppl"] > limit)
    assert t.loc["a", "topk_at_matched"] == t.loc["a", "topk_within_1%"]  # a at its own quality: the same search
    with pytest.raises(ValueError, match="not one of the models"):
        sparsity_table({"a": a}, "a", ids, 64, ids, samples=50, matched_to="c")
