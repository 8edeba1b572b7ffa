"""Fused products over MLX's packed 4-bit and 8-bit affine weights, read as stored (numba).

A weight stays in the loader's layout: uint32 words [out, in * bits / 32] (viewed as bytes: with 4 bits, byte k of
a row holds inputs 2k in its low nibble and 2k + 1 in its high one), scales and biases [out, in / group] in
float16 or float32. Nothing is widened at load; resident memory is the file's (symmetric biases, as GGUF's Q4_0
and Q8_0 have, are formed from the scales instead of kept).

A product with a few rows (decode, small batches) never forms float weights. Each input row is rounded to int16
per block of 32 (x ~ dx_b * xq, |xq| <= 32767: an error under a step of 1/32767 of the block's largest value), then
    y[o] = sum_b scale[o, g(b)] * dx_b * (q[o, b] . xq_b) + sum_g bias[o, g] * sum(x_g)
with each block's 32-term integer dot product in 16 int32 lanes (x86: one vpmaddwd) and the scaled results summed
in 16 float lanes per output row. The vector code is generic LLVM IR (_row_dot), compiled by numba for the CPU it
runs on, so no instruction set is assumed at install. Numba's scalar integer arithmetic widens to int64 and its
SLP vectorizer is off; spelling the block product as LLVM vectors is what makes it SIMD (about ten times the best
plain-numba loop, see benchmarks/README.md).

Many rows (prefill) use float32 products instead: a block of output rows is dequantized (dequantize_rows, the
exact float32 weights) into a cache-sized buffer and multiplied by BLAS.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

BITS = (4, 8)
_BLOCK = 32  # inputs per activation scale; every MLX group size (32, 64, 128) is a multiple

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vec(t, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _half_to_float(builder, h):
    """IR: float16 bits (i16) -> float32, exact (normal: exponent rebiased; subnormal: mantissa * 2**-24)."""
    h = builder.zext(h, _I32)
    sign = builder.shl(builder.and_(h, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    mag = builder.and_(h, ir.Constant(_I32, 0x7FFF))
    normal = builder.bitcast(builder.or_(sign, builder.add(builder.shl(mag, ir.Constant(_I32, 13)),
                                                           ir.Constant(_I32, 112 << 23))), _F32)
    sub = builder.fmul(builder.uitofp(mag, _F32), ir.Constant(_F32, 2.0 ** -24))
    sub = builder.select(builder.icmp_unsigned("!=", sign, ir.Constant(_I32, 0)),
                         builder.fsub(ir.Constant(_F32, -0.0), sub), sub)
    return builder.select(builder.icmp_unsigned("<", mag, ir.Constant(_I32, 0x400)), sub, normal)


def _native_half() -> bool:
    """Whether LLVM converts float16 to float32 in one instruction here (x86 F16C, any arm64); elsewhere it
    would call a runtime helper, so the conversion is spelled in integer operations instead."""
    import platform

    import llvmlite.binding as llvm

    try:
        return bool(llvm.get_host_cpu_features().get("f16c")) or platform.machine().lower() in ("arm64", "aarch64")
    except RuntimeError:
        return False


_NATIVE_HALF = _native_half()


def _load_scale(builder, ptr, half: bool):
    v = builder.load(ptr)
    if not half:
        return v
    if _NATIVE_HALF:
        return builder.fpext(builder.bitcast(v, ir.HalfType()), _F32)
    return _half_to_float(builder, v)


def _row_dot(bits: int):
    """An intrinsic computing one output of the fused product (see the module doc):
        sum_b scales[g(b)] * dx[b] * (codes of block b . xq[32 b: 32 b + 32]) + sum_g biases[g] * xsum[g]
    over blocks b < nblk, g(b) = b >> shift. The arrays are passed whole with the element offset of the row
    (w: bytes of the codes; scales and biases: float32, or float16 as uint16 bits). With bfac != 0 the biases
    are bfac * biases (a symmetric weight passes its scales as biases). xq is int16, for 4 bits
    permuted per block (16 even inputs, then 16 odd ones, matching the low and high nibbles)."""

    @intrinsic
    def row_dot(typingctx, w, woff, xq, xoff, dx, dxoff, scales, biases, soff, bfac, xsum, xsoff, nblk, shift):
        sig = types.float32(w, types.intp, xq, types.intp, dx, types.intp, scales, biases, types.intp,
                            types.float32, xsum, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            (w_, woff_, xq_, xoff_, dx_, dxoff_, sc_, bi_, soff_, bfac_, xs_, xsoff_, nblk_, shift_) = args
            at = signature.args

            def base(i, arg, off):
                return builder.gep(context.make_array(at[i])(context, builder, arg).data, [off])

            half = at[6].dtype == types.uint16
            wrow, xrow, dxrow = base(0, w_, woff_), base(2, xq_, xoff_), base(4, dx_, dxoff_)
            srow, brow, xsrow = base(6, sc_, soff_), base(7, bi_, soff_), base(10, xs_, xsoff_)
            idx = woff_.type

            def term(b):
                """<16 x float>: block b's integer dot product in 16 int32 lanes, times scale * dx."""
                wp = builder.gep(wrow, [builder.mul(b, ir.Constant(idx, 32 * bits // 8))])
                if bits == 4:
                    packed = builder.load(builder.bitcast(wp, _vec(_I8, 16).as_pointer()), align=1)
                    lo = builder.and_(packed, ir.Constant(_vec(_I8, 16), [15] * 16))
                    hi = builder.lshr(packed, ir.Constant(_vec(_I8, 16), [4] * 16))
                    codes = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 32), list(range(32))))
                else:
                    codes = builder.load(builder.bitcast(wp, _vec(_I8, 32).as_pointer()), align=1)
                xb = builder.gep(xrow, [builder.mul(b, ir.Constant(idx, 32))])
                xv = builder.load(builder.bitcast(xb, _vec(_I16, 32).as_pointer()), align=2)
                v32 = _vec(_I32, 32)
                m = builder.mul(builder.zext(codes, v32), builder.sext(xv, v32))
                # adjacent pairs summed: the form of x86's vpmaddwd (vpdpwssd with VNNI)
                p = builder.add(builder.shuffle_vector(m, m, ir.Constant(_vec(_I32, 16), list(range(0, 32, 2)))),
                                builder.shuffle_vector(m, m, ir.Constant(_vec(_I32, 16), list(range(1, 32, 2)))))
                scale = _load_scale(builder, builder.gep(srow, [builder.ashr(b, shift_)]), half)
                f = builder.fmul(builder.load(builder.gep(dxrow, [b])), scale, flags=("fast",))
                fv = builder.insert_element(ir.Constant(_vec(_F32, 16), None), f, ir.Constant(_I32, 0))
                fv = builder.shuffle_vector(fv, fv, ir.Constant(_vec(_I32, 16), [0] * 16))
                return builder.fmul(builder.sitofp(p, _vec(_F32, 16)), fv, flags=("fast",))

            def add_to(acc, b):
                builder.store(builder.fadd(builder.load(acc), term(b), flags=("fast",)), acc)

            # two accumulators: consecutive blocks do not wait on each other's addition
            acc0 = cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 16), None))
            acc1 = cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 16), None))
            one = ir.Constant(idx, 1)
            with cgutils.for_range(builder, builder.ashr(nblk_, one)) as loop:
                b = builder.shl(loop.index, one)
                add_to(acc0, b)
                add_to(acc1, builder.add(b, one))
            with builder.if_then(builder.icmp_unsigned("!=", builder.and_(nblk_, one), ir.Constant(idx, 0))):
                add_to(acc0, builder.sub(nblk_, one))
            acc = cgutils.alloca_once_value(builder, builder.fadd(builder.load(acc0), builder.load(acc1),
                                                                  flags=("fast",)))
            bacc = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
            with cgutils.for_range(builder, builder.ashr(nblk_, shift_)) as loop:
                g = loop.index
                bias = _load_scale(builder, builder.gep(brow, [g]), half)
                bias = builder.select(builder.fcmp_ordered("!=", bfac_, ir.Constant(_F32, 0.0)),
                                      builder.fmul(bias, bfac_), bias)
                t = builder.fmul(bias, builder.load(builder.gep(xsrow, [g])), flags=("fast",))
                builder.store(builder.fadd(builder.load(bacc), t, flags=("fast",)), bacc)
            v, n = builder.load(acc), 16
            while n > 1:  # pairwise horizontal sum
                n //= 2
                a = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n))))
                c = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n, 2 * n))))
                v = builder.fadd(a, c, flags=("fast",))
            return builder.fadd(builder.extract_element(v, ir.Constant(_I32, 0)), builder.load(bacc),
                                flags=("fast",))

        return sig, codegen

    return row_dot


_dot4 = _row_dot(4)
_dot8 = _row_dot(8)


@intrinsic
def _half_bits(typingctx, h):
    """float16 bits (uint16) -> float32, exact, in integer operations (see _half_to_float)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return _half_to_float(builder, args[0])

    return sig, codegen


def _widen(s):
    """A scale or bias as float32: float32 as is, float16 (held as its uint16 bits) converted exactly."""


@overload(_widen, inline="always")
def _widen_impl(s):
    if isinstance(s, types.Float):
        return lambda s: np.float32(s)
    return lambda s: _half_bits(s)


@njit(cache=True, nogil=True, fastmath=True)
def quantize_input(x2, bits, group_size, xq, dx, xsum):
    """x2 [rows, in] float32 -> xq int16 [rows, in] (permuted per block of 32 for 4 bits), dx [rows, in / 32]
    (xq * dx ~ x), xsum [rows, in / group_size] (sums of x per weight group)."""
    rows, n = x2.shape
    for r in range(rows):
        for b in range(n // _BLOCK):
            s = b * _BLOCK
            m = np.float32(0)
            for i in range(_BLOCK):
                m = max(m, abs(x2[r, s + i]))
            d = m / np.float32(32767)
            inv = np.float32(32767) / m if m > 0 else np.float32(0)
            dx[r, b] = d
            for i in range(_BLOCK):
                j = s + (i // 2 + 16 * (i % 2) if bits == 4 else i)
                xq[r, j] = np.int16(min(max(np.rint(x2[r, s + i] * inv), -32767), 32767))
        for g in range(n // group_size):
            t = np.float32(0)
            for i in range(g * group_size, (g + 1) * group_size):
                t += x2[r, i]
            xsum[r, g] = t


@njit(cache=True, nogil=True, fastmath=True)
def _rows(w, scales, biases, bfac, bits, group_size, xq, dx, xsum, y, o0, o1):
    """y[:, o0:o1] for the quantized input (quantize_input); w is the weight's bytes [out, in * bits / 8]."""
    rows, n = xq.shape
    nblk = n // _BLOCK
    shift = {32: 0, 64: 1, 128: 2}[group_size]
    ngroups = scales.shape[1]
    for o in range(o0, o1):
        for r in range(rows):
            if bits == 4:
                y[r, o] = _dot4(w, o * w.shape[1], xq, r * n, dx, r * nblk, scales, biases, o * ngroups, bfac,
                                xsum, r * ngroups, nblk, shift)
            else:
                y[r, o] = _dot8(w, o * w.shape[1], xq, r * n, dx, r * nblk, scales, biases, o * ngroups, bfac,
                                xsum, r * ngroups, nblk, shift)


def _dequantize_row(bits: int):
    """An intrinsic writing one row as float32: out[ooff + i] = scale * q_i + bias, rounded after the product
    and after the sum (no fused multiply-add, no fast-math), as numpy forms it. Arguments as _row_dot's."""

    @intrinsic
    def dequantize_row(typingctx, w, woff, out, ooff, scales, biases, soff, bfac, nblk, shift):
        sig = types.none(w, types.intp, out, types.intp, scales, biases, types.intp, types.float32, types.intp,
                         types.intp)

        def codegen(context, builder, signature, args):
            (w_, woff_, out_, ooff_, sc_, bi_, soff_, bfac_, nblk_, shift_) = args
            at = signature.args

            def base(i, arg, off):
                return builder.gep(context.make_array(at[i])(context, builder, arg).data, [off])

            half = at[4].dtype == types.uint16
            wrow, orow, srow, brow = base(0, w_, woff_), base(2, out_, ooff_), base(4, sc_, soff_), base(5, bi_, soff_)
            idx = woff_.type
            with cgutils.for_range(builder, nblk_) as loop:
                b = loop.index
                wp = builder.gep(wrow, [builder.mul(b, ir.Constant(idx, 32 * bits // 8))])
                if bits == 4:
                    packed = builder.load(builder.bitcast(wp, _vec(_I8, 16).as_pointer()), align=1)
                    lo = builder.and_(packed, ir.Constant(_vec(_I8, 16), [15] * 16))
                    hi = builder.lshr(packed, ir.Constant(_vec(_I8, 16), [4] * 16))
                    order = [j // 2 + 16 * (j % 2) for j in range(32)]  # byte k: inputs 2k (low), 2k + 1 (high)
                    codes = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 32), order))
                else:
                    codes = builder.load(builder.bitcast(wp, _vec(_I8, 32).as_pointer()), align=1)
                g = builder.ashr(b, shift_)
                scale = _load_scale(builder, builder.gep(srow, [g]), half)
                bias = _load_scale(builder, builder.gep(brow, [g]), half)
                bias = builder.select(builder.fcmp_ordered("!=", bfac_, ir.Constant(_F32, 0.0)),
                                      builder.fmul(bias, bfac_), bias)
                splat = []
                for v in (scale, bias):
                    e = builder.insert_element(ir.Constant(_vec(_F32, 32), None), v, ir.Constant(_I32, 0))
                    splat.append(builder.shuffle_vector(e, e, ir.Constant(_vec(_I32, 32), [0] * 32)))
                vals = builder.fadd(builder.fmul(builder.uitofp(codes, _vec(_F32, 32)), splat[0]), splat[1])
                op = builder.gep(orow, [builder.mul(b, ir.Constant(idx, 32))])
                builder.store(vals, builder.bitcast(op, _vec(_F32, 32).as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dequantize_row


_deq4 = _dequantize_row(4)
_deq8 = _dequantize_row(8)


@njit(cache=True, nogil=True)
def dequantize_rows(w, scales, biases, bfac, bits, group_size, o0, o1, out):
    """Rows o0..o1 of the weight as float32 into out [o1 - o0, in] (C order): the very weights quant.dequantize
    forms with float32 scales."""
    n = out.shape[1]
    shift = {32: 0, 64: 1, 128: 2}[group_size]
    ngroups = scales.shape[1]
    for o in range(o0, o1):
        if bits == 4:
            _deq4(w, o * w.shape[1], out, (o - o0) * n, scales, biases, o * ngroups, bfac, n // _BLOCK, shift)
        else:
            _deq8(w, o * w.shape[1], out, (o - o0) * n, scales, biases, o * ngroups, bfac, n // _BLOCK, shift)


class PackedLinear:
    """Same-input quantized projections fused by output rows, kept as stored: bytes [out, in * bits / 8] (a view
    of the uint32 words), scales and biases [out, in / group] (float32, or float16 held as uint16 bits). Where
    every bias is -2**(bits - 1) times its scale (GGUF's Q4_0 and Q8_0), the biases are not kept: the kernel
    forms them from the scales, and the weight is the file's bytes exactly. shape is (in, out), as numpy_ops'
    float32 matrices."""

    def __init__(self, parts: list):
        p0 = parts[0]
        self.group_size, self.bits = p0.group_size, p0.bits
        words = p0.weight if len(parts) == 1 else np.concatenate([p.weight for p in parts])
        self.words = np.ascontiguousarray(words, dtype=np.uint32)
        self.bytes = self.words.view(np.uint8)
        self.shape = (p0.shape[1], self.words.shape[0])
        dtype = np.result_type(*[p.scales.dtype for p in parts])
        self.scales = _rows_of([p.scales for p in parts], dtype)
        biases = _rows_of([p.biases for p in parts], dtype)
        factor = np.float32(-(1 << (self.bits - 1)))
        if np.array_equal(biases.astype(np.float32), factor * self.scales.astype(np.float32)):
            self.biases, self.bias_factor = None, factor
        else:
            self.biases, self.bias_factor = biases, np.float32(0)
        if dtype == np.float16:
            self.scales = self.scales.view(np.uint16)
            self.biases = None if self.biases is None else self.biases.view(np.uint16)

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.scales.nbytes + (0 if self.biases is None else self.biases.nbytes)

    def _args(self):
        biases = self.scales if self.biases is None else self.biases
        return self.bytes, self.scales, biases, self.bias_factor, self.bits, self.group_size

    def quantize_input(self, x2: np.ndarray):
        """What rows() takes for x2 [rows, in] float32 (C order)."""
        rows, n = x2.shape
        xq = np.empty((rows, n), np.int16)
        dx = np.empty((rows, n // _BLOCK), np.float32)
        xsum = np.empty((rows, n // self.group_size), np.float32)
        quantize_input(x2, self.bits, self.group_size, xq, dx, xsum)
        return xq, dx, xsum

    def rows(self, xin, out: np.ndarray, o0: int, o1: int) -> None:
        """out[:, o0:o1] = x @ W[o0:o1].T for xin = quantize_input(x); releases the GIL."""
        _rows(*self._args(), *xin, out, o0, o1)

    def dequantize(self, o0: int, o1: int, out: np.ndarray) -> np.ndarray:
        """Rows o0..o1 as float32 [o1 - o0, in] in out (C order); releases the GIL."""
        if not (out.flags.c_contiguous and out.dtype == np.float32 and out.shape == (o1 - o0, self.shape[0])):
            raise ValueError(f"dequantize needs a C-order float32 [{o1 - o0}, {self.shape[0]}] buffer")
        dequantize_rows(*self._args(), o0, o1, out)
        return out


def _rows_of(arrays: list, dtype) -> np.ndarray:
    arrays = [np.asarray(a, dtype) for a in arrays]
    return np.ascontiguousarray(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
