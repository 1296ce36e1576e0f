"""Every Numba kernel against its NumPy reference, in every weight format, on odd sizes and edge-case index sets."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from numba import njit

from turbosparse_lib.inference import attention as A
from turbosparse_lib.inference import bundles as B
from turbosparse_lib.inference import kernels as K
from turbosparse_lib.inference import quant as Q
from turbosparse_lib.inference import simd
from turbosparse_lib.inference import threads as T
from turbosparse_lib.inference.validate import validate_kernels
from turbosparse_lib.models.variants import VARIANTS

FORMATS = ["f32", "q8_0", "q4_0"]
# (N neurons / out rows, H hidden / in): 1, sizes that are not multiples of the 32-weight block or
# of the 8-float vector, and whole blocks
SHAPES = [(1, 1), (7, 33), (33, 7), (40, 257), (64, 96)]


def _close(got, want, rtol=2e-4):
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * (np.abs(want).max(initial=0) + 1e-6))


def _weights(rng, N, H):
    Wg, Wu = (rng.standard_normal((N, H), dtype=np.float32) / np.float32(np.sqrt(H)) for _ in range(2))
    Wd = rng.standard_normal((H, N), dtype=np.float32) / np.float32(np.sqrt(N))
    return Wg, Wu, Wd, rng.standard_normal(H, dtype=np.float32)


def _index_sets(rng, N):
    return {
        "none": np.empty(0, np.int64),
        "single": np.array([N // 2], np.int64),
        "all": np.arange(N, dtype=np.int64),
        "sorted": np.sort(rng.choice(N, size=max(1, N // 3), replace=False)).astype(np.int64),
        "unsorted": rng.permutation(N)[: max(1, (3 * N) // 4)].astype(np.int64),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,H", SHAPES)
def test_gemv_gather_and_axpy_match_reference(fmt, N, H):
    rng = np.random.default_rng(N * 1000 + H)
    W, _, _, x = _weights(rng, N, H)
    Wq = Q.quantize(W, fmt)
    assert Wq.data.shape == (N, Q.row_bytes(H, fmt)) and Wq.data.dtype == np.uint8
    _close(Q.gemv(Wq, x), Q.gemv_ref(Wq, x))
    for idx in _index_sets(rng, N).values():
        coef = rng.standard_normal(len(idx), dtype=np.float32)
        _close(Q.gather_gemv(Wq, x, idx), Q.gather_gemv_ref(Wq, x, idx))
        _close(Q.axpy_rows(Wq, coef, idx), Q.axpy_rows_ref(Wq, coef, idx))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows,cols", [(4, 1), (8, 33), (12, 257), (64, 96), (7, 40)])
def test_interleaved_matrix_gives_the_plain_layouts_gemv_bit_for_bit(fmt, rows, cols):
    """Four rows a stored row, block by block (llama.cpp's repacking): the same weights, the same GEMV bits; rows
    that do not divide by four and f32 stay plain; the row-indexed kernels refuse the interleaved layout."""
    rng = np.random.default_rng(rows * 100 + cols)
    W, x = rng.standard_normal((rows, cols), dtype=np.float32), rng.standard_normal(cols, dtype=np.float32)
    Wq = Q.quantize(W, fmt)
    Wi = Wq.interleaved()
    if fmt == "f32" or rows % Q.INTERLEAVE:
        assert Wi is Wq and Wi.interleave == 1
        return
    R, nb, bb = Q.INTERLEAVE, Q.n_blocks(cols), Q.row_bytes(32, fmt)
    assert Wi.data.shape == (rows // R, R * Q.row_bytes(cols, fmt)) and (Wi.rows, Wi.interleave) == (rows, R)
    # stored row g holds block b of row g R + i: Q8_0 at block position b R + i; Q4_0 among the group's b-th R
    # scales and R x 16 nibble bytes
    g, i, b, block = rows // R - 1, R - 1, nb - 1, np.empty(bb, np.uint8)
    want = Wq.data[g * R + i, b * bb : (b + 1) * bb]
    if fmt == "q8_0":
        np.testing.assert_array_equal(Wi.data[g, (b * R + i) * bb : (b * R + i + 1) * bb], want)
    else:
        group = Wi.data[g, b * R * bb : (b + 1) * R * bb]
        np.testing.assert_array_equal(group[2 * i : 2 * i + 2], want[:2])
        np.testing.assert_array_equal(group[2 * R + 16 * i : 2 * R + 16 * i + 16], want[2:])
    Q.interleaved_block_into(Wi.data[g], Wq.code, R, i, b, block)
    np.testing.assert_array_equal(block, want)
    np.testing.assert_array_equal(Wi.plain().data, Wq.data)
    np.testing.assert_array_equal(Q.dequantize(Wi), Q.dequantize(Wq))
    np.testing.assert_array_equal(Q.gemv(Wi, x).view(np.uint32), Q.gemv(Wq, x).view(np.uint32))
    stack = Q.quantize(np.stack([W, 2 * W]), fmt).interleaved()
    np.testing.assert_array_equal(Q.gemv(stack[1], x), Q.gemv(Q.quantize(2 * W, fmt), x))
    with pytest.raises(ValueError, match="plain layout"):
        Q.gather_gemv(Wi, x, np.arange(2))
    with pytest.raises(ValueError, match="interleaved"):
        Q.QMatrix(Wi.data[:, :-1].copy(), fmt, cols)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,H", SHAPES)
def test_bundled_ffn_matches_reference_for_every_variant(fmt, N, H):
    rng = np.random.default_rng(7 + N + H)
    Wg, Wu, Wd, x = _weights(rng, N, H)
    ffn = B.FFNBundles.from_weights(Wg, Wu, Wd, fmt)
    assert ffn.data.shape == (N, 3 * Q.row_bytes(H, fmt))
    for variant in VARIANTS:
        dense = B.ffn_ref(ffn, x, None, variant)
        _close(B.ffn(ffn, x, None, variant), dense)
        _close(B.ffn(ffn, x, None, variant, skip_zeros=True), dense)  # the in-line exact-zero oracle
        _close(B.combined(ffn, x, variant), B.combined_ref(ffn, x, variant))
        for idx in _index_sets(rng, N).values():
            _close(B.ffn(ffn, x, idx, variant), B.ffn_ref(ffn, x, idx, variant))
        _close(B.ffn(ffn, x, np.arange(N), variant), dense)  # all active = dense


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,H", SHAPES)
def test_dense_layout_ffn_matches_reference(fmt, N, H):
    """The dense layout: combined values of every neuron, quantised to Q8_0 blocks once (f32: as they are), times
    the down projection's rows quantised along the neurons, as llama.cpp computes a dense FFN."""
    rng = np.random.default_rng(11 + N + H)
    Wg, Wu, Wd, x = _weights(rng, N, H)
    ffn = B.FFNBundles.from_weights(Wg, Wu, Wd, fmt, dense_layout=True)
    assert ffn.dense_layout and not B.FFNBundles.from_weights(Wg, Wu, Wd, fmt).dense_layout
    gate_up, down_rows = Q.QMatrix(ffn.gate_up, fmt, H), Q.QMatrix(ffn.down_rows, fmt, N)
    assert (gate_up.rows, down_rows.rows) == (2 * N, H)
    # the Q formats interleave four rows a stored row where the rows divide by four (gate and up each on its own)
    assert (gate_up.interleave, down_rows.interleave) == tuple(
        Q.INTERLEAVE if fmt != "f32" and rows % Q.INTERLEAVE == 0 else 1 for rows in (N, H)
    )
    plain = gate_up.plain().data
    np.testing.assert_array_equal(plain, np.concatenate([ffn.part(0).data, ffn.part(1).data]))  # gate, then up
    np.testing.assert_array_equal(ffn.dense_down(), Q.dequantize(Q.quantize(Wd, fmt)))
    for variant in VARIANTS:
        c = Q.activation_ref(B.combined_ref(ffn, x, variant), ffn.code)
        rows = np.zeros(3, np.int64)
        want = (c @ ffn.dense_down().astype(np.float64).T).astype(np.float32)
        _close(B.ffn(ffn, x, None, variant, rows_read=rows), want)
        assert rows.tolist() == [N, N, N]
        for idx in _index_sets(rng, N).values():  # sparse paths read the bundles, dense layout or not
            _close(B.ffn(ffn, x, idx, variant), B.ffn_ref(ffn, x, idx, variant))
        # gate-first reads its gate rows from the dense layout: the same bytes, the bundles' result bit for bit
        bundled = B.FFNBundles(ffn.data, fmt, H, ffn.down_scale)
        np.testing.assert_array_equal(B.ffn(ffn, x, None, variant, True), B.ffn(bundled, x, None, variant, True))
    layer = B.FFNBundles.from_weights(Wg[None], Wu[None], Wd[None], fmt, dense_layout=True)[0]
    np.testing.assert_array_equal(B.ffn(layer, x), B.ffn(ffn, x))
    assert ffn.nbytes == ffn.data.nbytes + ffn.gate_up.nbytes + ffn.down_rows.nbytes
    with pytest.raises(ValueError, match="both gate_up and down_rows"):
        B.FFNBundles(ffn.data, fmt, H, ffn.down_scale, ffn.gate_up, None)
    with pytest.raises(ValueError, match="do not fit"):
        B.FFNBundles(ffn.data, fmt, H, ffn.down_scale, ffn.gate_up[1:].copy(), ffn.down_rows)
    with pytest.raises(ValueError, match="no dense layout"):
        B.FFNBundles.from_weights(Wg, Wu, Wd, fmt).dense_down()


def test_the_bundle_is_gate_up_and_down_column_of_one_neuron():
    rng = np.random.default_rng(0)
    Wg, Wu, Wd, _ = _weights(rng, 5, 8)
    ffn = B.FFNBundles.from_weights(Wg, Wu, Wd, "f32")
    np.testing.assert_array_equal(ffn.data[3].view(np.float32), np.concatenate([Wg[3], Wu[3], Wd[:, 3]]))
    np.testing.assert_array_equal(ffn.dequantized(2), Wd.T)
    assert ffn.down_scale.shape == (0,)


def test_quantised_down_columns_are_scaled_per_hidden_channel():
    """A hidden channel with large weights (an LLM's outlier channel) does not set the block scale of the
    other channels: each channel is divided by its largest weight before quantisation, multiplied back after."""
    rng = np.random.default_rng(1)
    Wg, Wu, Wd, x = _weights(rng, 64, 64)
    Wd[5] *= 100.0  # one outlier channel
    for fmt in ("q8_0", "q4_0"):
        ffn = B.FFNBundles.from_weights(Wg, Wu, Wd, fmt)
        np.testing.assert_allclose(ffn.down_scale, np.abs(Wd).max(axis=1))
        plain = Q.dequantize(Q.quantize(Wd.T.copy(), fmt))
        others = np.arange(64) != 5
        err = lambda A: np.abs(A[:, others] - Wd.T[:, others]).mean()
        assert err(ffn.dequantized(2)) < err(plain) / 5
        _close(B.ffn(ffn, x, None, "drelu"), B.ffn_ref(ffn, x, None, "drelu"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["listed", "in-line oracle"])
def test_sparse_ffn_reads_only_active_rows_and_skips_exact_zeros(fmt, path):
    """Poison (NaN) every row the kernel must not read: the rows of unlisted neurons, the up rows where the gate
    did not fire, the down rows of neurons whose dReLU output is exactly zero. A read would turn the output NaN."""
    rng = np.random.default_rng(3)
    N, H = 97, 33
    Wg, Wu, Wd, x = _weights(rng, N, H)
    ffn = B.FFNBundles.from_weights(Wg, Wu, Wd, fmt)
    idx = rng.permutation(N)[:50].astype(np.int64) if path == "listed" else None
    want = B.ffn_ref(ffn, x, idx, "drelu")
    g_N = Q.dequantize(ffn.part(0)).astype(np.float64) @ Q.activation_ref(x, ffn.code)
    c_N = B.combined_ref(ffn, x, "drelu")
    active = np.zeros(N, bool)
    active[idx if idx is not None else slice(None)] = True
    fired, live = active & (g_N > 0), active & (c_N != 0)
    assert 0 < live.sum() < fired.sum() < active.sum()  # both skips are exercised
    poisoned = ffn.data.copy()
    seg = ffn.seg_bytes
    nan = np.float32(np.nan).tobytes() if fmt == "f32" else np.float16(np.nan).tobytes()
    step = 4 if fmt == "f32" else Q._BLOCK_BYTES[ffn.code]  # poison every float, or every block's scale

    def poison(rows, part):
        for off in range(part * seg, (part + 1) * seg, step):
            poisoned[rows, off : off + len(nan)] = np.frombuffer(nan, np.uint8)

    poison(~active, 0), poison(~fired, 1), poison(~live, 2)
    rows = np.zeros(3, np.int64)
    got = B.ffn(B.FFNBundles(poisoned, fmt, H, ffn.down_scale), x, idx, "drelu", skip_zeros=True, rows_read=rows)
    assert np.isfinite(got).all()
    _close(got, want)
    np.testing.assert_array_equal(rows, [active.sum(), fired.sum(), live.sum()])


def test_dense_ffn_reads_every_row():
    rng = np.random.default_rng(4)
    Wg, Wu, Wd, x = _weights(rng, 50, 16)
    rows = np.zeros(3, np.int64)
    B.ffn(B.FFNBundles.from_weights(Wg, Wu, Wd, "q4_0"), x, None, "drelu", rows_read=rows)
    np.testing.assert_array_equal(rows, [50, 50, 50])


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_quantisation_error_bound_and_zero_blocks(fmt):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((33, 257), dtype=np.float32) * rng.uniform(0.01, 10, (33, 1)).astype(np.float32)
    W[5] = 0.0  # an all-zero row must not divide by zero
    Wq = Q.quantize(W, fmt)
    deq = Q.dequantize(Wq)
    assert deq.shape == W.shape and (deq[5] == 0).all()
    blocks = np.zeros((33, 9 * 32), np.float32)
    blocks[:, :257] = W
    amax = np.abs(blocks.reshape(33, 9, 32)).max(-1).repeat(32, -1)[:, :257]
    # a step is max|block| / 127 (Q8_0) or / 8 (Q4_0); rounding costs half a step, Q4_0's clipping of
    # the top level a whole one, and the half-precision scale a little more
    step = amax / (127 if fmt == "q8_0" else 8)
    bound = (0.5 if fmt == "q8_0" else 1.0) * step * 1.07 + 1e-12
    assert (np.abs(deq - W) <= bound).all()
    if fmt == "q4_0":  # the search includes the reference scale, so no block gets a larger error; in all, smaller
        searched = Q.dequantize(Q.quantize(W, fmt, method="search"))
        assert np.square(searched - W).sum() < 0.95 * np.square(deq - W).sum()
        assert (np.abs(searched - W) <= amax / 7 * 1.07 + 1e-12).all()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_quantised_blocks_are_llama_cpps_byte_for_byte(fmt):
    """Our blocks against an independent quantiser: the NumPy ports of ggml's reference quantisers in the ``gguf``
    package (gguf-py, llama.cpp's own), byte for byte, on random rows and on the edge cases of their rounding:
    an all-zero block, a block whose largest weight is negative, weights exactly half a step apart, a lone spike,
    half-precision scales near the subnormal range, and a row that is not a whole number of blocks."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    W = (rng.standard_normal((48, 160)) * 0.05).astype(np.float32)
    W[0, :32] = 0.0
    W[1, :32] = np.linspace(-1.0, 0.5, 32)  # largest magnitude negative: Q4_0's scale is positive
    W[2, :32] = (np.arange(32) - 15.5) / 127  # every weight at q + 0.5 steps of Q8_0
    W[3, :32] = (np.arange(32) % 16 - 7.5) / 8  # every weight at half a Q4_0 step
    W[4, 40] = 30.0
    W[5] *= 1e-6  # scales of a few 1e-8: subnormal halves
    gtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[fmt]
    theirs = quants.quantize(W, gtype)
    ours = Q.quantize(W, fmt).data
    assert ours.shape == theirs.shape
    bad = np.argwhere(ours != theirs)
    assert bad.size == 0, f"{len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"
    np.testing.assert_array_equal(Q.dequantize(Q.QMatrix(theirs.copy(), fmt, 160)), quants.dequantize(theirs, gtype))
    # a row of 100 weights: we pad with zeros to whole blocks; gguf needs whole blocks, so pad its input the same way
    W100 = W[:, :100]
    padded = np.zeros((48, 128), np.float32)
    padded[:, :100] = W100
    np.testing.assert_array_equal(Q.quantize(W100, fmt).data, quants.quantize(padded, gtype))


def test_half_scales_convert_exactly_subnormals_included():
    # block maxima down to 1e-5 give scales far below fp16's smallest normal number (6.1e-5)
    rng = np.random.default_rng(2)
    W = rng.standard_normal((16, 64), dtype=np.float32) * np.logspace(-5, 1, 16, dtype=np.float32)[:, None]
    x = rng.standard_normal(64, dtype=np.float32)
    for fmt in ("q8_0", "q4_0"):
        Wq = Q.quantize(W, fmt)
        scales = Wq.data.reshape(16, 2, -1)[:, :, :2].copy().view(np.float16)
        assert (np.abs(scales[np.abs(scales) > 0]) < np.float16(6.1e-5)).any()  # subnormals present
        _close(Q.gemv(Wq, x), Q.gemv_ref(Wq, x))


@njit
def _halves(bits):
    out = np.empty((2, bits.shape[0]), np.float32)
    for i in range(bits.shape[0]):
        out[0, i], out[1, i] = simd.half_to_float(bits[i]), simd.half_to_float_portable(bits[i])
    return out


def test_half_to_float_both_ways_over_every_finite_half():
    """The kernels' conversion (an instruction where the CPU has one) and the integer fallback."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    got = _halves(bits[finite])
    np.testing.assert_array_equal(got[0], want[finite])
    np.testing.assert_array_equal(got[1], want[finite])


def test_activation_quantisation_is_bit_exact_and_pads_with_zeros():
    rng = np.random.default_rng(8)
    for x in (
        rng.standard_normal(70, dtype=np.float32) * 5,
        np.zeros(33, np.float32),
        np.array([0.5, -0.5, 127.0, -1e-30, 3.0], np.float32),
    ):
        xq, xd = Q.quantize_activation(x)
        rq, rd = Q.quantize_activation_ref(x)
        np.testing.assert_array_equal(xq, rq)
        np.testing.assert_array_equal(xd, rd)
        assert len(xq) % 32 == 0 and (xq[len(x) :] == 0).all() and np.abs(xq).max(initial=0) <= 127


def test_activation_quantisation_stays_exact_when_first_compiled_by_a_fastmath_kernel(tmp_path):
    # Numba compiles a callee for its first caller's flags when the callee leaves fastmath unset;
    # a cold cache with the engine's (fastmath) matvec compiled first caught that on CI.
    code = """
import numpy as np
from turbosparse_lib.inference import quant as Q, step
x = np.random.default_rng(8).standard_normal(70, dtype=np.float32) * 5
W = Q.quantize(np.random.default_rng(0).standard_normal((4, 70)).astype(np.float32), "q8_0")
step.matvec(W.data, Q.Q8_0, 70, x, np.empty(4, np.float32))
got, want = Q.quantize_activation(x), Q.quantize_activation_ref(x)
assert (got[0] == want[0]).all() and (got[1] == want[1]).all(), (got[1], want[1])
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]


def test_every_kernel_states_its_fastmath_flags():
    """A jitted function that leaves fastmath unset inherits its caller's: every kernel says which it wants."""
    import importlib
    import pkgutil

    import turbosparse_lib.inference as inference

    unset = []
    for info in pkgutil.iter_modules(inference.__path__):
        module = importlib.import_module(f"{inference.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.__module__ == module.__name__:
                if "fastmath" not in obj.targetoptions:
                    unset.append(f"{module.__name__}.{name}")
    assert not unset, f"set fastmath= explicitly on: {unset}"


@pytest.mark.parametrize(
    "n_heads,G,E,pos,lo,softcap",  # lo > 0: a sliding window; softcap > 0: Gemma 2's tanh on the scores
    [(4, 2, 16, 0, 0, 0.0), (9, 3, 64, 20, 0, 0.0), (4, 4, 8, 12, 5, 0.0), (6, 1, 6, 3, 3, 0.0), (4, 2, 16, 9, 0, 1.5)],
)
def test_decode_attention_matches_reference(n_heads, G, E, pos, lo, softcap):
    rng = np.random.default_rng(pos)
    scale = np.float32(0.7 / np.sqrt(E))  # not 1 / sqrt(E): the scale is the caller's (Gemma 2/3 set their own)
    qkv = rng.standard_normal((n_heads + 2 * G) * E, dtype=np.float32)
    angles = rng.uniform(0, 6, E // 2).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    k1, v1 = rng.standard_normal((2, G, pos + 2, E), dtype=np.float32)
    k2, v2 = k1.copy(), v1.copy()
    got = A.decode_attention(qkv, k1, v1, cos, sin, pos, n_heads, lo, scale, np.float32(softcap))
    want = A.decode_attention_ref(qkv, k2, v2, cos, sin, pos, n_heads, lo, scale, softcap)
    _close(got, want)
    if softcap:  # the cap changed the result: scores of standard normal q, k reach well past 1.5
        uncapped = A.decode_attention_ref(qkv, k1.copy(), v1.copy(), cos, sin, pos, n_heads, lo, scale, 0.0)
        assert np.abs(uncapped - want).max() > 1e-2
    _close(k1, k2)
    np.testing.assert_array_equal(v1, v2)


def test_combine_is_equation_2_for_drelu():
    g = np.array([-1.0, -1.0, 2.0, 2.0, 0.0], np.float32)
    u = np.array([-3.0, 3.0, -3.0, 3.0, 5.0], np.float32)
    np.testing.assert_array_equal(K.combine_ref(g, u, "drelu"), [0, 0, 0, 6, 0])
    np.testing.assert_array_equal(K.combine_ref(g, u, "reglu"), [0, 0, -6, 6, 0])


@pytest.mark.parametrize("n", [0, 5, 32, 64, 77, 576])
def test_f32_dot_matches_numpy(n):
    """The fixed-order float32 dot product of every f32 kernel: on a uint8 row at a byte offset (a bundled FFN row)
    and on float32 arrays; a non-contiguous array is refused at compile time, not read wrongly."""
    from turbosparse_lib.inference import simd

    @njit
    def dot(a, off, b, n):
        return simd.f32_dot(a, off, b, n)

    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((2, n + 3), dtype=np.float32)
    want = float(np.dot(a[:n].astype(np.float64), b[:n]))
    row = np.concatenate([np.zeros(12, np.uint8), a.view(np.uint8)])  # a's values from byte 12
    for got in (dot(a, 0, b, n), dot(row, 12, b, n)):
        assert isinstance(got, float) and abs(got - want) <= 1e-5 * (1 + np.abs(a[:n] * b[:n]).sum())
    with pytest.raises(numba.core.errors.TypingError):
        dot(a[::2], 0, b, 1)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_every_integer_dot_instruction_set_gives_the_same_bits(fmt):
    """The block dot product on VNNI, AVX2 and portable IR: the same float32 bits (each block's 8 partial sums are
    equal lane for lane), equal to exact arithmetic on the dequantised blocks up to float rounding. The host runs
    ``simd.INT8_DOT``; the sets it lacks are skipped, so a machine without VNNI still checks its own fallback."""
    rng = np.random.default_rng(3)
    H = 32 * 37 + 5
    W = rng.standard_normal((8, H), dtype=np.float32)  # two groups of four interleaved rows
    W[0, :32] = 0  # a zero block
    x = rng.standard_normal(H, dtype=np.float32) * 4
    x[40:72] = -np.abs(x[40:72])  # a block of negative activations: the sign trick's case
    Wq, (xq, xd) = Q.quantize(W, fmt), Q.quantize_activation(x)
    assert xq.dtype == np.int8
    block_bytes = {"q8_0": simd.Q8_BLOCK_BYTES, "q4_0": simd.Q4_BLOCK_BYTES}[fmt]
    results = {}
    # the sets are nested (a VNNI host has AVX2; every host runs portable IR): the host's and every set after it
    for isa in simd.INT8_DOTS[simd.INT8_DOTS.index(simd.INT8_DOT) :]:
        dot = simd.block_dot_for(block_bytes, isa)

        @njit
        def rows(data, xq, xd, dot=dot):
            return np.array([dot(data[r], 0, xq, xd, xd.shape[0]) for r in range(data.shape[0])], np.float32)

        results[isa] = rows(Wq.data, xq, xd)
    assert "portable" in results and simd.INT8_DOT in results
    for isa, got in results.items():
        np.testing.assert_array_equal(got.view(np.uint32), results["portable"].view(np.uint32), err_msg=isa)
    _close(results["portable"], Q.gemv_ref(Wq, x), rtol=1e-5)
    with pytest.raises(ValueError, match="instruction set"):
        simd.block_dot_for(block_bytes, "sse9")
    # the interleaved kernel (four rows in one stream) gives the same bits on every set
    data = Wq.interleaved().data
    assert data.shape[0] == 2
    for isa in results:
        dot_rows = simd.interleaved_dot_for(block_bytes, isa, simd.INTERLEAVE)

        @njit
        def groups(data, xq, xd, dot_rows=dot_rows):
            y = np.empty(data.shape[0] * simd.INTERLEAVE, np.float32)
            for g in range(data.shape[0]):
                dot_rows(data[g], 0, xq, xd, xd.shape[0], y, g * simd.INTERLEAVE)
            return y

        got = groups(data, xq, xd)
        np.testing.assert_array_equal(got.view(np.uint32), results["portable"].view(np.uint32), err_msg=isa)


_KERNEL_BITS = """
import hashlib, numpy as np
from turbosparse_lib.inference import attention, bundles, quant, step
rng = np.random.default_rng(0)
h = hashlib.sha256()
for fmt in ("f32", "q8_0", "q4_0"):
    W = quant.quantize(rng.standard_normal((96, 200)).astype(np.float32), fmt)
    h.update(quant.gemv(W, rng.standard_normal(200).astype(np.float32)).tobytes())
    gate, up = rng.standard_normal((2, 300, 200)).astype(np.float32)
    ffn = bundles.FFNBundles.from_weights(gate, up, rng.standard_normal((200, 300)).astype(np.float32), fmt)
    h.update(bundles.ffn(ffn, rng.standard_normal(200).astype(np.float32), variant="swiglu").tobytes())
x, out = rng.standard_normal((2, 577)).astype(np.float32)
step.rms_norm_into(x, np.ones(577, np.float32), 1e-6, out)
h.update(out.tobytes())
qkv = rng.standard_normal(8 * 64).astype(np.float32)
k, v = rng.standard_normal((2, 2, 40, 64)).astype(np.float32)
cos, sin = rng.standard_normal((2, 32)).astype(np.float32)
h.update(attention.decode_attention(qkv, k, v, cos, sin, 39, 4, 0, np.float32(0.125), np.float32(0)).tobytes())
print(h.hexdigest())
"""


def test_kernels_compute_the_same_bits_fresh_and_from_numbas_cache(tmp_path):
    """A kernel loaded from Numba's cache computes what it computed when compiled. Under reassociation it did not
    (LLVM chose a reduction's order anew in each compiled copy), so results, and Q8_0 greedy tokens, depended on
    which kernels a process had compiled and which it had loaded."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", _KERNEL_BITS], env=env, capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert list(tmp_path.rglob("*.nbi")), "the first run did not cache its kernels"
    assert runs[0].stdout == runs[1].stdout


def test_int32_indices_work_and_bad_input_raises():
    rng = np.random.default_rng(0)
    Wg, Wu, Wd, x = _weights(rng, 20, 9)
    Wq = Q.quantize(Wg, "q8_0")
    idx = np.array([19, 0, 5], np.int32)
    _close(Q.gather_gemv(Wq, x, idx), Q.gather_gemv_ref(Wq, x, idx))
    ffn = B.FFNBundles.from_weights(Wg, Wu, Wd, "q8_0")
    _close(B.ffn(ffn, x, idx), B.ffn_ref(ffn, x, idx))
    with pytest.raises(IndexError, match=r"\[0, 20\)"):
        B.ffn(ffn, x, np.array([20]))
    with pytest.raises(ValueError, match="hidden size is 9"):
        B.ffn(ffn, x[:8])
    with pytest.raises(ValueError, match="8 columns|9 columns"):
        Q.gemv(Wq, x[:8])
    with pytest.raises(ValueError, match="q4_0"):
        Q.quantize(Wg, "q5_k")


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


def test_cycle_counter_runs_forward():
    @njit
    def two():
        return simd.cycle_counter(), simd.cycle_counter()

    a, b = two()
    assert (b >= a > 0) if simd.CYCLE_COUNTER_AVAILABLE else a == b == 0


def test_validate_kernels_and_threads():
    worst = validate_kernels(shapes=((7, 33), (33, 7)))
    assert worst and max(worst.values()) < 2e-4
    assert {"gemv[q4_0]", "ffn_sparse[q8_0]", "ffn_exact_in_line[f32]"} <= worst.keys()
    n_before = numba.get_num_threads()
    rng = np.random.default_rng(0)
    ffn = B.FFNBundles.from_weights(*_weights(rng, 40, 16)[:3], "q4_0")
    x, idx = rng.standard_normal(16, dtype=np.float32), np.array([1, 3, 30, 7])
    try:
        T.set_threads(1)  # one thread's range instead of one per thread: same answer
        info = T.thread_info()
        assert info["numba_threads"] == 1 and info["torch_threads"] == 1
        _close(B.ffn(ffn, x, idx), B.ffn_ref(ffn, x, idx))
    finally:
        T.set_threads(n_before)
    with pytest.raises(ValueError, match="threads"):
        T.set_threads(numba.config.NUMBA_NUM_THREADS + 1)


def test_ffn_over_stacked_layers_is_each_layers_ffn():
    """The benchmark's sweep (every layer in turn, each on its own input and mask) equals per-layer calls."""
    rng = np.random.default_rng(9)
    L, N, H = 3, 40, 33
    layers = [_weights(rng, N, H) for _ in range(L)]
    for fmt in FORMATS:
        parts = [B.FFNBundles.from_weights(*w[:3], fmt) for w in layers]
        stack = B.FFNBundles(np.stack([p.data for p in parts]), fmt, H, np.stack([p.down_scale for p in parts]))
        x = np.stack([w[3] for w in layers])
        masks = [rng.permutation(N)[: 5 + 7 * li] for li in range(L)]
        offsets = np.concatenate([[0], np.cumsum([len(m) for m in masks])]).astype(np.int64)
        y, rows = np.empty((L, H), np.float32), np.zeros(3, np.int64)
        B.ffn_layers_into(
            stack.data,
            stack.down_scale,
            stack.code,
            H,
            x,
            offsets,
            np.concatenate(masks),
            True,
            True,
            *K.variant_code("drelu"),
            numba.get_num_threads(),
            y,
            rows,
        )
        for li in range(L):
            _close(y[li], B.ffn_ref(stack[li], x[li], masks[li], "drelu"))
        assert rows[0] == sum(len(m) for m in masks)


def test_cached_kernels_are_stamped_with_every_source_of_the_package():
    """The kernels inline each other across files, so a cached kernel is valid only for the sources of the whole
    package that compiled it (``inference.SOURCES_DIGEST``), not its own file's: an edit of ``quant``, or a process
    left running on old sources, must not leave stale machine code for ``bundles`` or ``step``. Functions outside the
    package keep Numba's own locators."""
    import turbosparse_lib.inference as I
    from turbosparse_lib.inference import step

    assert I.PACKAGE_STAMPS and I.SOURCES_DIGEST == I.sources_digest()
    for kernel in (B.ffn_into, Q.gemv_into, step.decode_token, A.decode_attention):
        locator = kernel._cache._impl.locator
        assert type(locator).__name__ == "_PackageCacheLocator"
        assert kernel._cache._cache_file._source_stamp == I.SOURCES_DIGEST

    @njit(cache=True)
    def elsewhere(x):
        return x + 1

    assert type(elsewhere._cache._impl.locator).__name__ != "_PackageCacheLocator"
    assert elsewhere(1) == 2
