"""The gated-MLP activations every kernel shares, beside their NumPy reference.

Decoding one token is a chain of matrix-vector products whose cost is reading the weights
once. The kernels live by concept: ``quant`` (weight formats and GEMV rows), ``bundles`` (the
FFN in bundled-neuron layout, dense and sparse), ``attention`` (RoPE and grouped-query attention
for one token) and ``step`` (a whole decode step in one compiled call). This module holds what
they share:

- ``FASTMATH``: contraction only (a multiply and an add may fuse into one FMA). Not reassociation: under it LLVM
  chooses a reduction's order anew wherever a kernel is compiled, and a kernel compiled fresh, one loaded from
  Numba's cache and its copy inlined into the fused step rounded differently, so results depended on the cache's
  history (greedy tokens at Q8_0 changed with it). Reductions are vectorised explicitly instead, in a fixed order
  (``simd.f32_dot`` and the block dots). NaN/Inf semantics stay intact, so ``g > 0`` and ``c != 0`` stay exact.
- The gate and up activations of every gated-MLP variant of the one registry,
  ``models.variants.VARIANTS``: each is a gate activation and an up activation, and kernels take
  the integer code the registry derives (``variant_code``), since an integer branch inside a
  Numba loop is cheaper than a string. Any variant built from the registry's activations runs in
  every kernel with no change.

``inference.validate.validate_kernels()`` runs every kernel against its NumPy reference (it needs ``quant`` and
``bundles``, which build on this module, so it lives beside them, not here).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..models.variants import get_variant

# Contraction only: a sum's order is the code's, the same in every compiled copy of a kernel (see above).
FASTMATH = {"contract"}


def variant_code(variant, **variant_kwargs) -> tuple[int, np.float32]:
    """``(code, shift)`` of a gated-MLP variant of the one registry (``models.variants``), for the kernels.

    ``variant`` is a registry name, or an already resolved ``(code, shift)`` pair (passed through).
    """
    if isinstance(variant, tuple):
        return int(variant[0]), np.float32(variant[1])
    code, shift = get_variant(variant).kernel_code(**variant_kwargs)
    return code, np.float32(shift)


# ---------------------------------------------------------------------------------------------
# Gated-MLP activations (inlined into the kernels)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def gate_act(g, code, shift):
    """The gate activation of variant ``code`` (codes: ``models.variants.GATE_ACTIVATIONS``)."""
    gate = code >> 1
    if gate == 0:  # silu
        return g / (np.float32(1.0) + np.float32(math.exp(-g)))
    if gate == 1:  # gelu, tanh approximation (transformers' gelu_pytorch_tanh)
        inner = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)
        return np.float32(0.5) * g * (np.float32(1.0) + np.float32(math.tanh(inner)))
    if gate == 2:  # relu
        return g if g > 0 else np.float32(0.0)
    if gate == 3:  # shifted relu: relu(g - b)
        return g - shift if g > shift else np.float32(0.0)
    return g * g if g > 0 else np.float32(0.0)  # relu2


@njit(fastmath=FASTMATH, cache=True, inline="always")
def up_act(u, code):
    if code & 1:  # relu on the up branch (dReLU)
        return u if u > 0 else np.float32(0.0)
    return u


def combine_ref(g: np.ndarray, u: np.ndarray, variant) -> np.ndarray:
    """NumPy reference of the gated-MLP combination, any leading shape; ``variant`` as in ``variant_code``."""
    code, shift = variant_code(variant)
    g, u = np.asarray(g, dtype=np.float32), np.asarray(u, dtype=np.float32)
    gate = code >> 1
    with np.errstate(over="ignore"):  # exp(-g) = inf for g << 0 gives silu(g) = -0, as wanted
        if gate == 0:
            a = g / (np.float32(1) + np.exp(-g))
        elif gate == 1:
            a = 0.5 * g * (1 + np.tanh(np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g**3)))
        elif gate == 2:
            a = np.maximum(g, 0)
        elif gate == 3:
            a = np.maximum(g - shift, 0)
        else:
            a = np.maximum(g, 0) ** 2
    return (a * (np.maximum(u, 0) if code & 1 else u)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Validation (also the JIT warm-up)


def assert_close(name: str, got: np.ndarray, want: np.ndarray, rtol: float = 2e-4) -> float:
    """Max error relative to the reference's scale; float32 sums in another order differ a little."""
    if got.shape != want.shape or got.dtype != np.float32:
        raise AssertionError(f"{name}: got {got.dtype}{got.shape}, want float32{want.shape}")
    err = float(np.max(np.abs(got - want), initial=0.0))
    scale = float(np.max(np.abs(want), initial=0.0)) + 1e-6
    if err > rtol * scale:
        raise AssertionError(f"{name}: max |error| {err:.3g} exceeds {rtol} x {scale:.3g}")
    return err / scale
