"""Every Numba kernel against its NumPy reference, on odd sizes and edge-case index sets."""

import numba
import numpy as np
import pytest

from turbosparse_lib.inference import attention as A
from turbosparse_lib.inference import kernels as K
from turbosparse_lib.inference import threads as T
from turbosparse_lib.models.variants import VARIANTS

# (N neurons / out rows, H hidden / in): sizes that are not multiples of 8 or 16, and 1
SHAPES = [(1, 1), (7, 33), (33, 7), (257, 16), (40, 257)]


def _close(got, want, rtol=2e-4):
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * (np.abs(want).max(initial=0) + 1e-6))


def _weights(rng, N, H):
    Wg, Wu = (rng.standard_normal((N, H), dtype=np.float32) / np.float32(np.sqrt(H)) for _ in range(2))
    WdT = rng.standard_normal((N, H), dtype=np.float32) / np.float32(np.sqrt(N))
    return Wg, Wu, WdT, rng.standard_normal(H, dtype=np.float32)


def _index_sets(rng, N):
    return {
        "none": np.empty(0, np.int64),
        "single": np.array([N // 2], np.int64),
        "all": np.arange(N, dtype=np.int64),
        "sorted": np.sort(rng.choice(N, size=max(1, N // 3), replace=False)).astype(np.int64),
        "unsorted": rng.permutation(N)[: max(1, (3 * N) // 4)].astype(np.int64),
    }


@pytest.mark.parametrize("N,H", SHAPES)
def test_dense_gemv_float_and_int8(N, H):
    rng = np.random.default_rng(N * 1000 + H)
    W, _, _, x = _weights(rng, N, H)
    _close(K.gemv(W, x), K.gemv_ref(W, x))
    q, s = K.quantize_int8_rows(W)
    _close(K.gemv_int8(q, s, x), K.gemv_int8_ref(q, s, x))


@pytest.mark.parametrize("N,H", SHAPES)
@pytest.mark.parametrize("kind", ["none", "single", "all", "sorted", "unsorted"])
def test_sparse_kernels_match_reference(N, H, kind):
    rng = np.random.default_rng(N * 1000 + H)
    Wg, Wu, WdT, x = _weights(rng, N, H)
    idx = _index_sets(rng, N)[kind]
    coef = rng.standard_normal(len(idx), dtype=np.float32)
    _close(K.gather_gemv(Wg, x, idx), K.gather_gemv_ref(Wg, x, idx))
    _close(K.axpy_rows(WdT, coef, idx), K.axpy_rows_ref(WdT, coef, idx))
    qg, qu, qd = (K.quantize_int8_rows(W) for W in (Wg, Wu, WdT))
    deq = [K.dequantize_int8_rows(*q) for q in (qg, qu, qd)]
    _close(K.gather_gemv_int8(*qg, x, idx), K.gather_gemv_ref(deq[0], x, idx))
    _close(K.axpy_rows_int8(*qd, coef, idx), K.axpy_rows_ref(deq[2], coef, idx))
    for variant in VARIANTS:
        _close(K.ffn_sparse(x, Wg, Wu, WdT, idx, variant), K.ffn_sparse_ref(x, Wg, Wu, WdT, idx, variant))
        _close(K.ffn_sparse_int8(x, qg, qu, qd, idx, variant), K.ffn_sparse_ref(x, *deq, idx, variant), rtol=1e-3)


@pytest.mark.parametrize("N,H", SHAPES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dense_ffn_matches_reference_and_full_sparse(N, H, variant):
    rng = np.random.default_rng(7)
    Wg, Wu, WdT, x = _weights(rng, N, H)
    Wd = np.ascontiguousarray(WdT.T)
    dense = K.ffn_dense(x, Wg, Wu, Wd, variant)
    _close(dense, K.ffn_dense_ref(x, Wg, Wu, Wd, variant))
    _close(K.ffn_sparse(x, Wg, Wu, WdT, np.arange(N, dtype=np.int64), variant), dense)
    qs = [K.quantize_int8_rows(W) for W in (Wg, Wu, Wd)]
    deq = [K.dequantize_int8_rows(*q) for q in qs]
    _close(K.ffn_dense_int8(x, *qs, variant), K.ffn_dense_ref(x, *deq, variant), rtol=1e-3)


@pytest.mark.parametrize(
    "n_heads,G,E,pos,lo",
    [(4, 2, 16, 0, 0), (9, 3, 64, 20, 0), (4, 4, 8, 12, 5), (6, 1, 6, 3, 3)],  # lo > 0: a sliding window
)
def test_decode_attention_matches_reference(n_heads, G, E, pos, lo):
    rng = np.random.default_rng(pos)
    qkv = rng.standard_normal((n_heads + 2 * G) * E, dtype=np.float32)
    angles = rng.uniform(0, 6, E // 2).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    k1, v1 = rng.standard_normal((2, G, pos + 2, E), dtype=np.float32)
    k2, v2 = k1.copy(), v1.copy()
    got = A.decode_attention(qkv, k1, v1, cos, sin, pos, n_heads, lo)
    _close(got, A.decode_attention_ref(qkv, k2, v2, cos, sin, pos, n_heads, lo))
    _close(k1, k2)
    np.testing.assert_array_equal(v1, v2)


def test_combine_is_equation_2_for_drelu():
    g = np.array([-1.0, -1.0, 2.0, 2.0, 0.0], np.float32)
    u = np.array([-3.0, 3.0, -3.0, 3.0, 5.0], np.float32)
    np.testing.assert_array_equal(K.combine_ref(g, u, "drelu"), [0, 0, 0, 6, 0])
    np.testing.assert_array_equal(K.combine_ref(g, u, "reglu"), [0, 0, -6, 6, 0])


def test_sparse_ffn_reads_only_active_rows_and_skips_exact_zeros():
    """Poison (NaN) every row the kernel must not read: inactive rows, and the W_down_T rows of
    active neurons whose dReLU output is exactly zero. A read would turn the output NaN."""
    rng = np.random.default_rng(3)
    N, H = 97, 33
    Wg, Wu, WdT, x = _weights(rng, N, H)
    idx = rng.permutation(N)[:50].astype(np.int64)
    want = K.ffn_sparse_ref(x, Wg, Wu, WdT, idx, "drelu")
    c_N = K.combine_ref(Wg @ x, Wu @ x, "drelu")
    active = np.zeros(N, bool)
    active[idx] = True
    live = active & (c_N != 0)
    assert 0 < live.sum() < active.sum()  # the skip is actually exercised
    Wg_p, Wu_p, WdT_p = Wg.copy(), Wu.copy(), WdT.copy()
    Wg_p[~active] = Wu_p[~active] = np.nan
    Wu_p[active & (Wg @ x <= 0)] = np.nan  # up rows are read only where the gate fired
    WdT_p[~live] = np.nan
    got = K.ffn_sparse(x, Wg_p, Wu_p, WdT_p, idx, "drelu")
    assert np.isfinite(got).all()
    _close(got, want)


def test_int32_indices_work():
    rng = np.random.default_rng(0)
    Wg, _, _, x = _weights(rng, 20, 9)
    idx = np.array([19, 0, 5], np.int32)
    _close(K.gather_gemv(Wg, x, idx), K.gather_gemv_ref(Wg, x, idx))


def test_int8_quantisation_error_bound():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((33, 257), dtype=np.float32) * rng.uniform(0.01, 10, (33, 1)).astype(np.float32)
    W[5] = 0.0  # an all-zero row must not divide by zero
    q, s = K.quantize_int8_rows(W)
    assert q.dtype == np.int8 and s.dtype == np.float32 and q.flags.c_contiguous
    assert np.abs(q.astype(np.int16)).max() <= 127
    err = np.abs(K.dequantize_int8_rows(q, s) - W)
    # rounding to the nearest step: at most half a step, step = max|row| / 127
    assert (err <= 0.5 * s[:, None] * (1 + 1e-5)).all()
    assert (K.dequantize_int8_rows(q, s)[5] == 0).all()
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[np.arange(33) != 5], 127)


def test_variant_registry_error_lists_names():
    with pytest.raises(ValueError, match="drelu"):
        K.variant_code("swish_glu")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_numpy_reference_combine_equals_the_torch_module(variant):
    import torch

    from turbosparse_lib.models.variants import combined_activation

    rng = np.random.default_rng(5)
    g, u = rng.standard_normal((2, 4, 300), dtype=np.float32) * 3
    want = combined_activation(variant, torch.from_numpy(g), torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(K.combine_ref(g, u, variant), want, rtol=1e-5, atol=1e-5)


def test_validate_kernels_and_threads():
    worst = K.validate_kernels(shapes=((7, 33), (33, 7)))
    assert worst and max(worst.values()) < 2e-4
    n_before = numba.get_num_threads()
    WdT = np.random.default_rng(0).standard_normal((5, 40), dtype=np.float32)
    coef, idx = np.ones(2, np.float32), np.array([1, 3])
    try:
        T.set_threads(1)  # one output chunk instead of one per thread: same answer
        info = T.thread_info()
        assert info["numba_threads"] == 1 and info["torch_threads"] == 1
        _close(K.axpy_rows(WdT, coef, idx), K.axpy_rows_ref(WdT, coef, idx))
    finally:
        T.set_threads(n_before)
    with pytest.raises(ValueError, match="threads"):
        T.set_threads(numba.config.NUMBA_NUM_THREADS + 1)
