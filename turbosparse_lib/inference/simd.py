"""SIMD loops over quantised blocks, written as LLVM IR and called from Numba kernels as intrinsics.

Numba vectorises a flat float loop well, but not a dot product of 32-element blocks that each
carry their own scale: it unrolls the 32-element inner loop and then packs it badly (measured
at a third to a fifth of the flat loop's speed). These intrinsics state the vector shape
directly in LLVM IR (``<32 x i8>``, ``<8 x float>``). The integer dot product inside a block
names the host's instructions where it has them, as llama.cpp's kernels do: ``vpdpbusd`` on
AVX-512 VNNI, ``vpmaddubsw`` + ``vpmaddwd`` on AVX2; generic IR elsewhere (SSE, NEON). The three
give the same partial sums lane for lane, so the same float result (a test compiles all three).

Block formats (``quant`` has the layouts, the quantisers and the NumPy references):

- Q8_0: 34 bytes per 32 weights, ``[fp16 scale d | 32 x int8 q]``, weight = d * q;
- Q4_0: 18 bytes per 32 weights, ``[fp16 scale d | 16 bytes]``, byte j holds weight j in its
  low nibble and weight j + 16 in its high nibble, weight = d * (nibble - 8).

A dot product takes the activation already quantised to Q8_0 blocks once per vector
(``quant.quantize_activation``: int8 values and a float32 scale per block), as llama.cpp does. Int8
keeps a 14,336-wide activation at 14 KB (int16 values took 28 KB, and the long-row GEMVs read at about half the DRAM
bandwidth); even so, one 14,336-wide row at a time overflows the L1 cache, which four interleaved rows
(``interleaved_dot_for``) do not. Each block is an exact integer dot
product, ``sum_j q_j * x_j``, scaled once by ``d_weight * d_activation`` into an ``<8 x float>``
accumulator that is reduced only at the end of the row. An axpy (``y += c * row``, the sparse
down projection) dequantises a block on the fly into ``y``.

Pointers: weights are passed as a ``uint8`` array and a byte offset (a row inside a stacked or
bundled matrix); activations, their scales and ``y`` from their first element. The callers check
sizes; the intrinsics read exactly ``n_blocks`` blocks.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_FAST = ("contract",)  # reassociation and contraction for the float accumulator (as the kernels' FASTMATH)

Q8_BLOCK_BYTES, Q4_BLOCK_BYTES, BLOCK = 34, 18, 32
Q4_OFFSET = 8  # a Q4_0 weight is its nibble minus 8


def _vec(t, n):
    return ir.VectorType(t, n)


def _const_vec(t, n, value):
    return ir.Constant(_vec(t, n), [value] * n)


def _lanes(builder, v, lanes):
    """The listed lanes of vector ``v`` as a new vector (a shufflevector)."""
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, len(lanes)), list(lanes)))


def _splat(builder, scalar, n):
    v = builder.insert_element(ir.Constant(_vec(scalar.type, n), ir.Undefined), scalar, ir.Constant(_I32, 0))
    return _lanes(builder, v, [0] * n)


def _byte_ptr(context, builder, aryty, ary, offset):
    """Address of byte ``offset`` of an array's data."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(builder.bitcast(data, _I8.as_pointer()), [offset])


def _elem_ptr(context, builder, aryty, ary, index, elem_type):
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(builder.bitcast(data, elem_type.as_pointer()), [index])


def _load_vec(builder, byte_ptr, elem_type, n):
    return builder.load(builder.bitcast(byte_ptr, _vec(elem_type, n).as_pointer()), align=1)


def _host_converts_halves() -> bool:
    """Whether the host converts IEEE halves in hardware (x86 F16C, every AArch64)."""
    import llvmlite.binding as llvm

    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except RuntimeError:  # features unknown
        return False


NATIVE_HALF = _host_converts_halves()


INT8_DOTS = ("vnni", "avx2", "portable")


def _host_int8_dot() -> str:
    """The integer dot product the host runs fastest: AVX-512 VNNI (with its 256-bit forms), else AVX2, else
    portable IR. AVX-VNNI without AVX-512 (some Intel client CPUs) takes the AVX2 path: not tested here."""
    import llvmlite.binding as llvm

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "portable"
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # features unknown
        return "portable"
    if features.get("avx512vnni", False) and features.get("avx512vl", False):
        return "vnni"
    return "avx2" if features.get("avx2", False) else "portable"


INT8_DOT = _host_int8_dot()


def _half_to_float(builder, bits16, native=None):
    """IEEE half -> float: one instruction where the host has one (``fpext half``), else integer ops.

    The fallback is exact for normal and subnormal halves (scales are never inf or NaN): the 15
    magnitude bits shifted left by 13 are a float 2^112 times too small for every finite half,
    so one multiply fixes the exponent, then the sign bit is put back. It needs no runtime helper,
    which ``fpext half`` would call on a CPU without half conversions.
    """
    if NATIVE_HALF if native is None else native:
        return builder.fpext(builder.bitcast(bits16, ir.HalfType()), _F32)
    h = builder.zext(bits16, _I32)
    mag = builder.shl(builder.and_(h, ir.Constant(_I32, 0x7FFF)), ir.Constant(_I32, 13))
    value = builder.fmul(builder.bitcast(mag, _F32), ir.Constant(_F32, 2.0**112))
    sign = builder.shl(builder.and_(h, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    return builder.bitcast(builder.or_(builder.bitcast(value, _I32), sign), _F32)


def _make_half_to_float(native):
    @intrinsic
    def half_to_float(typingctx, bits):
        sig = types.float32(types.uint16)

        def codegen(context, builder, signature, args):
            return _half_to_float(builder, args[0], native)

        return sig, codegen

    return half_to_float


half_to_float = _make_half_to_float(None)
half_to_float.__doc__ = "half_to_float(uint16 bits) -> float32, as the kernels convert block scales."
half_to_float_portable = _make_half_to_float(False)
half_to_float_portable.__doc__ = "half_to_float with integer ops only (the fallback of CPUs without F16C)."


def _block_scale(builder, block_ptr):
    return _half_to_float(builder, builder.load(builder.bitcast(block_ptr, _I16.as_pointer()), align=1))


def _pair_sums(builder, v, n):
    """<n x i32> -> <n/2 x i32>, lane i = v[2i] + v[2i+1]."""
    return builder.add(_lanes(builder, v, range(0, n, 2)), _lanes(builder, v, range(1, n, 2)))


def _call_intrinsic(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _int_dot32(builder, w8, x8, isa):
    """Exact integer dot product of 32 int8 weights and 32 int8 activations as <8 x i32> partial sums, lane i
    summing products 4i .. 4i + 3 on every ``isa``, so the three give the same lanes and the same float results.

    - ``vnni``: one ``vpdpbusd`` (AVX-512 VNNI, 256-bit form). It multiplies unsigned by signed bytes, so the
      activation's sign moves onto the weight, as llama.cpp does: |x| * (w * sign(x)). Weights in [-127, 127]
      (what the Q8_0 and Q4_0 quantisers write) keep the negation exact;
    - ``avx2``: the same sign trick, then ``vpmaddubsw`` (pairs to int16; 2 x 127 x 127 cannot saturate) and
      ``vpmaddwd`` with ones (pairs of pairs to int32), llama.cpp's AVX2 kernel;
    - ``portable``: widen to int32, multiply, add pairs twice; LLVM lowers it to whatever the target has."""
    v32i8 = _vec(_I8, 32)
    if isa == "portable":
        prod = builder.mul(builder.sext(w8, _vec(_I32, 32)), builder.sext(x8, _vec(_I32, 32)), flags=("nsw",))
        return _pair_sums(builder, _pair_sums(builder, prod, 32), 16)
    abs_x = _call_intrinsic(builder, "llvm.abs.v32i8", v32i8, [x8, ir.Constant(ir.IntType(1), 0)])
    if isa == "vnni":
        negative = builder.icmp_signed("<", x8, _const_vec(_I8, 32, 0))
        signed_w = builder.select(negative, builder.sub(_const_vec(_I8, 32, 0), w8), w8)
        v8 = _vec(_I32, 8)
        args = [_const_vec(_I32, 8, 0), builder.bitcast(abs_x, v8), builder.bitcast(signed_w, v8)]
        return _call_intrinsic(builder, "llvm.x86.avx512.vpdpbusd.256", v8, args)
    signed_w = _call_intrinsic(builder, "llvm.x86.avx2.psign.b", v32i8, [w8, x8])
    pairs = _call_intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [abs_x, signed_w])
    return _call_intrinsic(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [pairs, _const_vec(_I16, 16, 1)])


def _int_dot32_offset(builder, w_u8, x8, offset, isa):
    """As ``_int_dot32`` for weights stored with an offset, ``(w_u8 - offset) . x8`` with ``w_u8`` unsigned in
    [0, 15] (Q4_0's nibbles, offset 8), the same lanes. Unsigned weights feed ``vpdpbusd`` / ``vpmaddubsw`` as they
    are, so the sign trick's four operations per block give way to a second dot with the constant offset, which is
    subtracted: ``sum w x - offset * sum x``, llama.cpp's Q4_0 trick. Exact in int16 on AVX2 (|pair| <= 2 x 8 x 127)."""
    if isa == "portable":
        return _int_dot32(builder, builder.sub(w_u8, _const_vec(_I8, 32, offset)), x8, isa)
    if isa == "vnni":
        v8, zero = _vec(_I32, 8), _const_vec(_I32, 8, 0)
        x32 = builder.bitcast(x8, v8)
        dot = _call_intrinsic(builder, "llvm.x86.avx512.vpdpbusd.256", v8, [zero, builder.bitcast(w_u8, v8), x32])
        off = builder.bitcast(_const_vec(_I8, 32, offset), v8)
        return builder.sub(dot, _call_intrinsic(builder, "llvm.x86.avx512.vpdpbusd.256", v8, [zero, off, x32]))
    v16i16 = _vec(_I16, 16)
    pairs = _call_intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [w_u8, x8])
    off = _call_intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [_const_vec(_I8, 32, offset), x8])
    ones = _const_vec(_I16, 16, 1)
    return _call_intrinsic(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [builder.sub(pairs, off), ones])


def _hsum8(builder, v):
    """Horizontal sum of an <8 x float>."""
    s4 = builder.fadd(_lanes(builder, v, range(4)), _lanes(builder, v, range(4, 8)), flags=_FAST)
    s2 = builder.fadd(_lanes(builder, s4, range(2)), _lanes(builder, s4, range(2, 4)), flags=_FAST)
    return builder.fadd(
        builder.extract_element(s2, ir.Constant(_I32, 0)),
        builder.extract_element(s2, ir.Constant(_I32, 1)),
        flags=_FAST,
    )


def _counted_loop(builder, n, body, acc_init=None):
    """``for b in range(n): acc = body(b, acc)``; returns the final accumulator (``acc_init`` if n <= 0)."""
    entry = builder.block
    loop = builder.function.append_basic_block("blocks")
    done = builder.function.append_basic_block("blocks_done")
    builder.cbranch(builder.icmp_signed(">", n, ir.Constant(_I64, 0)), loop, done)
    builder.position_at_end(loop)
    b = builder.phi(_I64)
    b.add_incoming(ir.Constant(_I64, 0), entry)
    acc = None
    if acc_init is not None:
        acc = builder.phi(acc_init.type)
        acc.add_incoming(acc_init, entry)
    acc_next = body(b, acc)
    b_next = builder.add(b, ir.Constant(_I64, 1))
    tail = builder.block  # body may have added blocks
    b.add_incoming(b_next, tail)
    if acc is not None:
        acc.add_incoming(acc_next, tail)
    builder.cbranch(builder.icmp_signed("<", b_next, n), loop, done)
    builder.position_at_end(done)
    if acc_init is None:
        return None
    out = builder.phi(acc_init.type)
    out.add_incoming(acc_init, entry)
    out.add_incoming(acc_next, tail)
    return out


def _q8_weights(builder, block_ptr):
    """The 32 weights of a Q8_0 block as a <32 x i8>."""
    return _load_vec(builder, builder.gep(block_ptr, [ir.Constant(_I64, 2)]), _I8, 32)


def _q4_nibbles(builder, block_ptr):
    """The 32 nibbles of a Q4_0 block as a <32 x i8> in [0, 15]: low nibbles are weights 0-15, high 16-31."""
    packed = _load_vec(builder, builder.gep(block_ptr, [ir.Constant(_I64, 2)]), _I8, 16)
    low = builder.and_(packed, _const_vec(_I8, 16, 15))
    high = builder.lshr(packed, _const_vec(_I8, 16, 4))
    return builder.shuffle_vector(low, high, ir.Constant(_vec(_I32, 32), list(range(32))))


def _q4_weights(builder, block_ptr):
    """The 32 weights of a Q4_0 block as a <32 x i8> in [-8, 7]."""
    return builder.sub(_q4_nibbles(builder, block_ptr), _const_vec(_I8, 32, Q4_OFFSET))


_WEIGHTS = {Q8_BLOCK_BYTES: _q8_weights, Q4_BLOCK_BYTES: _q4_weights}


def _block_part(builder, blk, x8, x_scale, block_bytes, isa):
    """One block's contribution to a row dot product as an ``<8 x float>``: the exact integer dot of its 32 weights
    with the activation's block ``x8``, times the weight scale and the activation's scale ``x_scale``."""
    if block_bytes == Q4_BLOCK_BYTES:
        isum = _int_dot32_offset(builder, _q4_nibbles(builder, blk), x8, Q4_OFFSET, isa)
    else:
        isum = _int_dot32(builder, _q8_weights(builder, blk), x8, isa)
    scale = builder.fmul(_block_scale(builder, blk), x_scale)
    return builder.fmul(builder.sitofp(isum, _vec(_F32, 8)), _splat(builder, scale, 8), flags=_FAST)


def _activation_block(context, builder, xq_ty, xq_arr, xd_ty, xd_arr, b):
    """Block ``b`` of a quantised activation: its 32 int8 values and its float32 scale."""
    x8 = _load_vec(
        builder, _elem_ptr(context, builder, xq_ty, xq_arr, builder.mul(b, ir.Constant(_I64, BLOCK)), _I8), _I8, 32
    )
    return x8, builder.load(_elem_ptr(context, builder, xd_ty, xd_arr, b, _F32))


def block_dot_for(block_bytes: int, isa: str):
    """The block dot product intrinsic for one weight format and one integer-dot instruction set (``INT8_DOTS``);
    ``q8_dot`` and ``q4_dot`` are the host's. Tests build the others to check that every set gives the same bits."""
    if isa not in INT8_DOTS:
        raise ValueError(f"unknown integer-dot instruction set {isa!r}; choose one of {INT8_DOTS}")

    @intrinsic
    def block_dot(typingctx, w, w_offset, xq, xd, n_blocks):
        sig = types.float32(w, types.intp, xq, xd, types.intp)

        def codegen(context, builder, signature, args):
            w_ty, _, xq_ty, xd_ty, _ = signature.args
            w_arr, off, xq_arr, xd_arr, nb = args
            row = _byte_ptr(context, builder, w_ty, w_arr, off)

            def body(b, acc):
                blk = builder.gep(row, [builder.mul(b, ir.Constant(_I64, block_bytes))])
                x8, x_scale = _activation_block(context, builder, xq_ty, xq_arr, xd_ty, xd_arr, b)
                return builder.fadd(acc, _block_part(builder, blk, x8, x_scale, block_bytes, isa), flags=_FAST)

            return _hsum8(builder, _counted_loop(builder, nb, body, _const_vec(_F32, 8, 0.0)))

        return sig, codegen

    return block_dot


def _concat(builder, parts):
    """Vectors of equal length (a power-of-two count of them) joined end to end."""
    while len(parts) > 1:
        n = parts[0].type.count
        mask = ir.Constant(_vec(_I32, 2 * n), list(range(2 * n)))
        parts = [builder.shuffle_vector(parts[i], parts[i + 1], mask) for i in range(0, len(parts), 2)]
    return parts[0]


def _q4_group_isums(builder, nibbles_ptr, x8, isa, rows):
    """The integer partial sums of ``rows`` Q4_0 blocks whose 16 nibble bytes lie back to back at ``nibbles_ptr``
    with one activation block: ``<8 rows x i32>``, row r's lanes 8r .. 8r + 7 equal to ``_int_dot32_offset``'s for
    that row. On VNNI with four rows, two 512-bit ``vpdpbusd`` take the low nibbles of all four rows (weights 0-15)
    and two the high ones (16-31), each with its constant-offset dot, and one shuffle puts each row's eight lanes
    together (the single-row Q4_0 dot is compute-bound: 1.16 ns per block in cache against 0.80 for this kernel with
    ``_group_scales``, ``benchmarks/kernel_layouts.py``)."""
    packed = _load_vec(builder, nibbles_ptr, _I8, 16 * rows)
    low = builder.and_(packed, _const_vec(_I8, 16 * rows, 15))
    high = builder.lshr(packed, _const_vec(_I8, 16 * rows, 4))
    if isa != "vnni" or rows != 4:
        mask = lambda r: ir.Constant(
            _vec(_I32, 32), [16 * r + j for j in range(16)] + [16 * rows + 16 * r + j for j in range(16)]
        )
        return _concat(
            builder,
            [
                _int_dot32_offset(builder, builder.shuffle_vector(low, high, mask(r)), x8, Q4_OFFSET, isa)
                for r in range(rows)
            ],
        )
    v16, zero = _vec(_I32, 16), _const_vec(_I32, 16, 0)
    eights = builder.bitcast(_const_vec(_I8, 64, Q4_OFFSET), v16)

    def dot_minus_offset(w, half):  # every row's 16 weights of one half with the activation's same half
        xs = builder.bitcast(
            builder.shuffle_vector(x8, x8, ir.Constant(_vec(_I32, 64), [16 * half + j % 16 for j in range(64)])), v16
        )
        dot = _call_intrinsic(builder, "llvm.x86.avx512.vpdpbusd.512", v16, [zero, builder.bitcast(w, v16), xs])
        return builder.sub(dot, _call_intrinsic(builder, "llvm.x86.avx512.vpdpbusd.512", v16, [zero, eights, xs]))

    lo, hi = dot_minus_offset(low, 0), dot_minus_offset(high, 1)
    order = [lane for r in range(4) for lane in [4 * r + i for i in range(4)] + [16 + 4 * r + i for i in range(4)]]
    return builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 32), order))


def _group_scales(builder, scales_ptr, x_scale, rows):
    """``<8 rows x float>`` with lanes 8r .. 8r + 7 equal to row r's block scale (the ``rows`` halves at
    ``scales_ptr``) times ``x_scale``: one load, conversion and multiply for all rows where the host converts halves
    (the same products as the single-row kernel's one at a time), row by row otherwise."""
    if NATIVE_HALF:
        halves = builder.bitcast(_load_vec(builder, scales_ptr, _I16, rows), _vec(ir.HalfType(), rows))
        vec = builder.fmul(builder.fpext(halves, _vec(_F32, rows)), _splat(builder, x_scale, rows))
    else:
        vec = _const_vec(_F32, rows, 0.0)
        for r in range(rows):
            s_r = builder.fmul(_block_scale(builder, builder.gep(scales_ptr, [ir.Constant(_I64, 2 * r)])), x_scale)
            vec = builder.insert_element(vec, s_r, ir.Constant(_I32, r))
    return builder.shuffle_vector(
        vec, vec, ir.Constant(_vec(_I32, 8 * rows), [r for r in range(rows) for _ in range(8)])
    )


def interleaved_dot_for(block_bytes: int, isa: str, rows: int):
    """The dot products of ``rows`` interleaved rows with one activation (``q8_dot_rows``, ``q4_dot_rows`` for the
    host), as llama.cpp's repacked kernels (``q4_0_4x8``) compute them: one contiguous stream feeds all rows, each
    activation block loaded once for them. The weights hold block 0 of every row, then block 1 of every row, and so
    on (``quant.QMatrix.interleaved``): Q8_0 blocks as they are, Q4_0 blocks as the ``rows`` scales then the
    ``rows`` x 16 nibble bytes, so that one wide load takes every row's nibbles (``_q4_group_isums``).

    Measured on 59.5 MB Q8_0 matrices (2 threads, ``benchmarks/kernel_layouts.py``), one row at a time reads at the
    DRAM bandwidth up to 11,264 columns and at 80% at 14,336: its 14 KB activation and the 15 KB row streamed between
    two uses of an activation line overflow the 32 KB L1 cache; four interleaved rows read at 95%. Each
    row's accumulator takes the same integer lanes and the same float operations, block by block, as
    ``block_dot_for``'s, so the results are its bit for bit."""
    if isa not in INT8_DOTS:
        raise ValueError(f"unknown integer-dot instruction set {isa!r}; choose one of {INT8_DOTS}")
    q4 = block_bytes == Q4_BLOCK_BYTES

    @intrinsic
    def dot_rows(typingctx, w, w_offset, xq, xd, n_blocks, y, y_offset):
        sig = types.void(w, types.intp, xq, xd, types.intp, y, types.intp)

        def codegen(context, builder, signature, args):
            w_ty, _, xq_ty, xd_ty, _, y_ty, _ = signature.args
            w_arr, off, xq_arr, xd_arr, nb, y_arr, y_off = args
            group = _byte_ptr(context, builder, w_ty, w_arr, off)

            def body(b, acc):
                x8, x_scale = _activation_block(context, builder, xq_ty, xq_arr, xd_ty, xd_arr, b)
                first = builder.gep(group, [builder.mul(b, ir.Constant(_I64, block_bytes * rows))])
                if not q4:
                    blocks = [builder.gep(first, [ir.Constant(_I64, block_bytes * r)]) for r in range(rows)]
                    parts = [_block_part(builder, blk, x8, x_scale, block_bytes, isa) for blk in blocks]
                    return builder.fadd(acc, _concat(builder, parts), flags=_FAST)
                isums = _q4_group_isums(builder, builder.gep(first, [ir.Constant(_I64, 2 * rows)]), x8, isa, rows)
                scale_vec = _group_scales(builder, first, x_scale, rows)
                part = builder.fmul(builder.sitofp(isums, _vec(_F32, 8 * rows)), scale_vec, flags=_FAST)
                return builder.fadd(acc, part, flags=_FAST)

            acc = _counted_loop(builder, nb, body, _const_vec(_F32, 8 * rows, 0.0))
            for r in range(rows):
                out = _elem_ptr(context, builder, y_ty, y_arr, builder.add(y_off, ir.Constant(_I64, r)), _F32)
                builder.store(_hsum8(builder, _lanes(builder, acc, range(8 * r, 8 * r + 8))), out)
            return context.get_dummy_value()

        return sig, codegen

    return dot_rows


def _make_block_axpy(block_bytes: int):
    weights = _WEIGHTS[block_bytes]

    @intrinsic
    def block_axpy(typingctx, w, w_offset, coef, y, n_blocks):
        sig = types.void(w, types.intp, types.float32, y, types.intp)

        def codegen(context, builder, signature, args):
            w_ty, _, _, y_ty, _ = signature.args
            w_arr, off, c, y_arr, nb = args
            row = _byte_ptr(context, builder, w_ty, w_arr, off)

            def body(b, _):
                blk = builder.gep(row, [builder.mul(b, ir.Constant(_I64, block_bytes))])
                a = _splat(builder, builder.fmul(c, _block_scale(builder, blk)), 32)
                # through int16, not bytes straight to floats: the direct conversion made the engine's dense Q8_0 and
                # Q4_0 FFN 15-55% slower inside the fused decode step (notebook 06, three runs), for the same values
                w_f = builder.sitofp(builder.sext(weights(builder, blk), _vec(_I16, 32)), _vec(_F32, 32))
                y_ptr = builder.bitcast(
                    _elem_ptr(context, builder, y_ty, y_arr, builder.mul(b, ir.Constant(_I64, BLOCK)), _F32),
                    _vec(_F32, 32).as_pointer(),
                )
                y_new = builder.fadd(builder.load(y_ptr, align=4), builder.fmul(a, w_f, flags=_FAST), flags=_FAST)
                builder.store(y_new, y_ptr, align=4)
                return None

            _counted_loop(builder, nb, body)
            return context.get_dummy_value()

        return sig, codegen

    return block_axpy


F32_LANES = 32  # f32_dot's accumulator: lane l sums elements l, l + 32, l + 64, ...


@intrinsic
def f32_dot(typingctx, a, a_offset, b, n):
    """``a``'s float32 values from byte ``a_offset`` (any C-contiguous array: a uint8 row or float32 values) dotted
    with float32 ``b[:n]``, in an order fixed here: a <32 x float> accumulator whose lane l sums elements l, l + 32,
    ...; its lanes added 32 -> 16 -> 8 -> 1; the n % 32 tail added last, one by one. Numba's own loop would need
    reassociation to vectorise, and under it LLVM picks the order anew wherever the kernel is compiled or inlined,
    so two copies of one kernel (fresh and from Numba's cache) rounded differently."""
    if not (isinstance(a, types.Array) and isinstance(b, types.Array) and a.layout == "C" and b.layout == "C"):
        return None  # a typing error: the pointers below assume contiguous data
    if b.dtype != types.float32:
        return None
    sig = types.float32(a, types.intp, b, types.intp)

    def codegen(context, builder, signature, args):
        a_ty, _, b_ty, _ = signature.args
        a_arr, off, b_arr, n = args
        a_ptr = builder.bitcast(_byte_ptr(context, builder, a_ty, a_arr, off), _F32.as_pointer())
        b_ptr = _elem_ptr(context, builder, b_ty, b_arr, ir.Constant(_I64, 0), _F32)
        lanes = ir.Constant(_I64, F32_LANES)
        chunks = builder.sdiv(n, lanes)

        def load(ptr, i, k):
            return builder.load(builder.bitcast(builder.gep(ptr, [i]), _vec(_F32, k).as_pointer()), align=4)

        def chunk(c, acc):
            i = builder.mul(c, lanes)
            prod = builder.fmul(load(a_ptr, i, F32_LANES), load(b_ptr, i, F32_LANES), flags=_FAST)
            return builder.fadd(acc, prod, flags=_FAST)

        acc = _counted_loop(builder, chunks, chunk, _const_vec(_F32, F32_LANES, 0.0))
        s16 = builder.fadd(_lanes(builder, acc, range(16)), _lanes(builder, acc, range(16, 32)), flags=_FAST)
        total = _hsum8(builder, builder.fadd(_lanes(builder, s16, range(8)), _lanes(builder, s16, range(8, 16))))
        start = builder.mul(chunks, lanes)

        def one(t, acc):
            j = builder.add(start, t)
            prod = builder.fmul(
                builder.load(builder.gep(a_ptr, [j])), builder.load(builder.gep(b_ptr, [j])), flags=_FAST
            )
            return builder.fadd(acc, prod, flags=_FAST)

        return _counted_loop(builder, builder.sub(n, start), one, total)

    return sig, codegen


q8_dot = block_dot_for(Q8_BLOCK_BYTES, INT8_DOT)
q8_dot.__doc__ = "q8_dot(w_u8, byte_offset, xq, xd, n_blocks) -> float32: Q8_0 row . Q8_0 activation."
q4_dot = block_dot_for(Q4_BLOCK_BYTES, INT8_DOT)
q4_dot.__doc__ = "q4_dot(w_u8, byte_offset, xq, xd, n_blocks) -> float32: Q4_0 row . Q8_0 activation."
INTERLEAVE = 4  # rows an interleaved Q matrix holds per stored row (quant.interleave); 2 read at 90%, 8 no faster
q8_dot_rows = interleaved_dot_for(Q8_BLOCK_BYTES, INT8_DOT, INTERLEAVE)
q8_dot_rows.__doc__ = "q8_dot_rows(w_u8, byte_offset, xq, xd, n_blocks, y, y_offset): INTERLEAVE Q8_0 rows . x."
q4_dot_rows = interleaved_dot_for(Q4_BLOCK_BYTES, INT8_DOT, INTERLEAVE)
q4_dot_rows.__doc__ = "q4_dot_rows(w_u8, byte_offset, xq, xd, n_blocks, y, y_offset): INTERLEAVE Q4_0 rows . x."
q8_axpy = _make_block_axpy(Q8_BLOCK_BYTES)
q8_axpy.__doc__ = "q8_axpy(w_u8, byte_offset, coef, y, n_blocks): y[:32 n_blocks] += coef * dequantised Q8_0 row."
q4_axpy = _make_block_axpy(Q4_BLOCK_BYTES)
q4_axpy.__doc__ = "q4_axpy(w_u8, byte_offset, coef, y, n_blocks): y[:32 n_blocks] += coef * dequantised Q4_0 row."


# LLVM's locality 2 is x86's prefetcht1: into L2 and L3, not L1, where the activation and the FFN's partial
# output of a 4096-wide layer already take most of 32 KB
LOCALITY = 2


@intrinsic
def prefetch(typingctx, arr, byte_offset):
    """Hint the hardware to start loading the cache line at ``byte_offset`` of ``arr`` (no effect on results).

    The sparse FFN reads one short bundle per active neuron at scattered addresses; the hardware
    prefetcher cannot guess the next one, so the kernel names it while it works on the current one.
    """
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        ptr = _byte_ptr(context, builder, signature.args[0], args[0], args[1])
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read, locality LOCALITY, data cache
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, LOCALITY), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# The time-stamp counter is a constant-rate, user-readable clock on x86-64; elsewhere (ARM's cycle
# counter may trap in user mode) the profile falls back to zeros and says so.
CYCLE_COUNTER_AVAILABLE = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def cycle_counter(typingctx):
    """The CPU's time-stamp counter (x86-64), for per-component timing inside a compiled decode step; 0 elsewhere."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        if not CYCLE_COUNTER_AVAILABLE:
            return ir.Constant(_I64, 0)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []), "llvm.readcyclecounter")
        return builder.call(fn, [])

    return sig, codegen
