"""The two products of a K/V head's attention over the cache, as LLVM IR with the accumulators in registers (numba),
for the `rows` query rows that share the head (its query heads):

    qk(q, qoff, K, koff, T, Dh, out, ooff, rows, ostride):
        out[ooff + r * ostride + t] = q[qoff + r * Dh:][:Dh] . K[koff + t * Dh:][:Dh],   t < T, r < rows
    pv(p, poff, V, voff, T, Dh, out, ooff, rows, pstride):
        out[ooff + r * Dh + d] = sum_t p[poff + r * pstride + t] * V[voff + t * Dh + d],  d < Dh, r < rows

Arrays are C-contiguous and read flat from the offsets: float32, the keys or values also float16 bits (below). Both
take head sizes that are multiples of 32; the caller keeps plain loops for others. Written loops left numba's
accumulators in memory (a load and a store per element and key) and summed each key's dot product on its own:

  qk   row by row, eight keys at a time, one <8 x float> accumulator each over the head (eight independent
       chains hide the multiply-add latency), their eight totals gathered by pairwise adds into one vector;
  pv   rows four at a time, each value vector read (and, in float16, widened) once for all of them: for 1, 2, 3
       and 4 rows, 64 (else 32), 32, 32 and 16 output values a pass over the keys, in vector accumulators.

Sharing pays in pv, not in qk: SmolLM2's three query heads over 300 float16 keys (one Zen 3 core), pv 2.53 ->
1.20 us, while qk over three rows sharing each key (2 or 4 keys a pass) took 2.6-3.0 us against 2.0 row by row.
Each (row, value) sums over the keys in the same order whatever the number of rows: the bits of a call a row.
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
from .qmatvec import _hsum, _splat

_F32, _I16, _HALF = ir.FloatType(), ir.IntType(16), ir.HalfType()
_V8 = ir.VectorType(_F32, 8)
_IX8 = ir.VectorType(ir.IntType(32), 8)  # shuffle masks of two <8 x float>
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


_GROUP = 4  # rows of p sharing each value vector read
_SPANS = {1: 8, 2: 4, 3: 4, 4: 2}  # value vectors (8 floats) a pass over the keys takes, by rows: at most 16
# registers for the accumulators, the rows' broadcast p and a value vector


def _operands(context, builder, sig, args):
    """qk's or pv's arguments as (a, b, out) pointers at their offsets, T, Dh, rows, stride."""
    a_, aoff, b_, boff, T, Dh, o_, ooff, rows, stride = args

    def data(i, arr, off):
        return builder.gep(context.make_array(sig.args[i])(context, builder, arr).data, [off])

    return data(0, a_, aoff), data(2, b_, boff), data(6, o_, ooff), T, Dh, rows, stride


def _by_groups(builder, rows, emit) -> None:
    """emit(g, R) for each group of R rows (R <= _GROUP, compile-time) starting at row g (run-time)."""
    idx = rows.type
    with cgutils.for_range(builder, builder.udiv(builder.add(rows, ir.Constant(idx, _GROUP - 1)),
                                                 ir.Constant(idx, _GROUP))) as loop:
        g = builder.mul(loop.index, ir.Constant(idx, _GROUP))
        left = builder.sub(rows, g)
        for R in range(1, _GROUP + 1):
            exact = ir.Constant(idx, R)
            match = builder.icmp_unsigned(">=", left, exact) if R == _GROUP else builder.icmp_unsigned("==", left,
                                                                                                        exact)
            with builder.if_then(match):
                emit(g, R)


def _hadd(builder, u, v):
    """Pairwise sums of two <8 x float> within each 128-bit half, as vhaddps: [u0+u1, u2+u3, v0+v1, v2+v3 | ...]."""
    lo = ir.Constant(_IX8, [0, 2, 8, 10, 4, 6, 12, 14])
    hi = ir.Constant(_IX8, [1, 3, 9, 11, 5, 7, 13, 15])
    return builder.fadd(builder.shuffle_vector(u, v, lo), builder.shuffle_vector(u, v, hi))


def _block_sums(builder, dots):
    """Eight <8 x float> partial sums -> one vector whose lane k is dots[k]'s total (pairwise adds, as vhaddps,
    then the two 128-bit halves)."""
    h = [_hadd(builder, dots[k], dots[k + 1]) for k in range(0, 8, 2)]
    q0, q1 = _hadd(builder, h[0], h[1]), _hadd(builder, h[2], h[3])
    lo = builder.shuffle_vector(q0, q1, ir.Constant(_IX8, [0, 1, 2, 3, 8, 9, 10, 11]))
    hi = builder.shuffle_vector(q0, q1, ir.Constant(_IX8, [4, 5, 6, 7, 12, 13, 14, 15]))
    return builder.fadd(lo, hi)


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
    q, k, out, T, Dh, rows, stride = _operands(context, builder, sig, args)
    idx, eight = T.type, ir.Constant(T.type, 8)
    with cgutils.for_range(builder, rows) as each:
        qr, o = builder.gep(q, [builder.mul(each.index, Dh)]), builder.gep(out, [builder.mul(each.index, stride)])
        with cgutils.for_range(builder, builder.udiv(T, eight)) as loop:
            t = builder.mul(loop.index, eight)
            accs = _dot_keys(builder, qr, builder.gep(k, [builder.mul(t, Dh)]), 8, Dh, idx)
            builder.store(_block_sums(builder, accs), builder.bitcast(builder.gep(o, [t]), _V8.as_pointer()),
                          align=4)
        last = builder.mul(builder.udiv(T, eight), eight)
        with cgutils.for_range_slice(builder, last, T, ir.Constant(idx, 1)) as (t, _):
            (acc,) = _dot_keys(builder, qr, builder.gep(k, [builder.mul(t, Dh)]), 1, Dh, idx)
            builder.store(_hsum(builder, acc, 8), builder.gep(o, [t]))
    return context.get_dummy_value()


def _pv_span(builder, ps: list, v, outs: list, d0, n: int, T, Dh, idx):
    """outs[r][d0:d0 + 8n] = sum_t ps[r][t] * v[t * Dh + d0:][:8n], in n vector accumulators a row."""
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V8, None)) for _ in range(n)] for _ in ps]
    with cgutils.for_range(builder, T) as loop:
        t = loop.index
        pts = [_splat(builder, builder.load(builder.gep(p, [t])), 8) for p in ps]
        row = builder.add(builder.mul(t, Dh), d0)
        for j in range(n):
            vv = _load8(builder, v, builder.add(row, ir.Constant(idx, 8 * j)))
            for pt, a in zip(pts, accs):
                builder.store(_fma(builder, pt, vv, builder.load(a[j])), a[j])
    for o, a in zip(outs, accs):
        for j in range(n):
            dst = builder.gep(o, [builder.add(d0, ir.Constant(idx, 8 * j))])
            builder.store(builder.load(a[j]), builder.bitcast(dst, _V8.as_pointer()), align=4)


def _pv_rows(builder, p, v, out, T, Dh, stride, R: int):
    """pv for R rows of p and out, over spans of the head as wide as R rows' accumulators allow (Dh % 32 == 0)."""
    idx = T.type
    ps = [builder.gep(p, [builder.mul(stride, ir.Constant(idx, r))]) for r in range(R)]
    outs = [builder.gep(out, [builder.mul(Dh, ir.Constant(idx, r))]) for r in range(R)]

    def spans(n: int):
        width = ir.Constant(idx, 8 * n)
        with cgutils.for_range(builder, builder.udiv(Dh, width)) as loop:
            _pv_span(builder, ps, v, outs, builder.mul(loop.index, width), n, T, Dh, idx)

    n = _SPANS[R]
    if n * 8 <= 32:
        spans(n)
        return
    wide = builder.icmp_unsigned("==", builder.urem(Dh, ir.Constant(idx, 8 * n)), ir.Constant(idx, 0))
    with builder.if_else(wide) as (then, otherwise):
        with then:
            spans(n)
        with otherwise:
            spans(4)


def _pv_ir(context, builder, sig, args):
    p, v, out, T, Dh, rows, stride = _operands(context, builder, sig, args)
    _by_groups(builder, rows, lambda g, R: _pv_rows(builder, builder.gep(p, [builder.mul(g, stride)]), v,
                                                    builder.gep(out, [builder.mul(g, Dh)]), T, Dh, stride, R))
    return context.get_dummy_value()


def _signature(a, b, out):
    for x, kinds in ((a, (types.float32,)), (b, (types.float32, types.uint16)), (out, (types.float32,))):
        if not (isinstance(x, types.Array) and x.dtype in kinds and x.layout == "C"):
            raise TypeError("qk/pv take C-contiguous float32 arrays (the keys or values: float32 or float16 bits)")
    return types.none(a, types.intp, b, types.intp, types.intp, types.intp, out, types.intp, types.intp, types.intp)


@intrinsic
def qk(typingctx, q, qoff, K, koff, T, Dh, out, ooff, rows, ostride):
    return _signature(q, K, out), _qk_ir


@intrinsic
def pv(typingctx, p, poff, V, voff, T, Dh, out, ooff, rows, pstride):
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
