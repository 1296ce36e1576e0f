"""The pre-activation preview (predictors.preview): its fit against the exact pre-activations, its probability,
training from the fit, the engine provider against the PyTorch module, and the inputs it refuses."""

import numpy as np
import pytest
import tiny_models
import torch

from turbosparse_lib.predictors import data as D
from turbosparse_lib.predictors.model import PredictorSet
from turbosparse_lib.predictors.preview import PreactivationPreview, equal_parameter_rank
from turbosparse_lib.predictors.train import PredictorTraining, train_predictors


def _correlated(T, H, seed=0):
    """Inputs with a decaying spectrum, as real hidden states have: a low rank captures most of them."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(H, H, generator=g))[0]
    return (torch.randn(T, H, generator=g) * torch.logspace(0, -2, H)) @ basis.T


def test_full_rank_preview_is_the_exact_mask():
    """At rank H the preview is the pre-activations themselves: every neuron with both branches > 0 is certain."""
    g = torch.Generator().manual_seed(1)
    x, wg, wu = torch.randn(2000, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    net = PreactivationPreview.fit(x[:1500], wg, wu, rank=16)
    exact = (x[1500:] @ wg.T > 1e-3) & (x[1500:] @ wu.T > 1e-3)  # away from the boundary, where rounding decides
    near = ((x[1500:] @ wg.T).abs() < 1e-3) | ((x[1500:] @ wu.T).abs() < 1e-3)
    with torch.no_grad():
        pred = net(x[1500:]) >= 0.0  # probability 0.5
    assert torch.equal(pred[~near], exact[~near])


def test_preview_is_the_best_rank_r_fit_in_the_inputs_metric_and_its_probability_is_calibrated():
    """The data-weighted fit beats the plain (unweighted) truncated SVD of the weights on the same inputs, and the
    predicted probability of firing matches the observed rate within a few points in each decile."""
    T, H, N, r = 8000, 48, 96, 8
    x = _correlated(T, H)
    g = torch.Generator().manual_seed(2)
    wg, wu = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    net = PreactivationPreview.fit(x[:6000], wg, wu, r)
    w = torch.cat([wg, wu])
    with torch.no_grad():
        ours = net.up(net.down(x[6000:])) - x[6000:] @ w.T
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        plain = x[6000:] @ (vh[:r].T @ (u[:, :r] * s[:r]).T) - x[6000:] @ w.T
        assert ours.pow(2).mean() < 0.5 * plain.pow(2).mean()
        p = torch.sigmoid(net(x[6000:])).flatten()
    fired = ((x[6000:] @ wg.T > 0) & (x[6000:] @ wu.T > 0)).flatten().float()
    edges = torch.quantile(p[::5], torch.linspace(0, 1, 11))
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (p >= lo) & (p <= hi)
        assert abs(fired[sel].mean() - p[sel].mean()) < 0.06


def test_equal_parameter_rank_matches_the_mlp_within_one_rank():
    from turbosparse_lib.predictors.model import LowRankPredictor

    def params(net):
        return sum(p.numel() for p in net.parameters())

    for mlp_rank, H, N in ((128, 576, 1536), (16, 32, 64), (256, 4096, 14336)):
        r = equal_parameter_rank(mlp_rank, H, N)
        mlp, preview = params(LowRankPredictor(H, N, mlp_rank)), params(PreactivationPreview(H, N, r))
        assert abs(preview - mlp) <= (H + 2 * N) / 2 + 1  # within half a rank step of the preview


@pytest.fixture(scope="module")
def tiny():
    return tiny_models.ours("drelu", seed=0, context_length=64)


@pytest.fixture(scope="module")
def normed_capture(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("cap")
    ids = torch.randint(0, 64, (2048,), generator=torch.Generator().manual_seed(0))
    D.capture(tiny, ids, d, D.CaptureConfig(source="normed", tokens_per_shard=512, context_length=64))
    return d


def test_training_from_the_fit_lowers_the_held_out_loss_and_the_set_round_trips(tiny, normed_capture, tmp_path):
    from turbosparse_lib.predictors.train import split, weighted_bce

    cfg = PredictorTraining(kind="preview", rank=4, epochs=6, batch_size=128, lr=3e-3)
    ps = train_predictors(normed_capture, tmp_path / "work", cfg, model=tiny)
    assert ps.kind == "preview" and isinstance(ps.layers[0], PreactivationPreview)
    x, y = D.load_layer(normed_capture, 1)
    start = split(len(x), cfg.val_fraction)
    fitted = PreactivationPreview.fit(
        x[:start],
        tiny.model.layers[1].mlp.gate_proj.weight.detach(),
        tiny.model.layers[1].mlp.up_proj.weight.detach(),
        4,
    )
    pos = y[:start].float().mean()
    w = torch.where(y[start:], (1 - pos) / pos, 1.0)  # the training loss's class weights
    with torch.no_grad():
        assert weighted_bce(ps.layers[1], x[start:], y[start:], w) < weighted_bce(fitted, x[start:], y[start:], w)
    ps.save(tmp_path / "model")
    again = PredictorSet.load(tmp_path / "model", tiny)
    assert again.kind == "preview"
    assert all(torch.equal(ps.predict(i, x[:50]), again.predict(i, x[:50])) for i in range(2))
    # resumed: every layer is on disk, nothing is trained again
    assert torch.equal(
        train_predictors(normed_capture, tmp_path / "work", cfg, model=tiny).predict(0, x[:50]), ps.predict(0, x[:50])
    )


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.7])
def test_engine_provider_gives_the_modules_mask(tiny, normed_capture, threshold):
    from turbosparse_lib.predictors.provider import PredictorMaskProvider

    x, _ = D.load_layer(normed_capture, 0)
    ps = PredictorSet(32, 64, [6, 6], source="normed", kind="preview")
    for i, layer in enumerate(tiny.model.layers):
        ps.layers[i].load_state_dict(
            PreactivationPreview.fit(
                x, layer.mlp.gate_proj.weight.detach(), layer.mlp.up_proj.weight.detach(), 6
            ).state_dict()
        )
    prov = PredictorMaskProvider(ps, threshold, fmt="f32")
    assert prov.input == "normed"
    for i in range(2):
        for t in range(0, 200, 7):
            want = np.flatnonzero(ps.predict(i, x[t], threshold).numpy())
            got = prov(i, x[t].numpy())
            assert len(np.setxor1d(got, want)) <= 1  # the folded sigma rounds differently; at most a borderline one


def test_the_preview_refuses_what_it_cannot_predict(tiny, normed_capture, tmp_path):
    cfg = PredictorTraining(kind="preview", rank=4, epochs=1)
    with pytest.raises(ValueError, match="pass the captured model"):
        train_predictors(normed_capture, tmp_path / "a", cfg)
    ids = torch.randint(0, 64, (512,), generator=torch.Generator().manual_seed(0))
    residual = tmp_path / "residual"
    D.capture(tiny, ids, residual, D.CaptureConfig(source="residual", tokens_per_shard=512, context_length=64))
    with pytest.raises(ValueError, match="source='normed'"):
        train_predictors(residual, tmp_path / "b", cfg, model=tiny)
    swiglu = tiny_models.ours("swiglu", seed=0, context_length=64)
    with pytest.raises(ValueError, match="use kind 'mlp'"):
        train_predictors(normed_capture, tmp_path / "c", cfg, model=swiglu)
    with pytest.raises(ValueError, match="unknown predictor kind"):
        PredictorTraining(kind="oracle")
    with pytest.raises(ValueError, match="rank must be"):
        PreactivationPreview(32, 64, 33)


def test_each_set_of_predictors_has_one_name():
    from turbosparse_lib.predictors.train import predictor_label

    assert predictor_label("preview", "contribution") == "pre-activation preview, contribution loss"
    assert predictor_label("mlp", "bce") == "low-rank MLP, bce loss"
    with pytest.raises(ValueError, match="unknown predictor kind"):
        predictor_label("dense", "bce")
