"""Sliding-window perplexity against hand-computed references on a tiny random Llama."""

import math

import pytest
import tiny_models
import torch
import torch.nn.functional as F

from turbosparse_lib.eval.perplexity import perplexity, progress_enabled, windows
from turbosparse_lib.models.build import build_model

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    return tiny_models.ours("drelu", seed=0, vocab_size=VOCAB, context_length=64)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(0)
    return torch.randint(0, VOCAB, (23,))


def nll_sum(model, x, y):
    """Summed cross entropy of predicting ``y`` from ``x`` (1-D, same length), one forward pass."""
    with torch.no_grad():
        return F.cross_entropy(model(x[None]).logits[0], y, reduction="sum").item()


def test_one_window_equals_full_sequence_cross_entropy(model, ids):
    res = perplexity(model, ids, context_length=32, progress=False)
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()  # transformers' own shifted loss
    assert res.n_tokens == len(ids) - 1 and res.n_windows == 1
    assert res.nll == pytest.approx(loss, rel=1e-5) and res.ppl == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("n, context, stride", [(23, 8, 8), (23, 8, 3), (9, 8, 8), (10, 8, 1), (2, 4, 4), (50, 7, 5)])
def test_windows_score_every_prediction_once(n, context, stride):
    wins = windows(n, context, stride)
    scored = []
    for i, (b, e, k) in enumerate(wins):
        assert 0 < e - b <= context and 0 < k <= e - b
        if 0 < i < len(wins) - 1:
            assert k == stride  # middle windows score their last `stride` predictions
        scored += range(e - k + 1, e + 1)  # absolute positions of the scored target tokens
    assert scored == list(range(1, n))  # every token but the first, once, in order


def test_disjoint_windows_match_hand_computed_chunks(model, ids):
    context = 8
    res = perplexity(model, ids, context_length=context, batch_size=2, progress=False)
    # predictions 0..21 in chunks of 8: inputs ids[0:8] -> targets ids[1:9], ..., ids[16:22] -> ids[17:23]
    total = sum(nll_sum(model, ids[b : b + context][: 22 - b], ids[b + 1 : b + 1 + context]) for b in (0, 8, 16))
    assert (res.n_windows, res.n_tokens) == (3, 22)
    assert res.nll == pytest.approx(total / 22, rel=1e-5)


def test_strided_windows_match_hand_computed_reference(model, ids):
    context, stride = 8, 3
    total = 0.0
    for b, e, k in windows(len(ids), context, stride):
        with torch.no_grad():
            logits = model(ids[b:e][None]).logits[0]  # (T, V), all positions
        total += F.cross_entropy(logits[-k:], ids[b + 1 : e + 1][-k:], reduction="sum").item()
    for batch_size in (1, 4):
        res = perplexity(model, ids, context_length=context, stride=stride, batch_size=batch_size, progress=False)
        assert res.nll == pytest.approx(total / 22, rel=1e-5)


def test_accepts_list_numpy_and_tensor(model, ids):
    results = {perplexity(model, x, context_length=8, progress=False).nll for x in (ids, ids.tolist(), ids.numpy())}
    assert len(results) == 1


def test_restores_training_mode_and_validates(model, ids):
    model.train()
    perplexity(model, ids, context_length=8, progress=False)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, ids[None], context_length=8)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, context_length=8, stride=9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, ids[:1], context_length=8)


def test_progress_auto_is_off_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert progress_enabled(None) is False
    assert progress_enabled(True) is True
    monkeypatch.delenv("CI")
    monkeypatch.setenv("PAPERMILL", "1")
    assert progress_enabled(None) is False
    assert progress_enabled(False) is False


def test_perplexity_refuses_ids_the_model_cannot_read():
    from turbosparse_lib.eval.perplexity import perplexity

    m = build_model("drelu", preset="smoke", seed=0)
    V, P = m.config.vocab_size, m.config.max_position_embeddings
    with pytest.raises(ValueError, match="the model's vocabulary"):
        perplexity(m, [1, 2, V], context_length=2)
    with pytest.raises(ValueError, match="integer token ids"):
        perplexity(m, [1.0, 2.0, 3.0], context_length=2)
    with pytest.raises(ValueError, match="positions"):
        perplexity(m, list(range(10)), context_length=P + 1)
