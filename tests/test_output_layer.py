"""The sparse output layer (``predictors.output_layer``) against plain per-token references, on tiny shapes."""

import math

import pandas as pd
import pytest
import torch
from tiny_models import hf_llama

from turbosparse_lib.predictors import output_layer, svd_preview
from turbosparse_lib.predictors.output_layer import (
    CONFIG_FILE,
    TENSORS_FILE,
    OutputCandidates,
    evaluate,
    final_hidden_states,
    lm_head_weight,
    sparse_logits,
    spherical_kmeans,
)

T, H, V = 300, 16, 120


@pytest.fixture(scope="module")
def data():
    """Contexts in a few blobs (so clusters mean something) and an lm_head peaky enough that the candidate
    confidence spans (0, 1); targets drawn from the full distribution."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, H, generator=g) * 3
    hidden_TH = centers[torch.randint(0, 6, (T,), generator=g)] + torch.randn(T, H, generator=g)
    lm_head_VH = torch.randn(V, H, generator=g) * 0.5
    targets_T = torch.multinomial(torch.softmax(hidden_TH @ lm_head_VH.T, 1), 1, generator=g)[:, 0]
    valid_T = torch.arange(T) % 50 != 49
    return hidden_TH, lm_head_VH, targets_T, valid_T


def _fit(data, clusters=8, rows=12, **kw):
    return OutputCandidates.fit(data[0], data[1], clusters, rows, **{"top_k": 6, **kw})


def _reference_logits(cands, h_TH, w_VH, confidence):
    """The sparse logits one token at a time, straight from the definition."""
    out, rows_read = [], []
    for h in h_TH:
        cos = torch.stack([h @ c / h.norm() for c in cands.centroids_CH])
        rows = cands.cluster_rows(int(cos.argmax()))
        exact = torch.stack([h @ w_VH[r] for r in rows])
        row = exact.min().repeat(len(w_VH))
        row[rows] = exact
        if torch.softmax(exact, 0).max() < confidence:
            row, n = h @ w_VH.T, len(w_VH)
        else:
            n = len(rows)
        out.append(row)
        rows_read.append(n)
    return torch.stack(out), torch.tensor(rows_read)


def test_the_hidden_states_reproduce_the_models_logits():
    model = hf_llama(vocab_size=300, tie_word_embeddings=True).train()
    ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(1))
    hidden_TH, targets_T, valid_T = final_hidden_states(model, ids, context_length=32, batch_size=1)
    assert model.training, "the model's mode is restored"
    with torch.no_grad():
        model.eval()
        ref = torch.cat([model(ids[s : s + 32][None]).logits[0] for s in range(0, 70, 32)])  # windows 32, 32, 6
    assert hidden_TH.dtype == torch.float32 and hidden_TH.shape == (70, 32)
    torch.testing.assert_close(hidden_TH @ lm_head_weight(model).T, ref, atol=1e-4, rtol=1e-4)
    last = torch.tensor([31, 63, 69])
    assert valid_T.sum() == 67 and not valid_T[last].any()
    assert (targets_T[last] == -100).all()
    assert torch.equal(targets_T[valid_T], ids[1:][valid_T[:-1]])
    short_TH, _, short_valid_T = final_hidden_states(model, ids[:10], context_length=32)  # less than one window
    torch.testing.assert_close(short_TH, hidden_TH[:10], atol=1e-5, rtol=1e-5)
    assert short_valid_T.sum() == 9
    with pytest.raises(ValueError, match="1-D"):
        final_hidden_states(model, ids[None], 32)


def test_every_row_a_candidate_gives_the_full_logits(data):
    hidden_TH, lm_head_VH, targets_T, valid_T = data
    cands = _fit(data, rows=V, top_k=V)
    assert (cands.cluster_sizes_C == V).all()
    logits_TV, info = sparse_logits(cands, hidden_TH, lm_head_VH)
    torch.testing.assert_close(logits_TV, hidden_TH @ lm_head_VH.T)
    assert not info["fallback_T"].any() and (info["rows_read_T"] == V).all()
    row = evaluate(cands, hidden_TH, lm_head_VH, targets_T, valid_T, confidences=(0.0,)).iloc[0]
    assert row.top1_agreement == 1.0 and row.target_in_candidates == 1.0 and row.rows_read_fraction == 1.0
    assert row.ppl_ratio == pytest.approx(1.0, abs=1e-6)


def test_a_confidence_above_one_falls_back_on_every_token(data):
    hidden_TH, lm_head_VH = data[:2]
    logits_TV, info = sparse_logits(_fit(data, rows=3), hidden_TH, lm_head_VH, confidence=1.01)
    assert info["fallback_T"].all() and (info["rows_read_T"] == V).all()
    torch.testing.assert_close(logits_TV, hidden_TH @ lm_head_VH.T)


@pytest.mark.parametrize("confidence", [0.0, 0.5])
def test_candidates_are_exact_and_the_rest_get_the_floor(data, confidence):
    hidden_TH, lm_head_VH = data[:2]
    cands = _fit(data, rows=12)
    assert (cands.cluster_sizes_C <= 12).all() and len(cands.rows) > 0
    logits_TV, info = sparse_logits(cands, hidden_TH, lm_head_VH, confidence=confidence, chunk=7)
    ref_TV, rows_read_T = _reference_logits(cands, hidden_TH, lm_head_VH, confidence)
    torch.testing.assert_close(logits_TV, ref_TV)
    assert torch.equal(info["rows_read_T"], rows_read_T)
    if confidence:  # the threshold splits the tokens, so both branches are exercised
        assert 0 < info["fallback_T"].sum() < T


def test_a_cluster_without_candidates_always_falls_back(data):
    hidden_TH, lm_head_VH = data[:2]
    fitted = _fit(data, clusters=2, rows=5)
    empty = OutputCandidates(fitted.centroids_CH, torch.tensor([0, 0, 3]), torch.tensor([1, 4, 9]), V, H).validate()
    logits_TV, info = sparse_logits(empty, hidden_TH, lm_head_VH)
    assert torch.equal(info["fallback_T"], empty.assign(hidden_TH) == 0) and 0 < info["fallback_T"].sum() < T
    torch.testing.assert_close(logits_TV[info["fallback_T"]], (hidden_TH @ lm_head_VH.T)[info["fallback_T"]])


def test_the_fit_is_deterministic_and_matches_brute_force(data):
    hidden_TH, lm_head_VH = data[:2]
    a, b = _fit(data, seed=3), _fit(data, seed=3)
    for name in ("centroids_CH", "offsets_C1", "rows"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.meta == b.meta and a.meta["converged"] and a.meta["tokens"] == T
    torch.testing.assert_close(a.centroids_CH.norm(dim=1), torch.ones(8))
    clusters_T = a.assign(hidden_TH)
    brute_T = torch.tensor([max(range(8), key=lambda c: float(h @ a.centroids_CH[c] / h.norm())) for h in hidden_TH])
    assert torch.equal(clusters_T, brute_T)
    mass = [dict() for _ in range(8)]
    for h, c in zip(hidden_TH, clusters_T.tolist()):
        p = torch.softmax(h @ lm_head_VH.T, 0)
        for tok in p.topk(6).indices.tolist():
            mass[c][tok] = mass[c].get(tok, 0.0) + float(p[tok])
    for c in range(8):
        expected = sorted(sorted(mass[c], key=mass[c].get, reverse=True)[:12])
        assert a.cluster_rows(c).tolist() == expected, c


def test_converged_centroids_are_the_normalised_means_of_their_clusters(data):
    centroids_CH, clusters_T, info = spherical_kmeans(data[0], 5, iterations=100, seed=1)
    assert info["converged"]
    x_TH = data[0] / data[0].norm(dim=1, keepdim=True)
    for c in range(5):
        mean = x_TH[clusters_T == c].sum(0)
        torch.testing.assert_close(centroids_CH[c], mean / mean.norm())


def test_save_and_load_round_trip_and_refuse_what_does_not_fit(data, tmp_path):
    cands = _fit(data)
    cands.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TENSORS_FILE, CONFIG_FILE])  # no temporaries left
    back = OutputCandidates.load(tmp_path, expected=data[1])
    for name in ("centroids_CH", "offsets_C1", "rows"):
        assert torch.equal(getattr(back, name), getattr(cands, name)), name
    assert (back.vocab_size, back.hidden_size, back.meta) == (V, H, cands.meta)
    with pytest.raises(ValueError, match=r"fitted for an lm_head of \(V, H\) = \(120, 16\), not \(121, 16\)"):
        OutputCandidates.load(tmp_path, expected=(V + 1, H))
    tensors = tmp_path / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        OutputCandidates.load(tmp_path)
    tensors.unlink()
    with pytest.raises(FileNotFoundError, match=f"{TENSORS_FILE} missing"):
        OutputCandidates.load(tmp_path)
    cands.save(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"format": 1, "vocab')
    with pytest.raises(ValueError, match="not valid JSON"):
        OutputCandidates.load(tmp_path)


def test_bad_arguments_are_refused_with_what_to_do(data):
    hidden_TH, lm_head_VH, targets_T, valid_T = data
    with pytest.raises(ValueError, match="n_clusters=301 must be in \\[1, 300\\].*fewer clusters"):
        OutputCandidates.fit(hidden_TH, lm_head_VH, T + 1, 10)
    for rows in (0, V + 1):
        with pytest.raises(ValueError, match=f"rows_per_cluster={rows} must be in \\[1, V=120\\]"):
            OutputCandidates.fit(hidden_TH, lm_head_VH, 4, rows)
    with pytest.raises(ValueError, match="top_k=0"):
        OutputCandidates.fit(hidden_TH, lm_head_VH, 4, 10, top_k=0)
    with pytest.raises(ValueError, match="shapes disagree"):
        OutputCandidates.fit(hidden_TH, lm_head_VH[:, :-1], 4, 10)
    cands = _fit(data)
    with pytest.raises(ValueError, match="fitted for V=120"):
        sparse_logits(cands, hidden_TH, lm_head_VH[:-1])
    with pytest.raises(ValueError, match="mark positions without a next token invalid"):
        evaluate(cands, hidden_TH, lm_head_VH, torch.full_like(targets_T, -100), valid_T)


def test_evaluate_matches_the_sparse_logits_and_bytes_fall_with_the_rows(data):
    hidden_TH, lm_head_VH, targets_T, valid_T = data
    cands = _fit(data, rows=12)
    table = evaluate(cands, hidden_TH, lm_head_VH, targets_T, valid_T, confidences=(0.0, 0.5, 1.01))
    for _, row in table.iterrows():
        assert output_layer.bytes_fraction_in_format(row, V, H, 4.0) == pytest.approx(row.bytes_fraction)
    assert list(table.columns) == [
        "method", "confidence", "tokens", "clusters", "rows_per_cluster", "mean_rows", "top1_agreement",
        "target_in_candidates", "ppl_full", "ppl_sparse", "ppl_ratio", "fallback_rate", "rows_read_fraction",
        "bytes_fraction",
    ]  # fmt: skip
    assert (table.tokens == int(valid_T.sum())).all() and table.fallback_rate.is_monotonic_increasing
    h_TH, t_T, full_TV = hidden_TH[valid_T], targets_T[valid_T], hidden_TH[valid_T] @ lm_head_VH.T
    nll_full = torch.nn.functional.cross_entropy(full_TV, t_T, reduction="none").double()
    for row in table.itertuples():
        logits_TV, info = sparse_logits(cands, h_TH, lm_head_VH, confidence=row.confidence)
        nll = torch.nn.functional.cross_entropy(logits_TV, t_T, reduction="none").double()
        assert row.ppl_sparse == pytest.approx(math.exp(nll.mean()), rel=1e-5)
        assert row.ppl_ratio == pytest.approx(math.exp((nll - nll_full).mean()), rel=1e-5)
        assert row.ppl_full == pytest.approx(math.exp(nll_full.mean()), rel=1e-5)
        assert row.fallback_rate == pytest.approx(info["fallback_T"].double().mean().item())
        assert row.top1_agreement == pytest.approx((logits_TV.argmax(1) == full_TV.argmax(1)).double().mean().item())
        bytes_T = (cands.n_params() * 4 + info["rows_read_T"] * H * 4.0) / (V * H * 4.0)
        assert row.bytes_fraction == pytest.approx(bytes_T.double().mean().item())
    assert table.ppl_ratio.iloc[-1] == pytest.approx(1.0) and table.target_in_candidates.iloc[-1] == 1.0
    fractions = [
        evaluate(_fit(data, rows=r, top_k=V), hidden_TH, lm_head_VH, targets_T, valid_T, (0.0,)).bytes_fraction[0]
        for r in (V, 60, 20, 5)
    ]
    assert fractions == sorted(fractions, reverse=True) and len(set(fractions)) == 4


def test_cheapest_within_picks_the_fewest_bytes_inside_the_budget():
    table = pd.DataFrame({"ppl_ratio": [1.0, 1.01, 1.03, 1.015], "bytes_fraction": [1.0, 0.4, 0.1, 0.3]})
    assert output_layer.cheapest_within(table, 0.02).bytes_fraction == 0.3
    assert output_layer.cheapest_within(table, 0.0).bytes_fraction == 1.0
    assert output_layer.cheapest_within(table[table.ppl_ratio > 1.02], 0.02) is None
    table["top1_agreement"] = [1.0, 0.995, 0.98, 0.999]
    assert output_layer.cheapest_within(table, min_top1=0.99).bytes_fraction == 0.3
    with pytest.raises(ValueError, match="budget"):
        output_layer.cheapest_within(table, -0.1)
    with pytest.raises(ValueError, match="exactly one"):
        output_layer.cheapest_within(table, 0.02, min_top1=0.99)


def test_svd_preview_is_exact_at_full_rank_or_full_refinement(data):
    hidden_TH, lm_head_VH, targets_T, valid_T = data
    preview = svd_preview.SVDPreview.fit(lm_head_VH)
    torch.testing.assert_close(preview.rotated_VH @ preview.basis_HH, lm_head_VH, atol=1e-5, rtol=1e-5)
    full_TV = hidden_TH @ lm_head_VH.T
    for rank, top_n in ((H, 1), (1, V)):
        logits_TV, _ = preview.logits(hidden_TH, rank, top_n)
        torch.testing.assert_close(logits_TV, full_TV, atol=1e-4, rtol=1e-4)
    table = svd_preview.evaluate_svd(preview, hidden_TH, lm_head_VH, targets_T, valid_T, ranks=(H,), top_ns=(4,))
    assert table.ppl_ratio.iloc[0] == pytest.approx(1.0, abs=1e-5) and table.top1_agreement.iloc[0] == 1.0
    assert table.tokens.iloc[0] == int(valid_T.sum())


def test_svd_preview_refines_its_top_rows_and_previews_the_rest(data):
    hidden_TH, lm_head_VH, targets_T, valid_T = data
    preview, rank, top_n = svd_preview.SVDPreview.fit(lm_head_VH), 3, 10
    logits_TV, refined_TN = preview.logits(hidden_TH, rank, top_n)
    z_TH = hidden_TH @ preview.basis_HH.T
    rough_TV = z_TH[:, :rank] @ preview.rotated_VH[:, :rank].T
    for t in range(0, T, 37):  # per token, from the definition
        top = rough_TV[t].topk(top_n).indices
        assert set(top.tolist()) == set(refined_TN[t].tolist())
        want = rough_TV[t].clone()
        want[top] = hidden_TH[t] @ lm_head_VH[top].T
        torch.testing.assert_close(logits_TV[t], want, atol=1e-4, rtol=1e-4)
    table = svd_preview.evaluate_svd(preview, hidden_TH, lm_head_VH, targets_T, valid_T, ranks=(2, 8), top_ns=(10,))
    assert table.bytes_fraction.is_monotonic_increasing and (table.method == "svd preview").all()
    for _, row in table.iterrows():  # the float32 count, recounted by the format-aware rule
        assert output_layer.bytes_fraction_in_format(row, V, H, 4.0) == pytest.approx(row.bytes_fraction)
    assert table.ppl_ratio.iloc[1] < table.ppl_ratio.iloc[0]  # more of the spectrum, a closer distribution
    with pytest.raises(ValueError, match="rank"):
        preview.logits(hidden_TH, H + 1, 4)
    with pytest.raises(ValueError, match="fitted on"):
        svd_preview.evaluate_svd(preview, hidden_TH, lm_head_VH[:-1], targets_T, valid_T)
