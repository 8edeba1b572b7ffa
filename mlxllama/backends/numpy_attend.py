"""The two products of a query head's attention over the cache, as LLVM IR with the accumulators in registers (numba).

    qk(q, qoff, K, koff, T, Dh, out, ooff):  out[ooff + t] = q[qoff:qoff + Dh] . K[koff + t * Dh:][:Dh], t < T
    pv(p, poff, V, voff, T, Dh, out, ooff):  out[ooff + d] = sum_t p[poff + t] * V[voff + t * Dh + d], d < Dh

Arrays are C-contiguous and read flat from the offsets: float32, the keys or values also float16 bits (below). Both
take head sizes that are multiples of 32; the caller keeps plain loops for others. Written loops left numba's
accumulators in memory (a load and a store per element and key) and summed each key's dot product on its own:

  qk   eight keys at a time, one <8 x float> accumulator each over the head (eight independent chains hide the
       multiply-add latency), their eight totals gathered by pairwise adds into one vector, stored at once;
  pv   64 (else 32) output values at a time held in 8 (4) vector accumulators over every key.

Plain vector IR (llvm.fmuladd) that any CPU's LLVM backend compiles: fused multiply-adds where the CPU has them.
The sums run in another order than the loops', so results differ in the last bits (tests/test_decode_program.py).

A float16 cache (CacheSettings(kv_dtype="float16")) is read as its uint16 bits: K and V arrays of dtype uint16 are
widened 8 at a time in the IR (one vcvtph2ps with F16C); kv_view, put_row and wide give the compiled step's other
loops the same cache either way (numba picks each by type at compile time). The program takes such caches only
where half-precision conversion is native (HALF_NATIVE: x86 with F16C, arm64), else steps op by op.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import carray, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .qmatvec import _NATIVE_HALF as HALF_NATIVE
from .qmatvec import _block_sums, _hsum, _splat

_F32, _I16, _HALF = ir.FloatType(), ir.IntType(16), ir.HalfType()
_V8 = ir.VectorType(_F32, 8)
_KV_F32, _KV_HALF = np.empty(0, np.float32), np.empty(0, np.uint16)  # a cache's element type, told by an empty array


def _fma(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8, [_V8, _V8, _V8]), "llvm.fmuladd.v8f32")
    return builder.call(fn, [a, b, c])


def _load8(builder, base, i):
    """8 consecutive values as <8 x float>: float32, or float16 bits (i16) widened."""
    if base.type.pointee == _I16:
        v = builder.load(builder.bitcast(builder.gep(base, [i]), ir.VectorType(_I16, 8).as_pointer()), align=2)
        return builder.fpext(builder.bitcast(v, ir.VectorType(_HALF, 8)), _V8)
    return builder.load(builder.bitcast(builder.gep(base, [i]), _V8.as_pointer()), align=4)


def _operands(context, builder, sig, args):
    """qk's or pv's arguments as (a, b, out) pointers at their offsets, T, Dh."""
    a_, aoff, b_, boff, T, Dh, o_, ooff = args

    def data(i, arr, off):
        return builder.gep(context.make_array(sig.args[i])(context, builder, arr).data, [off])

    return data(0, a_, aoff), data(2, b_, boff), data(6, o_, ooff), T, Dh


def _dot_keys(builder, q, k, n: int, Dh, idx):
    """n <8 x float> accumulators: keys k, k + Dh, ... (n of them) against q, over the head in steps of 8."""
    zero = ir.Constant(_V8, None)
    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(n)]
    with cgutils.for_range(builder, builder.udiv(Dh, ir.Constant(idx, 8))) as loop:
        d = builder.mul(loop.index, ir.Constant(idx, 8))
        qv = _load8(builder, q, d)
        for j in range(n):
            kv = _load8(builder, k, builder.add(d, builder.mul(Dh, ir.Constant(idx, j))))
            builder.store(_fma(builder, qv, kv, builder.load(accs[j])), accs[j])
    return [builder.load(a) for a in accs]


def _qk_ir(context, builder, sig, args):
    q, k, out, T, Dh = _operands(context, builder, sig, args)
    idx = T.type
    eight = ir.Constant(idx, 8)
    with cgutils.for_range(builder, builder.udiv(T, eight)) as loop:
        t = builder.mul(loop.index, eight)
        accs = _dot_keys(builder, q, builder.gep(k, [builder.mul(t, Dh)]), 8, Dh, idx)
        builder.store(_block_sums(builder, accs), builder.bitcast(builder.gep(out, [t]), _V8.as_pointer()), align=4)
    last = builder.mul(builder.udiv(T, eight), eight)
    with cgutils.for_range_slice(builder, last, T, ir.Constant(idx, 1)) as (t, _):
        (acc,) = _dot_keys(builder, q, builder.gep(k, [builder.mul(t, Dh)]), 1, Dh, idx)
        builder.store(_hsum(builder, acc, 8), builder.gep(out, [t]))
    return context.get_dummy_value()


def _pv_span(builder, p, v, out, d0, n: int, T, Dh, idx):
    """out[d0:d0 + 8n] = sum_t p[t] * v[t * Dh + d0:][:8n], in n vector accumulators."""
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8, None)) for _ in range(n)]
    with cgutils.for_range(builder, T) as loop:
        t = loop.index
        pt = _splat(builder, builder.load(builder.gep(p, [t])), 8)
        row = builder.add(builder.mul(t, Dh), d0)
        for j in range(n):
            vv = _load8(builder, v, builder.add(row, ir.Constant(idx, 8 * j)))
            builder.store(_fma(builder, pt, vv, builder.load(accs[j])), accs[j])
    for j in range(n):
        dst = builder.gep(out, [builder.add(d0, ir.Constant(idx, 8 * j))])
        builder.store(builder.load(accs[j]), builder.bitcast(dst, _V8.as_pointer()), align=4)


def _pv_ir(context, builder, sig, args):
    p, v, out, T, Dh = _operands(context, builder, sig, args)
    idx = T.type
    wide = builder.icmp_unsigned("==", builder.urem(Dh, ir.Constant(idx, 64)), ir.Constant(idx, 0))
    with builder.if_else(wide) as (then, otherwise):
        with then:
            with cgutils.for_range(builder, builder.udiv(Dh, ir.Constant(idx, 64))) as loop:
                _pv_span(builder, p, v, out, builder.mul(loop.index, ir.Constant(idx, 64)), 8, T, Dh, idx)
        with otherwise:
            with cgutils.for_range(builder, builder.udiv(Dh, ir.Constant(idx, 32))) as loop:
                _pv_span(builder, p, v, out, builder.mul(loop.index, ir.Constant(idx, 32)), 4, T, Dh, idx)
    return context.get_dummy_value()


def _signature(a, b, out):
    for x, kinds in ((a, (types.float32,)), (b, (types.float32, types.uint16)), (out, (types.float32,))):
        if not (isinstance(x, types.Array) and x.dtype in kinds and x.layout == "C"):
            raise TypeError("qk/pv take C-contiguous float32 arrays (the keys or values: float32 or float16 bits)")
    return types.none(a, types.intp, b, types.intp, types.intp, types.intp, out, types.intp)


@intrinsic
def qk(typingctx, q, qoff, K, koff, T, Dh, out, ooff):
    return _signature(q, K, out), _qk_ir


@intrinsic
def pv(typingctx, p, poff, V, voff, T, Dh, out, ooff):
    return _signature(p, V, out), _pv_ir


@intrinsic
def _half_bits(typingctx, x):
    """float32 -> the float16 nearest (ties to even, as numpy's astype), as its uint16 bits."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], _HALF), _I16)

    return types.uint16(types.float32), codegen


@intrinsic
def _half_value(typingctx, h):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], _HALF), _F32)

    return types.float32(types.uint16), codegen


@intrinsic
def pointer(typingctx, address, like):
    """The address (int64 or uint64) as a pointer to like's dtype (like: an empty array), for numba.carray."""
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


def kv_view(address, dims_kv, dims_dh, cap):
    """A cache layer's [1, KV, cap, Dh] buffer at `address`: float32, or float16 bits (uint16) where the address
    is a uint64 (the program marks a float16 cache's addresses so)."""


@overload(kv_view)
def _kv_view(address, dims_kv, dims_dh, cap):
    like = _KV_HALF if address == types.uint64 else _KV_F32

    def impl(address, dims_kv, dims_dh, cap):
        return carray(pointer(address, like), (1, dims_kv, cap, dims_dh))

    return impl


def put_row(dst, src):
    """dst[:] = src (float32), rounded to float16 bits where dst holds them."""


@overload(put_row)
def _put_row(dst, src):
    if dst.dtype == types.uint16:
        def impl(dst, src):
            for d in range(src.shape[0]):
                dst[d] = _half_bits(src[d])
    else:
        def impl(dst, src):
            dst[:] = src
    return impl


def wide(x):
    """A cache element as float32."""


@overload(wide)
def _wide(x):
    if x == types.uint16:
        return lambda x: _half_value(x)
    return lambda x: x
