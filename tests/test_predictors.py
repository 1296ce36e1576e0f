"""Activation predictors on a tiny dReLU model: capture, shapes, save/load, masks, and the engine provider."""

import numpy as np
import pytest
import tiny_models
import torch

from turbosparse_lib.models.build import build_model
from turbosparse_lib.predictors import data as D
from turbosparse_lib.predictors.metrics import PredictedMask, cost_per_token, layer_metrics
from turbosparse_lib.predictors.model import PredictorSet
from turbosparse_lib.predictors.train import PredictorTraining, train_predictors


@pytest.fixture(scope="module")
def tiny():
    return tiny_models.ours("drelu", seed=0, context_length=64)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2048,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("source", ["residual", "normed"])
def test_capture_is_resumable_and_labels_are_the_exact_zeros(tiny, ids, tmp_path, source):
    cfg = D.CaptureConfig(source=source, tokens_per_shard=512, context_length=64)
    info = D.capture(tiny, ids, tmp_path, cfg)
    assert info["shards"] == 4 and info["layers"] == 2 and info["intermediate"] == 64
    x, y = D.load_layer(tmp_path, 1)
    assert x.shape == (2048, 32) and y.shape == (2048, 64) and y.dtype == torch.bool
    assert 0.5 < 1 - y.float().mean() < 0.95  # a dReLU model: most neurons are exactly zero
    (tmp_path / "shard-00002.safetensors").unlink()  # a run killed mid-way: only the missing shard is made again
    D.capture(tiny, ids, tmp_path, cfg)
    x2, y2 = D.load_layer(tmp_path, 1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="another configuration"):
        D.capture(
            tiny, ids, tmp_path, D.CaptureConfig(source=source, label="topk", tokens_per_shard=512, context_length=64)
        )


def test_topk_labels_keep_exactly_k():
    c = torch.randn(5, 100)
    y = D.labels_of(c, D.CaptureConfig(label="topk", topk_sparsity=0.9, context_length=1, tokens_per_shard=1))
    assert (y.sum(1) == 10).all()


def test_predictors_train_save_load_and_mask(tiny, ids, tmp_path):
    D.capture(tiny, ids, tmp_path / "cap", D.CaptureConfig(source="normed", tokens_per_shard=512, context_length=64))
    ps = train_predictors(tmp_path / "cap", tmp_path / "work", PredictorTraining(rank=8, epochs=3, batch_size=256))
    x = torch.randn(3, 7, 32)
    assert ps.layers[0](x).shape == (3, 7, 64) and ps.predict(0, x).dtype == torch.bool
    m = layer_metrics(ps, tmp_path / "cap", thresholds=(0.1, 0.5, 0.9))
    assert set(m.columns) >= {"recall", "precision", "predicted_sparsity"} and m.recall.between(0, 1).all()
    low, high = m[m.threshold == 0.1].recall.mean(), m[m.threshold == 0.9].recall.mean()
    assert low >= high  # a lower threshold admits more neurons
    ps.save(tmp_path / "model")
    again = PredictorSet.load(tmp_path / "model", tiny)
    assert all(torch.equal(ps.predict(i, x), again.predict(i, x)) for i in range(2))
    other = build_model("drelu", hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, vocab_size=64)
    with pytest.raises(ValueError, match="are for"):
        PredictorSet.load(tmp_path / "model", other)
    # a threshold that admits every neuron leaves the model's outputs unchanged
    batch = ids[:128].view(2, 64)
    with torch.no_grad():
        want = tiny(input_ids=batch).logits
        with PredictedMask(tiny, ps, threshold=1e-9) as pm:
            got = tiny(input_ids=batch).logits
    assert torch.equal(want, got) and pm.summary()["recall"] == 1.0
    assert cost_per_token(ps, ffn_active=0.2)["predictor_params"] == ps.n_params()
    # and so does the engine provider: admitting every neuron, sparse decoding equals dense decoding
    from turbosparse_lib.inference.engine import Engine
    from turbosparse_lib.predictors.provider import PredictorMaskProvider

    engine = Engine.from_transformers(tiny)
    prov = PredictorMaskProvider(ps, threshold=1e-9)
    assert len(prov(0, np.random.default_rng(0).standard_normal(32).astype(np.float32))) == 64
    prompt = ids[:8].numpy()
    np.testing.assert_array_equal(
        engine.generate(prompt, 6, sparse=True, mask_provider=prov), engine.generate(prompt, 6)
    )
    # the benchmark runs: predictors in the engine's format, their bytes counted in bytes per token
    from turbosparse_lib.bench import decoding
    from turbosparse_lib.bench.bytes_model import ModelShape

    every = PredictorSet.load(tmp_path / "model").set_layer_thresholds([1e-9, 1e-9])  # an operating point
    runs, keys, legend = decoding.predicted_decoding_runs(
        engine, ps, (1e-9, 0.5), "tiny", precisions=("f32", "q8_0"), points={"all kept": every}
    )
    assert len(runs) == len(legend) == 2 * 6 and runs[keys[("q8_0", "predicted", 0.5)]].provider.fmt == "q8_0"
    assert legend.loc[keys[("f32", "point", "all kept")], "point"] == "all kept"
    speed, tokens = decoding.bench_decoding(runs, prompt, 4, 1)
    assert np.array_equal(tokens[keys[("q8_0", "predicted", 1e-9)]], tokens[keys[("q8_0", "dense", None)]])
    assert np.array_equal(tokens[keys[("q8_0", "point", "all kept")]], tokens[keys[("q8_0", "dense", None)]])
    assert np.array_equal(tokens[keys[("q8_0", "gatefirst", None)]], tokens[keys[("q8_0", "dense", None)]])
    limits = decoding.decoding_limits(
        ModelShape.of_engine(engine, "tiny"),
        runs,
        speed,
        len(prompt),
        4,
        10.0,
        {p: keys[(p, "dense", None)] for p in ("f32", "q8_0")},
    )
    pred, exact = limits.loc[keys[("q8_0", "predicted", 1e-9)]], limits.loc[keys[("q8_0", "exact", None)]]
    prov_mb = runs[keys[("q8_0", "predicted", 1e-9)]].provider.nbytes / 1e6
    assert prov_mb > 0 and pred.MB_per_token > exact.MB_per_token + prov_mb * 0.99
    with pytest.raises(ValueError, match="provider"):
        decoding.EngineRun(engine, "f32", "provider")


def test_training_lowers_the_held_out_loss_and_beats_an_untrained_predictor_at_equal_sparsity():
    """On labels a low-rank predictor can learn (``x W > t``, ``W`` of rank 8, about 30% of neurons firing): after
    training, the held-out loss is well below the untrained predictor's, and at the same predicted sparsity (each
    token keeps as many neurons as truly fire) its recall is far above the untrained one's, which is chance."""
    from turbosparse_lib.predictors.model import LowRankPredictor
    from turbosparse_lib.predictors.train import PredictorTraining, split, train_layer

    g = torch.Generator().manual_seed(0)
    T, H, N, rank = 4096, 32, 96, 16
    x = torch.randn(T, H, generator=g)
    w = torch.randn(H, 8, generator=g) @ torch.randn(8, N, generator=g)  # of rank 8: learnable at rank 16
    y = (x @ w > 0.5 * w.norm(dim=0)).float()  # a threshold per neuron: about 30% fire
    cfg = PredictorTraining(rank=rank, epochs=6, batch_size=256, lr=1e-2, val_fraction=0.25)
    net, info = train_layer(x, y, rank, cfg)
    torch.manual_seed(cfg.seed)
    untrained = LowRankPredictor(H, N, rank).eval()
    lo = split(T, cfg.val_fraction)
    xv, yv = x[lo:], y[lo:]
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def recall_at_true_sparsity(model):
        with torch.no_grad():
            logits = model(xv)
        k = int(yv.sum(1).mean().round())
        kept = torch.zeros_like(yv).scatter_(1, logits.topk(k, dim=1).indices, 1.0)
        return float((kept * yv).sum() / yv.sum())

    with torch.no_grad():
        assert bce(net(xv), yv) < 0.7 * bce(untrained(xv), yv), (bce(net(xv), yv), bce(untrained(xv), yv))
    assert 0.2 < float(yv.mean()) < 0.4
    r_trained, r_untrained = recall_at_true_sparsity(net), recall_at_true_sparsity(untrained)
    assert r_untrained < float(yv.mean()) + 0.1  # chance: the fraction that fires
    assert r_trained > r_untrained + 0.3, (r_trained, r_untrained)
    assert info["train_tokens"] == lo and info["final_loss"] == info["final_loss"]


def test_contribution_codes_round_trip_within_a_32nd_of_an_octave():
    """One byte per neuron: 0 is an exact zero, 255 the token's largest, a live neuron far below still reads live."""
    g = torch.Generator().manual_seed(0)
    c = torch.rand(50, 200, generator=g) ** 4 * (torch.rand(50, 200, generator=g) > 0.5)
    c[:, 0], c[:, 1] = 1e-30, 0.0  # 100 octaves below the largest; a zero
    codes = D.contribution_codes(c)
    rel = D.relative_contributions(codes)
    want = c / c.amax(1, keepdim=True)
    assert codes.dtype == torch.uint8 and (codes.amax(1) == 255).all()
    assert torch.equal(codes == 0, c == 0) and (codes[:, 0] == 1).all()
    fine = want > 2.0**-15
    assert torch.allclose(rel[fine], want[fine], rtol=2 ** (1 / 32) - 1 + 1e-6, atol=0)


def test_capture_records_each_neurons_contribution_to_the_residual_stream(tiny, ids, tmp_path):
    """``|combined_i| * ||W_down[:, i]||`` relative to the token's largest, as the model computes it; a capture
    from before contributions is refused where they are needed."""
    from turbosparse_lib.models.swap import mlp_modules

    D.capture(tiny, ids[:512], tmp_path / "cap", D.CaptureConfig(tokens_per_shard=512, context_length=64))
    x, y, rel = D.load_layer(tmp_path / "cap", 1, contributions=True)
    mlp = mlp_modules(tiny)[1]
    seen = {}
    h = mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.update(c=args[0].detach()))
    with torch.no_grad():
        tiny(input_ids=ids[:512].view(-1, 64))
    h.remove()
    contrib = (seen["c"].abs() * mlp.down_proj.weight.norm(dim=0)).reshape(-1, 64)
    want = contrib / contrib.amax(1, keepdim=True)
    assert torch.equal(rel > 0, y) and torch.allclose(rel, want, rtol=0.025, atol=2.0**-15)
    info = (tmp_path / "cap" / D.CAPTURE_FILE).read_text().replace('"contributions": true', '"contributions": false')
    (tmp_path / "cap" / D.CAPTURE_FILE).write_text(info)
    with pytest.raises(ValueError, match="without contributions"):
        D.load_layer(tmp_path / "cap", 1, contributions=True)
    from safetensors.torch import load_file, save_file  # a shard as an older version wrote it: capture redoes it

    shard = tmp_path / "cap" / "shard-00000.safetensors"
    save_file({k: v for k, v in load_file(str(shard)).items() if not k.startswith("m.")}, str(shard))
    D.capture(tiny, ids[:512], tmp_path / "cap", D.CaptureConfig(tokens_per_shard=512, context_length=64))
    assert torch.equal(D.load_layer(tmp_path / "cap", 1, contributions=True)[2], rel)


def test_contribution_weights_keep_the_positives_total_and_favour_the_large_ones():
    from turbosparse_lib.predictors.train import contribution_weights

    y = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.float32)
    rel = torch.tensor([[1.0, 0.25, 0.0, 0.0], [0.5, 0.0, 0.0, 1.0]])
    w = contribution_weights(y, rel, pos_weight=3.0, cap=50.0)
    assert torch.equal(w[y == 0], torch.ones(4))
    assert torch.allclose((w * y).sum(1), 3.0 * y.sum(1))  # positives weigh pos_weight on average
    assert w[0, 0] == 4 * w[0, 1] and w[1, 3] == 2 * w[1, 0]
    assert contribution_weights(y, rel, 3.0, cap=1.2).max() == pytest.approx(3.6)
    with pytest.raises(ValueError, match="unknown predictor loss"):
        PredictorTraining(loss="focal")


def test_contribution_loss_misses_less_mass_than_the_binary_loss_at_equal_sparsity():
    """Half the neurons carry 100x the others' contributions when they fire; a predictor too small to learn every
    neuron spends its capacity on the large ones under the contribution loss, and misses less of the mass."""
    from turbosparse_lib.predictors.train import split, train_layer

    g = torch.Generator().manual_seed(0)
    T, H, N = 6144, 32, 128
    x = torch.randn(T, H, generator=g)
    w = torch.randn(H, N, generator=g)
    y = x @ w > 0.8 * w.norm(dim=0)
    scale = torch.where(torch.arange(N) % 2 == 0, 100.0, 1.0)
    c = y * scale * (1 + torch.rand(T, N, generator=g))
    rel = c / c.amax(1, keepdim=True).clamp_min(1e-30)
    lo = split(T, 0.25)
    missed = {}
    for loss in ("bce", "contribution"):
        cfg = PredictorTraining(rank=4, epochs=4, batch_size=256, lr=1e-2, val_fraction=0.25, loss=loss)
        net, _ = train_layer(x, y, 4, cfg, rel)
        with torch.no_grad():
            logits = net(x[lo:])
        k = int(y[lo:].sum(1).float().mean().round())  # keep as many as fire: equal sparsity
        kept = torch.zeros_like(rel[lo:]).scatter_(1, logits.topk(k, dim=1).indices, 1.0)
        live = rel[lo:] * y[lo:]
        missed[loss] = float(((live * (1 - kept)).sum(1) / live.sum(1).clamp_min(1e-30)).mean())
    assert missed["contribution"] < 0.8 * missed["bce"], missed  # about 0.68 over seeds 0-2 and ranks 2, 4
    with pytest.raises(ValueError, match="needs the captured contributions"):
        train_layer(x, y, 4, PredictorTraining(loss="contribution"))


def test_per_layer_thresholds_are_saved_used_by_masks_and_by_the_engine_provider(tiny, tmp_path):
    from turbosparse_lib.predictors.provider import PredictorMaskProvider

    torch.manual_seed(0)
    ps = PredictorSet(32, 64, [8, 8])
    x = torch.randn(5, 32)
    ps.set_layer_thresholds([0.3, 0.7])
    assert torch.equal(ps.predict(0, x), ps.predict(0, x, 0.3)) and torch.equal(ps.predict(1, x), ps.predict(1, x, 0.7))
    ps.save(tmp_path)
    again = PredictorSet.load(tmp_path, tiny)
    assert again.layer_thresholds == [0.3, 0.7]
    prov = PredictorMaskProvider(again, fmt="f32")
    for i in range(2):
        want = np.flatnonzero(again.predict(i, x[0]).numpy())
        np.testing.assert_array_equal(prov(i, x[0].numpy()), want)
    with pytest.raises(ValueError, match="2 layers"):
        ps.set_layer_thresholds([0.5])
    with pytest.raises(ValueError, match="probability"):
        ps.set_layer_thresholds([0.5, 1.0])


def test_operating_point_is_the_sparsest_within_the_perplexity_budget(tiny, ids, tmp_path):
    """Per layer the highest threshold under a missed-mass bound; the bound rises while calibration perplexity
    stays within the budget; the set keeps its thresholds; a table without missed mass is refused."""
    import pandas as pd

    from turbosparse_lib.predictors.metrics import layer_thresholds_for, operating_point

    table = pd.DataFrame(
        {"layer": [0, 0, 0, 1, 1, 1], "threshold": [0.1, 0.5, 0.9] * 2, "missed_mass": [0, 0.01, 0.2, 0.02, 0.03, 0.5]}
    )
    assert layer_thresholds_for(table, 0.01) == [0.5, 0.1] and layer_thresholds_for(table, 0.05) == [0.5, 0.5]
    D.capture(tiny, ids, tmp_path / "cap", D.CaptureConfig(tokens_per_shard=512, context_length=64))
    ps = train_predictors(tmp_path / "cap", tmp_path / "work", PredictorTraining(rank=8, epochs=2, batch_size=256))
    acc = layer_metrics(ps, tmp_path / "cap", thresholds=(0.05, 0.2, 0.5, 0.8, 0.95))
    assert acc.missed_mass.between(0, 1).all()
    calib = ids[:512]
    point, sweep = operating_point(tiny, ps, acc, calib, 64, budget=0.02, bounds=(0.001, 0.05, 0.5), uniform=())
    assert 2 <= len(sweep) <= 3 and ps.layer_thresholds is None  # stops after two bounds over the budget
    ok = sweep[sweep.calibration_ratio <= 1.02]
    if point is None:
        assert ok.empty
    else:
        assert point["calibration_ratio"] <= 1.02 and point["predicted_sparsity"] == ok.predicted_sparsity.max()
    loose, every = operating_point(tiny, ps, acc, calib, 64, budget=1e9, bounds=(0.001, 0.05, 0.5), uniform=(0.1, 0.9))
    assert len(every) == 5 and loose["predicted_sparsity"] == every.predicted_sparsity.max()
    one = every[every.rule.str.startswith("threshold")]  # the second family: one threshold in every layer
    assert list(one.threshold) == [0.1, 0.9] and all(ts == [0.9, 0.9] for ts in one.thresholds[one.threshold == 0.9])
    assert one.max_missed_mass.isna().all() and every.rule.str.startswith("per layer").sum() == 3
    with pytest.raises(ValueError, match="no missed mass"):
        operating_point(tiny, ps, acc.drop(columns="missed_mass"), calib, 64, budget=0.02)


class _PerLayer:
    """A provider the fused step does not know: the engine calls it per layer from Python."""

    def __init__(self, provider):
        self.provider, self.input = provider, provider.input

    def __call__(self, layer_idx, x_H):
        return self.provider(layer_idx, x_H)


@pytest.mark.parametrize(
    ("kind", "source", "fmt"), [("mlp", "residual", "f32"), ("mlp", "normed", "q8_0"), ("preview", "normed", "q4_0")]
)
def test_the_fused_step_runs_the_predictors_as_the_per_layer_provider_does(tiny, kind, source, fmt):
    """Predictors run inside the one compiled call per token give the per-layer Python path's masks, so its logits
    bit for bit and the same rows read; a provider in another format than the engine's falls back to that path."""
    from turbosparse_lib.inference.engine import Engine
    from turbosparse_lib.predictors.provider import PredictorMaskProvider

    torch.manual_seed(1)
    ps = PredictorSet(32, 64, [8, 8], source=source, kind=kind)
    engine = Engine.from_transformers(tiny).quantized(fmt)
    prov = PredictorMaskProvider(ps, threshold=0.5, fmt=fmt)
    other = "f32" if fmt != "f32" else "q8_0"
    assert prov.fused_predictor(fmt, 2) is not None and prov.fused_predictor(other, 2) is None
    uneven = PredictorMaskProvider(PredictorSet(32, 64, [8, 6], source=source, kind=kind), threshold=0.5, fmt=fmt)
    assert uneven.fused_predictor(fmt, 2) is None  # ranks that differ per layer: the per-layer path
    runs = {}
    for name, provider in (("fused", prov), ("per layer", _PerLayer(prov))):
        engine.reset(16)
        engine.prefill(np.arange(1, 6))
        profile, logits = {}, []
        for t in (7, 3, 11, 2):
            logits.append(engine.step(t, sparse=True, mask_provider=provider, profile=profile))
        runs[name] = (np.stack(logits), profile)
    (fused, p_fused), (per_layer, p_layer) = runs["fused"], runs["per layer"]
    np.testing.assert_array_equal(fused.view(np.uint32), per_layer.view(np.uint32))
    for key in ("active_neurons", "rows_gate", "rows_up", "rows_down"):
        assert p_fused[key] == p_layer[key], key
    assert 0 < p_fused["active_neurons"] < 4 * 2 * 64  # the masks keep some neurons, not all
