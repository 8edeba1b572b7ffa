"""Fused products over MLX's packed 4-bit and 8-bit affine weights, read as stored (numba).

A weight stays in the loader's layout: uint32 words [out, in * bits / 32] (viewed as bytes: with 4 bits, byte k of
a row holds inputs 2k in its low nibble and 2k + 1 in its high one), scales and biases [out, in / group] in
float16 or float32. Nothing is widened at load; resident memory is the file's (symmetric biases, as GGUF's Q4_0
and Q8_0 have, are formed from the scales instead of kept).

A product with up to a few dozen rows never forms float weights. Each input row is rounded per block of 32 to
int16 (default; x ~ dx_b * xq, |xq| <= 32767) or to int8 as llama.cpp's q8 blocks (|xq| <= 127,
MLXLLAMA_KERNEL_ACT=8), with s_b = dx_b * sum(xq_b) kept for the biases; then
    y[o] = sum_b scale[o, g(b)] * dx_b * (q[o, b] . xq_b) + bias[o, g(b)] * s_b
with each block's 32-term integer dot product in 8 int32 lanes and the scaled results summed in 8 float lanes.
R input rows (a tile: 4, 2 or 1) share each decoded weight block, so a batch of rows reads and decodes every
weight once per tile instead of once per row. A lone row (batch-1 decode) takes its blocks by eights (_octets):
the eight blocks' integer sums are gathered into one vector by pairwise adds, then scaled by the eight scale * dx
in one multiply-add and their bias terms in another, so the float work of a block is an eighth of the per-block
form's (4096 x 4096 4-bit, int16 inputs, one Zen 2 core: 13.0 -> 18.1 G weights/s, then 23 with the nibble
split kept on 16-bit words: _opaque_four).

The block product is LLVM IR written per instruction set (_DOTS), chosen at run time from the CPU's features
(llvmlite's host features), never at install:
  "vnni"     AVX-512 VNNI or AVX-VNNI: vpdpbusd (int8 inputs: u8 x s8 summed by fours, exact) or two vpdpwssd.
  "avx2"     int8: vpmaddubsw (u8 x s8, pairs into int16: 4-bit codes cannot saturate it; 8-bit codes are
             recentred to q - 128 and multiplied with the sign trick, the bias taking 128 * scale) then vpmaddwd
             by ones. int16: two vpmaddwd, the same number of multiply instructions per block as int8's pair.
  "generic"  plain vector IR (products widened to int32) that any CPU's LLVM backend compiles.
MLXLLAMA_KERNEL_ISA=generic (or avx2, vnni) forces a path; one the CPU lacks falls back to the best it has, and a
path is used only after it computed a small product close to numpy's (kernel_isa). Each path and input width is
its own signature of the compiled functions, so numba's on-disk cache (cache=True) keeps them apart.

Accuracy: rounding x is at most half a step per element (max|x_b| / 254 with int8, / 65534 with int16), so each
output is within sum_b max|x_b| / (half step) * sum_{i in b} |w_i| (plus float32 sums) of the float32 product;
tests/test_qmatvec.py checks this bound on every path. On SmolLM2-135M Q4_1 (test_smollm2_logit_error), decode
logits differ from float32 mode's by at most 4e-4 of the largest logit with int16 inputs, and greedy tokens equal
the transformers reference; with int8 inputs by up to 7e-2 (activation outliers: a block's largest value is ~5.6x
its root mean square), and greedy tokens leave the reference after a few tokens on two of its five prompts. That
is why int16 is the default: on AVX2 it costs the same multiply instructions per block (benchmarks/README.md).

Unit tiles (int16 inputs): the multiples of 2 rows (4-bit weights) or 8 rows (8-bit) of a product run _utile
instead, up to 8 rows at a time (16-row tiles spilled registers and ran no faster than two of 8). A unit is the 32
bytes of codes of 64 inputs (4 bits) or 32 (8 bits), read as 16 words: each code position comes out by a shift and
a mask (no byte shuffles); the inputs are laid out to match (unit_order), a unit of every row side by side. One
input scale covers CHUNK = 128 inputs: the rounding step is the chunk's largest |x| / 65534 rather than the
block's. On SmolLM2, logits of an 18-row prefill differ from float32 mode's by 4.3e-4 of the largest logit (2.3e-4
with per-block scales; 256-input chunks gave 5e-4 and moved test_smollm2_logit_error past its 1e-3), every argmax
kept; tests/test_qmatvec.py checks the bound with the chunk's maximum. A chunk (four blocks) goes at a time
(_pairs_ir): each pair of rows' integer sums over it are gathered by pairwise adds into vectors of (row, block)
sums (4 bits: one of the pair's eight totals), scaled by scale * dx in one multiply-add each, and the row sums are
formed once per weight row instead of once per chunk (SmolLM2's shapes, one thread: 8 rows cost 5.45 -> 4.1
one-row products, 2 rows 2.0 -> 1.5; benchmarks/README.md).

Many rows (long prefill) may use float32 products instead: a block of output rows is dequantized (dequantize_rows,
the exact float32 weights) into a cache-sized buffer and multiplied by BLAS; numpy_ops picks by row count.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.np.numpy_support import from_dtype as numba_type
from numba.core import cgutils
from numba.extending import intrinsic

logger = logging.getLogger(__name__)

BITS = (4, 8)
ISAS = ("vnni", "avx2", "generic")
TILES = (4, 2, 1)  # input rows sharing one decoded weight block (8 measured no faster on AVX2: spills)
_BLOCK = 32  # inputs per activation scale; every MLX group size (32, 64, 128) is a multiple
_OUT_CHUNK = 64  # weight rows (~150 KB at 4096 inputs) kept in cache while every tile of input rows passes

_I1, _I8, _I16, _I32, _F32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


# float flags of the tile: fused multiply-adds allowed, no reassociation, so a product's bits do not depend on the
# function it is compiled into (one thread's matmul and the shared spans' rows give the same numbers)
_FP = ("contract",)


def _vec(t, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _host_features() -> dict:
    import llvmlite.binding as llvm

    try:
        return dict(llvm.get_host_cpu_features())
    except RuntimeError:  # llvmlite cannot read them on this platform
        logger.debug("no host CPU features from llvmlite", exc_info=True)
        return {}


def available_isas(features: dict | None = None) -> list[str]:
    """The paths this CPU can run, best first ("generic" always)."""
    f = _host_features() if features is None else features
    out = []
    if f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")):
        out.append("vnni")
    if f.get("avx2"):
        out.append("avx2")
    return out + ["generic"]


def choose_isa(features: dict | None = None) -> str:
    """The path used: MLXLLAMA_KERNEL_ISA where this CPU has it, else the best it has."""
    have = available_isas(features)
    want = os.environ.get("MLXLLAMA_KERNEL_ISA", "").strip().lower()
    if want and want != "auto":
        if want in have:
            return want
        logger.warning("MLXLLAMA_KERNEL_ISA=%s is not available on this CPU (%s); using %s", want,
                       ", ".join(have), have[0])
    return have[0]


# -- the per-block integer dot product, one per instruction set ------------------------------------------------

def _call(builder, name: str, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _quarters(builder, v, n: int):
    """<4n x i32> -> <n x i32>: the four consecutive quarters added."""
    parts = [builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(k * n, (k + 1) * n))))
             for k in range(4)]
    return builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))


def _dot_generic(builder, codes, x, bits):
    """<32 x i8> unsigned codes . <32 x i8> signed x -> <8 x i32> partial sums."""
    v32 = _vec(_I32, 32)
    m = builder.mul(builder.zext(codes, v32), builder.sext(x, v32))
    return _quarters(builder, m, 8)


def _dot_avx2(builder, codes, x, bits):
    """vpmaddubsw + vpmaddwd; with 8 bits, codes arrive recentred (q - 128, signed: see _SIGNED8)."""
    if bits == 8:
        x = _call(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), [x, codes])
        codes = _call(builder, "llvm.abs.v32i8", _vec(_I8, 32), [codes, ir.Constant(_I1, 0)])
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [codes, x])
    ones = ir.Constant(_vec(_I16, 16), [1] * 16)
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [pairs, ones])


def _dot_vnni(builder, codes, x, bits):
    v8 = _vec(_I32, 8)
    zero = ir.Constant(v8, None)
    return _call(builder, "llvm.x86.avx512.vpdpbusd.256", v8,
                 [zero, builder.bitcast(codes, v8), builder.bitcast(x, v8)])


# (path, activation bits) -> the block product of int8 inputs (int16 inputs: _dot16_halves, through _pmadd)
_DOTS = {("generic", 8): _dot_generic, ("avx2", 8): _dot_avx2, ("vnni", 8): _dot_vnni}
_SIGNED8 = {("avx2", 8)}  # paths that take 8-bit codes as q - 128 (the bias absorbs 128 * scale)


# -- IR helpers --------------------------------------------------------------------------------------------------

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


_NATIVE_HALF = bool(_host_features().get("f16c")) or os.uname().machine.lower() in ("arm64", "aarch64")


def _load_scale(builder, ptr, half: bool, n: int = 0):
    """A scale or bias as float32, or n consecutive ones as <n x float> (float16 held as its uint16 bits: one
    instruction with x86's F16C or on arm64, elsewhere integer operations rather than a runtime helper call)."""
    if not n:
        v = builder.load(ptr)
    else:
        v = builder.load(builder.bitcast(ptr, _vec(_I16 if half else _F32, n).as_pointer()), align=2 if half else 4)
    if not half:
        return v
    if _NATIVE_HALF:
        return builder.fpext(builder.bitcast(v, _vec(ir.HalfType(), n) if n else ir.HalfType()),
                             _vec(_F32, n) if n else _F32)
    if not n:
        return _half_to_float(builder, v)
    out = ir.Constant(_vec(_F32, n), None)
    for k in range(n):
        out = builder.insert_element(out, _half_to_float(builder, builder.extract_element(v, ir.Constant(_I32, k))),
                                     ir.Constant(_I32, k))
    return out


def _splat(builder, v, n: int):
    e = builder.insert_element(ir.Constant(_vec(v.type, n), None), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(e, e, ir.Constant(_vec(_I32, n), [0] * n))


def _codes(builder, wrow, b, idx, bits: int, signed8: bool, order=None):
    """Block b's 32 codes as <32 x i8>: 4 bits as [low nibbles, high nibbles] (or `order` of the 32 inputs);
    8 bits as stored, or recentred to q - 128 (signed8)."""
    wp = builder.gep(wrow, [builder.mul(b, ir.Constant(idx, 32 * bits // 8))])
    if bits == 8:
        codes = builder.load(builder.bitcast(wp, _vec(_I8, 32).as_pointer()), align=1)
        return builder.xor(codes, ir.Constant(_vec(_I8, 32), [0x80] * 32)) if signed8 else codes
    packed = builder.load(builder.bitcast(wp, _vec(_I8, 16).as_pointer()), align=1)
    lo = builder.and_(packed, ir.Constant(_vec(_I8, 16), [15] * 16))
    hi = builder.lshr(packed, ir.Constant(_vec(_I8, 16), [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 32), order or list(range(32))))


def _hsum(builder, v, n: int):
    while n > 1:  # pairwise
        n //= 2
        a = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n))))
        c = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n, 2 * n))))
        v = builder.fadd(a, c, flags=_FP)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _store_row_sums(builder, acc, bacc, yrow, ystride):
    """IR: yrow[r * ystride] = the horizontal sum of row r's accumulators acc[a][r] (<8 x float> each) plus lane r
    of the bias accumulator bacc (<R x float>), for every row r."""
    bv = builder.load(bacc)
    for r in range(len(acc[0])):
        v = builder.load(acc[0][r])
        for a in range(1, len(acc)):
            v = builder.fadd(v, builder.load(acc[a][r]), flags=_FP)
        out = builder.fadd(_hsum(builder, v, 8), builder.extract_element(bv, ir.Constant(_I32, r)), flags=_FP)
        builder.store(out, builder.gep(yrow, [builder.mul(ystride, ir.Constant(ystride.type, r))]))


# -- the tile: R input rows against one weight row -----------------------------------------------------------------

def _opaque_four(builder, nblk):
    """<16 x i16> of 4s that LLVM cannot see are 4 (nblk >> 48 is 0 for any real row). With a constant 4 it narrows
    the nibble split of widened bytes back to byte operations and widens each half apart; with this one the split
    stays one widening load and three word operations (one-row products 18 -> 23 G weights/s on Zen 2)."""
    zero = builder.trunc(builder.lshr(nblk, ir.Constant(nblk.type, 48)), _I16)
    return _splat(builder, builder.add(zero, ir.Constant(_I16, 4)), 16)


def _codes16(builder, wrow, b, idx, bits: int, four):
    """Block b's 32 codes widened to int16 as two <16 x i16> halves, the order the input is permuted to: 4 bits
    as [low nibbles, high nibbles] (one widening load, then the high nibble by a shift and the low one by a shift
    back and a subtraction: _opaque_four), 8 bits as stored."""
    wp = builder.gep(wrow, [builder.mul(b, ir.Constant(idx, 32 * bits // 8))])
    v16 = _vec(_I16, 16)
    if bits == 4:
        packed = builder.zext(builder.load(builder.bitcast(wp, _vec(_I8, 16).as_pointer()), align=1), v16)
        hi = builder.lshr(packed, four)
        return [builder.sub(packed, builder.shl(hi, four)), hi]
    halves = []
    for h in range(2):
        p = builder.bitcast(builder.gep(wp, [ir.Constant(idx, 16 * h)]), _vec(_I8, 16).as_pointer())
        halves.append(builder.zext(builder.load(p, align=1), v16))
    return halves


def _dot16_halves(builder, isa: str, halves, xp):
    """<8 x i32> partial sums of two <16 x i16> code halves against the 32 int16 inputs at xp."""
    v16 = _vec(_I16, 16)
    xs = [builder.load(builder.bitcast(builder.gep(xp, [ir.Constant(ir.IntType(64), 16 * h)]), v16.as_pointer()),
                       align=2) for h in range(2)]
    if isa in ("avx2", "vnni"):  # vpmaddwd, then a second one added (vnni: vpdpwssd into the first's sums)
        return _pmadd(builder, isa, halves[1], xs[1], _pmadd(builder, "avx2", halves[0], xs[0]))
    v32 = _vec(_I32, 16)
    out = None
    for c, x in zip(halves, xs):
        m = builder.mul(builder.sext(c, v32), builder.sext(x, v32))
        lo = builder.shuffle_vector(m, m, ir.Constant(_vec(_I32, 8), list(range(8))))
        hi = builder.shuffle_vector(m, m, ir.Constant(_vec(_I32, 8), list(range(8, 16))))
        s = builder.add(lo, hi)
        out = s if out is None else builder.add(out, s)
    return out


def _tile_ir(context, builder, at, args, isa: str, bits: int, R: int):
    """IR for y[yoff + r * ystride], r < R (see _tile)."""
    (w_, woff_, xq_, xoff_, n_, dxs_, r0_, rows_, sc_, bi_, soff_, bfac_, y_, yoff_, ystr_, nblk_, shift_) = args
    act = 16 if at[2].dtype == types.int16 else 8  # activation bits: xq's dtype
    dot, signed8 = _DOTS.get((isa, act)), bits == 8 and (isa, act) in _SIGNED8
    unroll = 2 if R == 1 else 1  # independent accumulators: a lone row's blocks do not wait on each other

    def base(i, arg, off):
        return builder.gep(context.make_array(at[i])(context, builder, arg).data, [off])

    half = at[8].dtype == types.uint16
    wrow, srow, brow = base(0, w_, woff_), base(8, sc_, soff_), base(9, bi_, soff_)
    idx = woff_.type
    xrows = [base(2, xq_, builder.add(xoff_, builder.mul(n_, ir.Constant(idx, r)))) for r in range(R)]
    dcol = base(5, dxs_, r0_)  # dx of block b, rows r0..: dcol[b * rows ..]; s: nblk * rows further
    scol = builder.gep(dcol, [builder.mul(nblk_, rows_)])
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 8), None)) for _ in range(R)]
           for _ in range(unroll)]
    bacc = cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, R), None))
    symmetric = builder.fcmp_ordered("!=", bfac_, ir.Constant(_F32, 0.0))
    four = _opaque_four(builder, nblk_)

    def block(b, u):
        scale, bias = _scale_bias(builder, srow, brow, builder.ashr(b, shift_), shift_, half, symmetric, bfac_)
        if signed8:
            bias = builder.fadd(bias, builder.fmul(scale, ir.Constant(_F32, 128.0)))
        off = builder.mul(b, rows_)
        sv = builder.load(builder.bitcast(builder.gep(scol, [off]), _vec(_F32, R).as_pointer()), align=4)
        t = builder.fmul(sv, _splat(builder, bias, R), flags=_FP)
        builder.store(builder.fadd(builder.load(bacc), t, flags=_FP), bacc)
        ssplat = _splat(builder, scale, 8)
        if act == 16:
            halves = _codes16(builder, wrow, b, idx, bits, four)
        else:
            codes = _codes(builder, wrow, b, idx, bits, signed8)
        for r in range(R):
            xp = builder.gep(xrows[r], [builder.shl(b, ir.Constant(idx, 5))])
            if act == 16:
                d = _dot16_halves(builder, isa, halves, xp)
            else:
                x = builder.load(builder.bitcast(xp, _vec(_I8, 32).as_pointer()), align=1)
                d = dot(builder, codes, x, bits)
            dx = builder.load(builder.gep(dcol, [builder.add(off, ir.Constant(idx, r))]))
            f = builder.fmul(ssplat, _splat(builder, dx, 8), flags=_FP)
            t = builder.fmul(builder.sitofp(d, _vec(_F32, 8)), f, flags=_FP)
            builder.store(builder.fadd(builder.load(acc[u][r]), t, flags=_FP), acc[u][r])

    start = ir.Constant(idx, 0)
    if R == 1:  # a lone row (dx and s contiguous) takes its blocks by eights first (_octets)
        start = builder.select(builder.icmp_signed("==", rows_, ir.Constant(idx, 1)),
                               builder.and_(nblk_, ir.Constant(idx, -8)), start)
        blocks = lambda b: _block_dot(builder, isa, act, bits, signed8, dot, wrow, xrows[0], idx, b, four)  # noqa: E731
        for sh in range(3):  # the loop once per group size and bias kind: no branch on either inside it
            for sym in (True, False):
                same = builder.and_(builder.icmp_signed("==", shift_, ir.Constant(shift_.type, sh)),
                                    builder.icmp_unsigned("==", symmetric, ir.Constant(_I1, int(sym))))
                with builder.if_then(same):
                    _octets(builder, blocks, srow, brow, half, ir.Constant(_I1, int(sym)), bfac_, dcol, scol, start,
                            ir.Constant(shift_.type, sh), acc[0][0], acc[1][0], signed8)
    step = ir.Constant(idx, unroll)
    left = builder.sub(nblk_, start)
    with cgutils.for_range(builder, builder.udiv(left, step)) as loop:
        b0 = builder.add(start, builder.mul(loop.index, step))
        for u in range(unroll):
            block(builder.add(b0, ir.Constant(idx, u)), u)
    if unroll > 1:
        with builder.if_then(builder.icmp_unsigned("!=", builder.urem(left, step), ir.Constant(idx, 0))):
            block(builder.sub(nblk_, ir.Constant(idx, 1)), 0)
    _store_row_sums(builder, acc, bacc, base(12, y_, yoff_), ystr_)


def _block_dot(builder, isa: str, act: int, bits: int, signed8: bool, dot, wrow, xrow, idx, b, four):
    """<8 x i32> partial sums of block b's codes against one row's rounded inputs."""
    xp = builder.gep(xrow, [builder.shl(b, ir.Constant(idx, 5))])
    if act == 16:
        return _dot16_halves(builder, isa, _codes16(builder, wrow, b, idx, bits, four), xp)
    x = builder.load(builder.bitcast(xp, _vec(_I8, 32).as_pointer()), align=1)
    return dot(builder, _codes(builder, wrow, b, idx, bits, signed8), x, bits)


def _block_sums(builder, dots):
    """Eight <8 x i32> (or <8 x float>) partial sums -> one vector whose lane k is dots[k]'s total (pairwise adds,
    as vphaddd or vhaddps, then the two 128-bit halves)."""
    h = [_hadd(builder, dots[k], dots[k + 1]) for k in range(0, 8, 2)]
    q0, q1 = _hadd(builder, h[0], h[1]), _hadd(builder, h[2], h[3])
    lo = builder.shuffle_vector(q0, q1, ir.Constant(_vec(_I32, 8), [0, 1, 2, 3, 8, 9, 10, 11]))
    hi = builder.shuffle_vector(q0, q1, ir.Constant(_vec(_I32, 8), [4, 5, 6, 7, 12, 13, 14, 15]))
    return _add(builder, lo, hi)


def _scale_bias(builder, srow, brow, g, shift, half: bool, symmetric, bfac, n: int = 0):
    """The scale and bias of group g's block as float32 (n = 0), or of n blocks from group g on as <n x float>
    (_block_values); with symmetric, the bias is bfac * scale (brow, then the scales again, is read all the same)."""
    if not n:
        scale = _load_scale(builder, builder.gep(srow, [g]), half)
        return scale, builder.select(symmetric, builder.fmul(scale, bfac),
                                     _load_scale(builder, builder.gep(brow, [g]), half))
    scale = _block_values(builder, srow, g, shift, half, n)
    return scale, builder.select(symmetric, builder.fmul(scale, _splat(builder, bfac, n)),
                                 _block_values(builder, brow, g, shift, half, n))


def _block_values(builder, row, g0, shift, half: bool, n: int):
    """The scales (or biases) of n (8 or 4) blocks from group g0 on as <n x float>: n, n / 2 or n / 4 groups read
    (shift 0, 1 or 2, the run-time group size) and each repeated over its blocks. Nothing past the n blocks' groups
    is read."""
    out = cgutils.alloca_once(builder, _vec(_F32, n))
    p = builder.gep(row, [g0])
    for s in range(3):
        with builder.if_then(builder.icmp_signed("==", shift, ir.Constant(shift.type, s))):
            v = _load_scale(builder, p, half, n >> s)
            builder.store(builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), [k >> s for k in range(n)])), out)
    return builder.load(out)


def _octets(builder, blocks, srow, brow, half, symmetric, bfac, dcol, scol, end, shift, acc, bacc, signed8):
    """IR: one input row's blocks [0, end) (end a multiple of 8) eight at a time, into the <8 x float> acc and
    bacc. Each eight's integer sums become one vector (_block_sums) scaled by the eight blocks' scale * dx in one
    multiply-add, their biases' terms another: the float work of a block is an eighth of _tile's per-block one."""
    idx = end.type
    v8 = _vec(_F32, 8)
    with cgutils.for_range(builder, builder.udiv(end, ir.Constant(idx, 8))) as loop:
        b0 = builder.mul(loop.index, ir.Constant(idx, 8))
        sums = _block_sums(builder, [blocks(builder.add(b0, ir.Constant(idx, k))) for k in range(8)])
        scale, bias = _scale_bias(builder, srow, brow, builder.ashr(b0, shift), shift, half, symmetric, bfac, 8)
        if signed8:
            bias = builder.fadd(bias, builder.fmul(scale, ir.Constant(v8, [128.0] * 8)))
        dx = builder.load(builder.bitcast(builder.gep(dcol, [b0]), v8.as_pointer()), align=4)
        s = builder.load(builder.bitcast(builder.gep(scol, [b0]), v8.as_pointer()), align=4)
        t = builder.fmul(builder.sitofp(sums, v8), builder.fmul(scale, dx, flags=_FP), flags=_FP)
        builder.store(builder.fadd(builder.load(acc), t, flags=_FP), acc)
        builder.store(builder.fadd(builder.load(bacc), builder.fmul(s, bias, flags=_FP), flags=_FP), bacc)


# The path is told to the compiled functions by the dtype of an empty "tag" array, so that each path is its own
# signature of one function: numba compiles only the paths called and caches each apart, and no code for another
# CPU's instructions is ever compiled.
_TAGS = {"vnni": np.uint8, "avx2": np.uint16, "generic": np.uint32}
_TAG_PATHS = {numba_type(np.dtype(t)): isa for isa, t in _TAGS.items()}


def _by_bits_and_rows(isa: str, tiles, emit):
    """The codegen of a tile intrinsic whose args[1] and args[2] are bits and R at run time: one loop in the IR
    per (bits in BITS, R in tiles(bits)), emit(context, builder, arg types, args, isa, bits, R) writing each,
    over the arguments after R."""
    def codegen(context, builder, signature, args):
        idx = args[1].type
        for b in BITS:
            for r in tiles(b):
                case = builder.and_(builder.icmp_signed("==", args[1], ir.Constant(idx, b)),
                                    builder.icmp_signed("==", args[2], ir.Constant(idx, r)))
                with builder.if_then(case):
                    emit(context, builder, signature.args[3:], args[3:], isa, b, r)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _tile(typingctx, tag, bits, R, w, woff, xq, xoff, n, dxs, r0, rows, scales, biases, soff, bfac, y, yoff, ystride,
          nblk, shift):
    """tile(tag, bits, R, w, woff, xq, xoff, n, dxs, r0, rows, scales, biases, soff, bfac, y, yoff, ystride, nblk,
    shift) sets y[yoff + r * ystride] for r < R (R in TILES): one weight row (its bytes at woff; scales and biases
    at soff, float32 or float16 bits; with bfac != 0 the biases are bfac * scales) against R rounded input rows (xq
    at xoff + r * n, permuted per block for 4 bits) whose dx and s are dxs[0, b, r0 + r] and dxs[1, b, r0 + r]
    (dxs [2, nblk, rows]), on the path tag's dtype names. bits and R are run-time values: each (bits, R) is its
    own loop in the IR."""
    isa = _TAG_PATHS[tag.dtype]
    sig = types.none(tag, types.intp, types.intp, w, types.intp, xq, types.intp, types.intp, dxs, types.intp,
                     types.intp, scales, biases, types.intp, types.float32, y, types.intp, types.intp,
                     types.intp, types.intp)

    return sig, _by_bits_and_rows(isa, lambda bits: TILES, _tile_ir)


_ROUNDER = np.float32(1.5 * 2 ** 23)


@njit(inline="always")
def _rint(v):
    """np.rint(v) for float32 |v| < 2**22 (ties to even, the default rounding), in adds a loop vectorizes: np.rint
    is a call per element."""
    return (v + _ROUNDER) - _ROUNDER


@njit(inline="always")
def _abs_max(x, i0: int, i1: int):
    """max |x[i0:i1]| by four independent maxima (one running maximum waits on each compare)."""
    m0 = m1 = m2 = m3 = np.float32(0)
    i = i0
    while i + 4 <= i1:
        m0, m1 = max(m0, abs(x[i])), max(m1, abs(x[i + 1]))
        m2, m3 = max(m2, abs(x[i + 2])), max(m3, abs(x[i + 3]))
        i += 4
    for t in range(i, i1):
        m0 = max(m0, abs(x[t]))
    return max(max(m0, m1), max(m2, m3))


@njit(cache=True, nogil=True)
def quantize_input(x2, bits, lim, xq, dxs):
    """x2 [rows, in] float32 -> xq [rows, in] int8 or int16, |xq| <= lim (permuted per block of 32 for 4 bits: 16
    even inputs, then 16 odd ones, as the nibbles); dxs [2, in / 32, rows]: dx and s per block and row, with
    xq * dx ~ x and s = dx * sum(xq) (the bias then multiplies the same rounded x as the codes do: the error is
    sum w * (x - dx xq), not scale * q * (...))."""
    rows, n = x2.shape
    half = _BLOCK // 2
    for r in range(rows):
        x, out = x2[r], xq[r]
        for b in range(n // _BLOCK):
            s0 = b * _BLOCK
            m = _abs_max(x, s0, s0 + _BLOCK)
            d = m / lim
            inv = lim / m if m > 0 else np.float32(0)
            t = np.int32(0)
            if bits == 4:
                for i in range(half):
                    v0, v1 = np.int32(_rint(x[s0 + 2 * i] * inv)), np.int32(_rint(x[s0 + 2 * i + 1] * inv))
                    out[s0 + i], out[s0 + half + i] = v0, v1
                    t += v0 + v1
            else:
                for i in range(_BLOCK):
                    v = np.int32(_rint(x[s0 + i] * inv))
                    out[s0 + i] = v
                    t += v
            dxs[0, b, r] = d
            dxs[1, b, r] = d * np.float32(t)


@njit(inline="always")
def _group_shift(group_size: int) -> int:
    """log2 of the 32-input blocks in a scale group (32, 64 or 128 inputs)."""
    return 0 if group_size == 32 else (1 if group_size == 64 else 2)


@njit(inline="always")
def _tile_rows(r1: int, r: int) -> int:
    """The tile height for input rows r..r1: the largest of TILES that fits."""
    left = r1 - r
    return 4 if left >= 4 else (2 if left >= 2 else 1)


@njit(cache=True, nogil=True)
def _rows(tag, w, scales, biases, bfac, bits, group_size, xq, dxs, y, o0, o1):
    """y[:, o0:o1] on tag's path: _OUT_CHUNK weight rows at a time stay in cache while each tile of input rows
    passes over them."""
    rows, n = xq.shape
    nblk, shift = n // _BLOCK, _group_shift(group_size)
    for c0 in range(o0, o1, _OUT_CHUNK):
        c1 = min(o1, c0 + _OUT_CHUNK)
        r = 0
        while r < rows:
            R = _tile_rows(rows, r)
            for o in range(c0, c1):
                _tile(tag, bits, R, w, o * w.shape[1], xq, r * n, n, dxs, r, rows, scales, biases,
                      o * scales.shape[1], bfac, y, r * y.shape[1] + o, y.shape[1], nblk, shift)
            r += R


@njit(cache=True, nogil=True)
def _product(tag, x2, lim, w, scales, biases, bfac, bits, group_size, xq, dxs, y):
    """The whole product in one compiled call: the input rounded, then every output row."""
    quantize_input(x2, bits, lim, xq, dxs)
    _rows(tag, w, scales, biases, bfac, bits, group_size, xq, dxs, y, 0, y.shape[1])


# -- unit tiles: up to 8 input rows, codes unpacked by shifts, one input scale per chunk ---------------------------

UTILES = (8, 4, 2, 1)
UNIT_ROWS = {4: 2, 8: 8}  # bits -> the unit tiles take the multiples of this many rows (measured: faster there)
CHUNK = 128  # inputs sharing one input scale in quantize_units


def _utile_heights(bits: int) -> tuple:
    """The tile heights _urows uses for `bits`-bit weights (their unit rows are multiples of UNIT_ROWS[bits]): only
    these are compiled."""
    return tuple(r for r in UTILES if r % UNIT_ROWS[bits] == 0)


def _unit(bits: int) -> int:
    """Inputs per unit: 32 bytes of codes, read as 16 words."""
    return 256 // bits


def unit_order(bits: int) -> np.ndarray:
    """Position in a unit -> input: code j of every word, j = 0, 1, ... (4 bits: 4k + j; 8 bits: 2k + j)."""
    per = 16 // bits
    return np.array([per * k + j for j in range(per) for k in range(16)])


def _pmadd(builder, isa: str, c, x, acc=None):
    """acc + <16 x i16> . <16 x i16> -> <8 x i32>: adjacent pairs of products summed (vpmaddwd; vnni: vpdpwssd
    into acc)."""
    v8 = _vec(_I32, 8)
    if isa == "vnni":
        return _call(builder, "llvm.x86.avx512.vpdpwssd.256", v8,
                     [acc or ir.Constant(v8, None), builder.bitcast(c, v8), builder.bitcast(x, v8)])
    if isa == "avx2":
        p = _call(builder, "llvm.x86.avx2.pmadd.wd", v8, [c, x])
    else:
        m = builder.mul(builder.sext(c, _vec(_I32, 16)), builder.sext(x, _vec(_I32, 16)))
        even = builder.shuffle_vector(m, m, ir.Constant(v8, list(range(0, 16, 2))))
        odd = builder.shuffle_vector(m, m, ir.Constant(v8, list(range(1, 16, 2))))
        p = builder.add(even, odd)
    return p if acc is None else builder.add(acc, p)


def _unit_codes(builder, wp, bits: int):
    """A unit's codes as int16 vectors, by masks and shifts of its 16 words (no shuffles)."""
    v16 = _vec(_I16, 16)
    words = builder.load(builder.bitcast(wp, v16.as_pointer()), align=1)
    mask = ir.Constant(v16, [(1 << bits) - 1] * 16)
    out = []
    for j in range(16 // bits):
        v = words if j == 0 else builder.lshr(words, ir.Constant(v16, [bits * j] * 16))
        out.append(v if bits * (j + 1) == 16 else builder.and_(v, mask))
    return out


class _Pairs(NamedTuple):
    """What a chunk of _pairs_ir needs: the weight row's codes, scales and biases, the input tile, its dx and s
    columns, the accumulators (one <8 x float> per row pair, the bias terms' <R x float>)."""
    wrow: object
    srow: object
    brow: object
    half: bool
    symmetric: object
    bfac: object
    shift: object
    xtile: object
    xstep: object
    dcol: object
    scol: object
    rows: object
    acc: list
    bacc: object


def _pairs_ir(context, builder, at, args, isa: str, bits: int, R: int):
    """IR of _utile for an even R, a chunk (128 inputs: four blocks, one input scale) at a time. Each pair of rows'
    integer sums over the chunk become vectors of (row, block) sums by pairwise adds (4 bits: one of the pair's
    eight totals; 8 bits: two of halves), scaled by scale * dx in one multiply-add each; the row sums are formed once
    per weight row, not per chunk."""
    (w_, woff_, xq_, dxs_, r0_, rows_, sc_, bi_, soff_, bfac_, y_, yoff_, ystr_, nblk_, shift_) = args

    def base(i, arg, off):
        return builder.gep(context.make_array(at[i])(context, builder, arg).data, [off])

    U = _unit(bits)
    c = lambda v: ir.Constant(woff_.type, v)  # noqa: E731
    dcol = base(3, dxs_, r0_)
    t = _Pairs(base(0, w_, woff_), base(6, sc_, soff_), base(7, bi_, soff_), at[6].dtype == types.uint16,
               builder.fcmp_ordered("!=", bfac_, ir.Constant(_F32, 0.0)), bfac_, shift_,
               base(2, xq_, builder.mul(r0_, c(U))), builder.mul(rows_, c(U)), dcol,
               builder.gep(dcol, [builder.mul(nblk_, rows_)]), rows_,
               [cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 8), None)) for _ in range(R // 2)],
               cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, R), None)))
    with cgutils.for_range(builder, builder.udiv(nblk_, c(4))) as loop:
        _pair_chunk(builder, t, isa, bits, R, builder.mul(loop.index, c(4)), 4)
    left = builder.urem(nblk_, c(4))
    for present in ((2,) if bits == 4 else (1, 2, 3)):  # a row's last blocks (4 bits: its odd unit)
        with builder.if_then(builder.icmp_unsigned("==", left, c(present))):
            _pair_chunk(builder, t, isa, bits, R, builder.sub(nblk_, c(present)), present)
    out = builder.load(t.bacc)
    for p, a in enumerate(t.acc):
        v = builder.load(a)  # lanes: rows 2p, 2p + 1, 2p, 2p + 1 in each half
        q = builder.fadd(builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 4), [0, 1, 2, 3])),
                         builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 4), [4, 5, 6, 7])), flags=_FP)
        for k in range(2):
            lane = builder.fadd(builder.extract_element(q, ir.Constant(_I32, k)),
                                builder.extract_element(q, ir.Constant(_I32, k + 2)), flags=_FP)
            r = ir.Constant(_I32, 2 * p + k)
            out = builder.insert_element(out, builder.fadd(builder.extract_element(out, r), lane, flags=_FP), r)
    yrow = base(10, y_, yoff_)
    for r in range(R):
        builder.store(builder.extract_element(out, ir.Constant(_I32, r)), builder.gep(yrow, [builder.mul(ystr_, c(r))]))


def _chunk_scales(builder, t: _Pairs, b0, present: int):
    """<4 x float> scales and biases of blocks b0..b0 + 3, lanes past `present` zero (and not read)."""
    if present == 4:
        return _scale_bias(builder, t.srow, t.brow, builder.ashr(b0, t.shift), t.shift, t.half, t.symmetric, t.bfac,
                           4)
    scale, bias = ir.Constant(_vec(_F32, 4), None), ir.Constant(_vec(_F32, 4), None)
    for k in range(present):
        g = builder.ashr(builder.add(b0, ir.Constant(b0.type, k)), t.shift)
        sk, bk = _scale_bias(builder, t.srow, t.brow, g, t.shift, t.half, t.symmetric, t.bfac)
        scale = builder.insert_element(scale, sk, ir.Constant(_I32, k))
        bias = builder.insert_element(bias, bk, ir.Constant(_I32, k))
    return scale, bias


def _pair_chunk(builder, t: _Pairs, isa: str, bits: int, R: int, b0, present: int):
    """IR: the blocks b0..b0 + present - 1 of one chunk into t's accumulators (see _pairs_ir)."""
    c = lambda v: ir.Constant(b0.type, v)  # noqa: E731
    vR, zero = _vec(_F32, R), ir.Constant(_vec(_I32, 8), None)
    scale, bias = _chunk_scales(builder, t, b0, present)
    for k in range(present):
        sv = builder.load(builder.bitcast(builder.gep(t.scol, [builder.mul(builder.add(b0, c(k)), t.rows)]),
                                          vR.as_pointer()), align=4)
        bk = builder.shuffle_vector(bias, bias, ir.Constant(_vec(_I32, R), [k] * R))
        builder.store(builder.fadd(builder.load(t.bacc), builder.fmul(sv, bk, flags=_FP), flags=_FP), t.bacc)
    per = 2 if bits == 4 else 1  # blocks a unit
    U = _unit(bits)
    pairs = []  # per unit: each row pair's sums, pairwise added
    for k in range(present // per):
        u = builder.add(builder.udiv(b0, c(per)), c(k))
        codes = _unit_codes(builder, builder.gep(t.wrow, [builder.mul(u, c(32))]), bits)
        xu = builder.gep(t.xtile, [builder.mul(u, t.xstep)])
        pairs.append([_hadd(builder, _unit_dot(builder, isa, codes, xu, U, 2 * p),
                            _unit_dot(builder, isa, codes, xu, U, 2 * p + 1)) for p in range(R // 2)])
    pairs += [[zero] * (R // 2)] * (4 // per - len(pairs))
    # lanes of each vector: 4 bits [b0, b0, b2, b2 | b1, b1, b3, b3]; 8 bits [b0, b0, b1, b1 | b0, ...], then b2, b3
    lanes = [[0, 0, 2, 2, 1, 1, 3, 3]] if bits == 4 else [[0, 0, 1, 1, 0, 0, 1, 1], [2, 2, 3, 3, 2, 2, 3, 3]]
    svecs = [builder.shuffle_vector(scale, scale, ir.Constant(_vec(_I32, 8), m)) for m in lanes]
    for p, a in enumerate(t.acc):
        dx = builder.load(builder.bitcast(builder.gep(t.dcol, [builder.add(builder.mul(b0, t.rows), c(2 * p))]),
                                          _vec(_F32, 2).as_pointer()), align=4)
        dxv = builder.shuffle_vector(dx, dx, ir.Constant(_vec(_I32, 8), [0, 1] * 4))
        for g, svec in enumerate(svecs):
            if g * 2 * per >= present:
                break
            h = _hadd(builder, pairs[2 * g][p], pairs[2 * g + 1][p])
            prod = builder.fmul(builder.sitofp(h, _vec(_F32, 8)), builder.fmul(svec, dxv, flags=_FP), flags=_FP)
            builder.store(builder.fadd(builder.load(a), prod, flags=_FP), a)


def _unit_dot(builder, isa: str, codes, xu, U: int, r: int):
    """<8 x i32>: a unit's codes against row r's U inputs at xu + U r (4 bits: lanes 0-3 its first block, 4-7 its
    second)."""
    d = None
    for j, cj in enumerate(codes):
        xp = builder.bitcast(builder.gep(xu, [ir.Constant(ir.IntType(64), U * r + 16 * j)]),
                             _vec(_I16, 16).as_pointer())
        d = _pmadd(builder, isa, cj, builder.load(xp, align=2), d)
    return d


def _add(builder, a, b):
    """a + b for integer or float vectors."""
    return (builder.fadd if isinstance(a.type.element, ir.FloatType) else builder.add)(a, b)


def _hadd(builder, u, v):
    """Pairwise sums of two <8 x i32> (or <8 x float>) within each 128-bit half, as vphaddd (vhaddps): [u0+u1,
    u2+u3, v0+v1, v2+v3 | ...]."""
    lo = ir.Constant(_vec(_I32, 8), [0, 2, 8, 10, 4, 6, 12, 14])
    hi = ir.Constant(_vec(_I32, 8), [1, 3, 9, 11, 5, 7, 13, 15])
    return _add(builder, builder.shuffle_vector(u, v, lo), builder.shuffle_vector(u, v, hi))


@intrinsic
def _utile(typingctx, tag, bits, R, w, woff, xq, dxs, r0, rows, scales, biases, soff, bfac, y, yoff, ystride, nblk,
           shift):
    """_tile's result (R in UTILES) for int16 inputs from quantize_units: xq [in / unit, rows, unit], a unit of
    every row side by side (unit: the 64 or 32 inputs of 32 bytes of codes, in unit_order), dx one per CHUNK
    inputs. Codes come out of the weight's words by masks and shifts; pairs of rows go a chunk at a time
    (_pairs_ir)."""
    isa = _TAG_PATHS[tag.dtype]
    sig = types.none(tag, types.intp, types.intp, w, types.intp, xq, dxs, types.intp, types.intp, scales, biases,
                     types.intp, types.float32, y, types.intp, types.intp, types.intp, types.intp)

    return sig, _by_bits_and_rows(isa, _utile_heights, _pairs_ir)


@njit(cache=True, nogil=True)
def quantize_units(x2, bits, lim, order, xq, dxs):
    """x2 [rows, in] -> xq [in / unit, rows, unit] int16 (order: unit_order(bits)) with one scale per CHUNK inputs
    (|xq| <= lim: the step is the chunk's largest |x| / lim), and dxs [2, in / 32, rows]: each block's chunk dx
    and its s = dx * sum(xq) over the block (summed in int32: exact, as a float32 running sum of them was). Each
    value is rounded twice, once for the sums in input order and once into the unit layout: a sum kept while
    scattering in unit order waited on each store, while the two loops vectorize or run without waits."""
    rows, n = x2.shape
    U = order.shape[0]
    for r in range(rows):
        x = x2[r]
        for c0 in range(0, n, CHUNK):
            c1 = min(n, c0 + CHUNK)
            m = _abs_max(x, c0, c1)
            d = m / lim
            inv = lim / m if m > 0 else np.float32(0)
            for b in range(c0 // _BLOCK, c1 // _BLOCK):
                s = np.int32(0)
                for i in range(b * _BLOCK, b * _BLOCK + _BLOCK):
                    s += np.int32(_rint(x[i] * inv))
                dxs[0, b, r] = d
                dxs[1, b, r] = np.float32(s) * d
            for u0 in range(c0, c1, U):
                dst = xq[u0 // U, r]
                for p in range(U):
                    dst[p] = np.int16(_rint(x[u0 + order[p]] * inv))


@njit(cache=True, nogil=True)
def _uproduct(tag, x2, lim, order, w, scales, biases, bfac, bits, group_size, xq, dxs, y):
    """The unit-tile product in one compiled call: the input rounded, then every output row."""
    quantize_units(x2, bits, lim, order, xq, dxs)
    _urows(tag, w, scales, biases, bfac, bits, group_size, xq, dxs, y, 0, y.shape[1])


@njit(inline="always")
def _utile_rows(r1: int, r: int) -> int:
    left = r1 - r
    return 8 if left >= 8 else (4 if left >= 4 else (2 if left >= 2 else 1))


@njit(cache=True, nogil=True)
def _urows(tag, w, scales, biases, bfac, bits, group_size, xq, dxs, y, o0, o1):
    """_rows for inputs from quantize_units, through _utile."""
    rows, nblk = xq.shape[1], dxs.shape[1]
    shift = _group_shift(group_size)
    for c0 in range(o0, o1, _OUT_CHUNK):
        c1 = min(o1, c0 + _OUT_CHUNK)
        r = 0
        while r < rows:
            R = _utile_rows(rows, r)
            for o in range(c0, c1):
                _utile(tag, bits, R, w, o * w.shape[1], xq, dxs, r, rows, scales, biases, o * scales.shape[1], bfac,
                       y, r * y.shape[1] + o, y.shape[1], nblk, shift)
            r += R


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


def drops_biases(parts: list) -> bool:
    """Whether PackedLinear forms these projections' biases from their scales instead of keeping them: every bias
    is -2**(bits - 1) times its scale (GGUF's Q4_0 and Q8_0)."""
    factor = np.float32(-(1 << (parts[0].bits - 1)))
    return all(np.array_equal(np.asarray(p.biases, np.float32), factor * np.asarray(p.scales, np.float32))
               for p in parts)


class PackedLinear:
    """Same-input quantized projections fused by output rows, kept as stored: bytes [out, in * bits / 8] (a view
    of the uint32 words), scales and biases [out, in / group] (float32, or float16 held as uint16 bits). Where
    every bias is -2**(bits - 1) times its scale (GGUF's Q4_0 and Q8_0), the biases are not kept: the kernel
    forms them from the scales, and the weight is the file's bytes exactly. shape is (in, out), as numpy_ops'
    float32 matrices. isa: the kernel path (default: choose_isa())."""

    def __init__(self, parts: list, isa: str | None = None, act: int | None = None):
        p0 = parts[0]
        self.group_size, self.bits = p0.group_size, p0.bits
        self.isa = isa or kernel_isa()
        self.act = act or activation_bits()
        self._tag = np.empty(0, _TAGS[self.isa])
        self._xdtype, self._lim = (np.int8, np.float32(127)) if self.act == 8 else (np.int16, np.float32(32767))
        self._order = unit_order(p0.bits)
        self._buffers: dict[tuple[int, int], tuple] = {}  # (thread, rows) -> matmul's input buffers
        words = p0.weight if len(parts) == 1 else np.concatenate([p.weight for p in parts])
        self.words = np.ascontiguousarray(words, dtype=np.uint32)
        self.bytes = self.words.view(np.uint8)
        self.shape = (p0.shape[1], self.words.shape[0])
        dtype = np.result_type(*[p.scales.dtype for p in parts])
        self.scales = _rows_of([p.scales for p in parts], dtype)
        if drops_biases(parts):
            self.biases, self.bias_factor = None, np.float32(-(1 << (self.bits - 1)))
        else:
            self.biases, self.bias_factor = _rows_of([p.biases for p in parts], dtype), np.float32(0)
        if dtype == np.float16:
            self.scales = self.scales.view(np.uint16)
            self.biases = None if self.biases is None else self.biases.view(np.uint16)

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.scales.nbytes + (0 if self.biases is None else self.biases.nbytes)

    def _args(self):
        biases = self.scales if self.biases is None else self.biases
        return self.bytes, self.scales, biases, self.bias_factor, self.bits, self.group_size

    def unit_rows(self, rows: int) -> int:
        """How many of `rows` input rows run the unit tiles: the multiples of UNIT_ROWS[bits] (int16 inputs, whole
        units of inputs); the rest run _tile's."""
        if self.act != 16 or self.shape[0] % _unit(self.bits):
            return 0
        return rows // UNIT_ROWS[self.bits] * UNIT_ROWS[self.bits]

    def input_buffers(self, rows: int):
        """Empty buffers for `rows` input rows, what quantize_input fills: (xq, dxs) for _tile's rows, and before
        them (xq [in / unit, rows, unit], dxs) for the unit tiles' rows where there are any."""
        n, main = self.shape[0], self.unit_rows(rows)
        tiles = (np.empty((rows - main, n), self._xdtype), np.empty((2, n // _BLOCK, rows - main), np.float32))
        if not main:
            return tiles
        unit = _unit(self.bits)
        return (np.empty((n // unit, main, unit), np.int16), np.empty((2, n // _BLOCK, main), np.float32)) + tiles

    def quantize_input(self, x2: np.ndarray, buffers=None):
        """What rows() takes for x2 [rows, in] float32 (C order), in buffers (input_buffers) where given."""
        bufs = buffers if buffers is not None else self.input_buffers(x2.shape[0])
        main = 0 if len(bufs) == 2 else bufs[0].shape[1]
        if main:
            quantize_units(x2[:main], self.bits, self._lim, self._order, bufs[0], bufs[1])
        quantize_input(x2[main:], self.bits, self._lim, bufs[-2], bufs[-1])
        return bufs

    def rows(self, xin, out: np.ndarray, o0: int, o1: int) -> None:
        """out[:, o0:o1] = x @ W[o0:o1].T for xin = quantize_input(x); out C-order float32; releases the GIL."""
        main = 0 if len(xin) == 2 else xin[0].shape[1]
        if main:
            _urows(self._tag, *self._args(), xin[0], xin[1], out[:main], o0, o1)
        if main < out.shape[0]:
            _rows(self._tag, *self._args(), xin[-2], xin[-1], out[main:], o0, o1)

    def matmul(self, x2: np.ndarray) -> np.ndarray:
        """x2 [rows, in] (float32, C order) @ W.T on this thread, in one compiled call (two with both kinds of
        tile), the rounded input in buffers kept per thread and row count."""
        rows = x2.shape[0]
        key = (threading.get_ident(), rows)
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._buffers[key] = self.input_buffers(rows)
        out = np.empty((rows, self.shape[1]), np.float32)
        x2 = np.ascontiguousarray(x2, dtype=np.float32)
        main = 0 if len(bufs) == 2 else bufs[0].shape[1]
        if main:
            _uproduct(self._tag, x2[:main], self._lim, self._order, *self._args(), bufs[0], bufs[1], out[:main])
        if main < rows:
            _product(self._tag, x2[main:], self._lim, *self._args(), bufs[-2], bufs[-1], out[main:])
        return out

    def dequantize(self, o0: int, o1: int, out: np.ndarray) -> np.ndarray:
        """Rows o0..o1 as float32 [o1 - o0, in] in out (C order); releases the GIL."""
        if not (out.flags.c_contiguous and out.dtype == np.float32 and out.shape == (o1 - o0, self.shape[0])):
            raise ValueError(f"dequantize needs a C-order float32 [{o1 - o0}, {self.shape[0]}] buffer")
        dequantize_rows(*self._args(), o0, o1, out)
        return out


def _rows_of(arrays: list, dtype) -> np.ndarray:
    arrays = [np.asarray(a, dtype) for a in arrays]
    return np.ascontiguousarray(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))


_CHECKED: dict[str, str] = {}  # the path asked for -> the path used


def activation_bits() -> int:
    """Bits of the rounded inputs: MLXLLAMA_KERNEL_ACT (8 or 16), default 16."""
    want = os.environ.get("MLXLLAMA_KERNEL_ACT", "").strip()
    if want in ("8", "16"):
        return int(want)
    if want:
        logger.warning("MLXLLAMA_KERNEL_ACT=%s: expected 8 or 16; using 16", want)
    return 16


def kernel_isa() -> str:
    """The path in use: choose_isa()'s, once it has computed a small product as the generic path does (a path
    whose IR this LLVM cannot compile, or that disagrees, falls back to the next, with a warning)."""
    first = choose_isa()
    if first not in _CHECKED:
        have = available_isas()
        for isa in have[have.index(first):]:
            if isa == "generic" or _self_check(isa):
                _CHECKED[first] = isa
                break
        logger.debug("fused kernel path: %s (CPU offers %s)", _CHECKED[first], ", ".join(have))
    return _CHECKED[first]


class _Part(NamedTuple):
    """A quantized weight as PackedLinear reads one (weights.QuantizedWeight's fields it uses)."""
    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    group_size: int
    bits: int
    shape: tuple


def _random_part(rng, bits: int, rows: int = 8, n: int = 128, group: int = 32) -> _Part:
    words = rng.integers(0, 1 << 32, (rows, n * bits // 32), dtype=np.uint32)
    scales = (rng.random((rows, n // group)) * 0.02 + 0.01).astype(np.float16)
    biases = (-(1 << (bits - 1)) * scales.astype(np.float32) + rng.standard_normal(scales.shape) * 0.01)
    return _Part(words, scales, biases.astype(np.float16), group, bits, (rows, n))


def _self_check(isa: str) -> bool:
    """Whether the path computes a small product (both weight widths, 1 to 7 rows, the input width in use,
    float16 scales: the signatures a model compiles anyway) within a loose bound of the same weights dequantized
    (a plain loop) and multiplied by numpy: a path that compiles to wrong code is far outside it."""
    rng = np.random.default_rng(0)
    try:
        for bits in BITS:
            part = _random_part(rng, bits)
            w = PackedLinear([part], isa)
            weights = w.dequantize(0, part.shape[0], np.empty(part.shape, np.float32))
            want = (x := rng.standard_normal((7, part.shape[1])).astype(np.float32)) @ weights.T
            got = w.matmul(x)
            if not np.allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max()):
                logger.warning("the %s kernel path computes wrong products here; not used", isa)
                return False
    except Exception:  # an LLVM that cannot select these instructions: log it and use the next path
        logger.warning("the %s kernel path does not compile here; not used", isa)
        logger.debug("compile error", exc_info=True)
        return False
    return True
