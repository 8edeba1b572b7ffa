"""Vector products over GGUF blocks as the file stores them: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
(numba, LLVM IR written here; kquants.py calls them for products of up to 16 input rows).

Every type is read 32 inputs at a time ("a 32-block": the whole block of the 32-element types, one of the eight
32-input slices of a K-quant superblock). A 32-block decodes to 32 integer codes c, a scale, and a bias where the
type has one: w = scale * c + bias, exactly the float32 values gguf.quants.dequantize forms
(Q4_1/Q5_1: d, m; Q4_K/Q5_K: d * sc, -(dmin * m); Q4_0/Q5_0: the codes q unsigned and the bias -8 d or -16 d,
both exact in float32; Q8_0 and Q6_K: signed codes, q - 32 for Q6_K, whose scale d * sc covers 16 inputs, so a
32-block has two). Then, for each input row x (float32, as given: nothing is rounded),

    y[o] += scale * (c . x_b) + bias * sum(x_b)

with c . x_b as four 8-lane float multiplies over the codes converted to float32, the lanes summed at the end of
the row. Widening the codes to 32-bit lanes is what costs most on Zen 2 (lane-crossing shuffles run one a cycle),
so each type takes the form that measured fastest: Q4_0, Q4_1 and the K-quants widen each 8 bytes to dwords
(input order); Q5_0 and Q5_1 widen 16 bytes to words, add the fifth bits there, and split the words into dwords
by in-lane unpacks, which leave each 8-lane quarter holding the inputs NIBBLE_ORDER lists: their input is
permuted once per product to match (permute_nibbles); Q8_0 converts its bytes in order.

The result is x @ W.T up to float32 summation order: ~1e-6 relative per product (tests/test_kquants.py checks
2e-5 on random blocks of every type); on SmolLM2-135M Q4_K_M (Q5_0/Q8_0/Q4_K/Q6_K) the logits of
one-token steps differ from those of its float32-dequantized weights by at most 1.2e-5 of the largest logit, 12
tokens of a prompt together by 1.5e-5, every argmax equal. R input rows (a tile: 4, 2 or 1) share each decoded
32-block; a lone row's blocks go four a loop step into two accumulators, and a K-quant superblock's eight 32-blocks
are one loop step (their shifts and scale positions constants).

The IR is plain vector IR, no target intrinsics: numba compiles it for the CPU it runs on (8-lane AVX2/FMA on
x86-64 with AVX2; SSE, AVX-512 or NEON elsewhere), so there is no instruction-set path to choose or force
(qmatvec.py's MLXLLAMA_KERNEL_ISA does not apply). No integer dot products: those need the inputs rounded to
integers, which this float path avoids.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .qmatvec import _FP, _load_scale, _splat, _store_row_sums, _vec

# type -> its kind (kquants.TYPES) and bytes per block
KINDS = {"Q4_0": (0, 18), "Q4_1": (1, 20), "Q8_0": (2, 34), "Q5_0": (3, 22), "Q5_1": (4, 24),
         "Q4_K": (8, 144), "Q5_K": (9, 176), "Q6_K": (10, 210)}
TILES = (4, 2, 1)
_OUT_CHUNK = 64  # weight rows kept in cache while every tile of input rows passes

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _ptr(builder, p, off):
    """Byte pointer p + off (an int or an index value)."""
    return builder.gep(p, [off if isinstance(off, ir.Value) else ir.Constant(_I64, off)])


def _bytes(builder, p, n: int):
    return builder.load(builder.bitcast(p, _vec(_I8, n).as_pointer()), align=1)


def _half(builder, p):
    return _load_scale(builder, builder.bitcast(p, _I16.as_pointer()), True)


def _byte(builder, p, signed: bool = False):
    v = builder.load(p)
    return builder.sext(v, _I32) if signed else builder.zext(v, _I32)


# The inputs of each 32-block's four 8-input quarters, as Q5_0's and Q5_1's codes come out of in-lane unpacks of
# words (_unpack); x is permuted to match (permute_nibbles)
NIBBLE_ORDER = np.array([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15,
                         16, 17, 18, 19, 24, 25, 26, 27, 20, 21, 22, 23, 28, 29, 30, 31])


def _nibble_words(builder, p, qh):
    """Q5_0 / Q5_1: 16 bytes at p -> (low nibbles, high nibbles) as <16 x i16>, word i of each input i (+ 16),
    with the fifth bits of the uint32 at qh (bit i for input i)."""
    v16 = _vec(_I16, 16)
    words = builder.zext(_bytes(builder, p, 16), v16)
    halves = [builder.and_(words, ir.Constant(v16, [15] * 16)), builder.lshr(words, ir.Constant(v16, [4] * 16))]
    one = ir.Constant(v16, [1 << i for i in range(16)])
    for h in range(2):
        word = builder.load(builder.bitcast(_ptr(builder, qh, 2 * h), _I16.as_pointer()), align=1)
        set_ = builder.icmp_unsigned("!=", builder.and_(_splat(builder, word, 16), one), ir.Constant(v16, [0] * 16))
        fifth = builder.select(set_, ir.Constant(v16, [16] * 16), ir.Constant(v16, [0] * 16))
        halves[h] = builder.or_(halves[h], fifth)
    return halves


def _nibble_quarters(builder, p):
    """Q4_0 / Q4_1: the codes of the 16 bytes at p as four <8 x i32> quarters in input order: each byte widened to
    a dword, its low nibble input j, its high one 16 + j. (The 5-bit types take the word unpacks instead: their
    fifth bits cost fewer operations on 16 words than on 8 dwords, 7.5 against 6.6 Gweights/s; here the dwords
    measured 12.9 against 9.9.)"""
    v8 = _vec(_I32, 8)
    dwords = [builder.zext(_bytes(builder, _ptr(builder, p, 8 * h), 8), v8) for h in range(2)]
    return [builder.and_(d, ir.Constant(v8, [15] * 8)) for d in dwords] + \
        [builder.lshr(d, ir.Constant(v8, [4] * 8)) for d in dwords]


def _unpack(builder, halves):
    """Two <16 x i16> halves of 32 codes (word i: input i, 16 + i) -> four <8 x i32> quarters in NIBBLE_ORDER, by
    vpunpcklwd / vpunpckhwd with zero (in-lane: no lane-crossing shuffles)."""
    zero = ir.Constant(_vec(_I16, 16), [0] * 16)
    out = []
    for half in halves:
        for base in (0, 4):
            mask = [k for j in range(4) for k in (base + j, 16 + base + j)]
            mask += [k + 8 for k in mask]
            out.append(builder.bitcast(builder.shuffle_vector(half, zero, ir.Constant(_vec(_I32, 16), mask)),
                                       _vec(_I32, 8)))
    return out


def _block32(builder, kind: int, bp):
    """A 32-element block at bp: (codes: Q8_0's <32 x i8>, the others' four <8 x i32> quarters, in input order
    but Q5_0's / Q5_1's in NIBBLE_ORDER; [scale]; bias or None)."""
    d = _half(builder, bp)
    if kind == 2:  # Q8_0: d, qs[32] (int8)
        return _bytes(builder, _ptr(builder, bp, 2), 32), [d], None
    q0 = {0: 2, 1: 4, 3: 6, 4: 8}[kind]  # Q5_0 / Q5_1: the qh word just before the nibbles
    if kind in (3, 4):
        codes = _unpack(builder, _nibble_words(builder, _ptr(builder, bp, q0), _ptr(builder, bp, q0 - 4)))
    else:
        codes = _nibble_quarters(builder, _ptr(builder, bp, q0))
    if kind in (1, 4):  # Q4_1 / Q5_1: d, m, ...: w = d * q + m
        return codes, [d], _half(builder, _ptr(builder, bp, 2))
    # Q4_0 / Q5_0: w = d * (q - 8 or 16), taken as d * q - 8 or 16 * d (both exact in float32): unsigned codes
    # convert faster, and the bias costs one multiply-add for all rows of a tile
    return codes, [d], builder.fmul(d, ir.Constant(_F32, -8.0 if kind == 0 else -16.0))


def _k_scale_min(builder, q, s):
    """Q4_K / Q5_K: the 6-bit scale and min of sub-block s (i64, 0..7) from the 12 bytes at q, as i32."""
    s4 = builder.and_(s, ir.Constant(_I64, 3))
    a, m, h = (_byte(builder, builder.gep(q, [builder.add(s4, ir.Constant(_I64, k))])) for k in (0, 4, 8))
    c = lambda v: ir.Constant(_I32, v)  # noqa: E731
    small = builder.icmp_unsigned("<", s, ir.Constant(_I64, 4))
    sc = builder.select(small, builder.and_(a, c(63)),
                        builder.or_(builder.and_(h, c(15)), builder.shl(builder.lshr(a, c(6)), c(4))))
    mn = builder.select(small, builder.and_(m, c(63)),
                        builder.or_(builder.lshr(h, c(4)), builder.shl(builder.lshr(m, c(6)), c(4))))
    return sc, mn


def _dwords32(builder, p, shift, mask: int):
    """(byte >> shift) & mask of the 32 bytes at p as four <8 x i32> quarters in input order (each 8 bytes widened
    to dwords: Q4_K 11.1 Gweights/s one row, against 8.2 through words and unpacks); shift an i64 value."""
    v8 = _vec(_I32, 8)
    sv = _splat(builder, builder.trunc(shift, _I32), 8)
    return [builder.and_(builder.lshr(builder.zext(_bytes(builder, _ptr(builder, p, 8 * q), 8), v8), sv),
                         ir.Constant(v8, [mask] * 8)) for q in range(4)]


def _block_k(builder, kind: int, bp, s):
    """32-block s (i64, 0..7) of the K-quant superblock at bp: (codes as four <8 x i32> quarters in input order,
    scales, bias or None)."""
    i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    four = ir.Constant(_vec(_I32, 8), [4] * 8)
    if kind == 10:  # Q6_K: ql[128] qh[64] scales[16] (int8) d; 32-block s = 4 j + k
        j, k = builder.lshr(s, i64(2)), builder.and_(s, i64(3))
        ql = _ptr(builder, bp, builder.add(builder.mul(j, i64(64)), builder.mul(builder.and_(k, i64(1)), i64(32))))
        lo = _dwords32(builder, ql, builder.mul(builder.lshr(k, i64(1)), i64(4)), 15)
        qh = _ptr(builder, bp, builder.add(builder.mul(j, i64(32)), i64(128)))
        hi = _dwords32(builder, qh, builder.mul(k, i64(2)), 3)
        minus = ir.Constant(_vec(_I32, 8), [32] * 8)
        codes = [builder.sub(builder.or_(a, builder.shl(b, four)), minus) for a, b in zip(lo, hi)]
        d = _half(builder, _ptr(builder, bp, 208))
        sp = _ptr(builder, bp, builder.add(builder.mul(s, i64(2)), i64(192)))
        scales = [builder.fmul(d, builder.sitofp(_byte(builder, _ptr(builder, sp, t), True), _F32)) for t in (0, 1)]
        return codes, scales, None
    # Q4_K: d dmin scales[12] qs[128]; Q5_K: d dmin scales[12] qh[32] qs[128]; 32-block s = 2 j + t
    d, dmin = _half(builder, bp), _half(builder, _ptr(builder, bp, 2))
    qs = _ptr(builder, bp, builder.add(builder.mul(builder.lshr(s, i64(1)), i64(32)), i64(16 if kind == 8 else 48)))
    sc, mn = _k_scale_min(builder, _ptr(builder, bp, 4), s)
    scale = builder.fmul(d, builder.uitofp(sc, _F32))
    bias = builder.fsub(ir.Constant(_F32, -0.0), builder.fmul(dmin, builder.uitofp(mn, _F32)))
    codes = _dwords32(builder, qs, builder.mul(builder.and_(s, i64(1)), i64(4)), 15)
    if kind == 9:
        fifth = _dwords32(builder, _ptr(builder, bp, 16), s, 1)
        codes = [builder.or_(a, builder.shl(b, four)) for a, b in zip(codes, fifth)]
    return codes, [scale], bias


def _block(builder, kind: int, wrow, b, s: int):
    """A 32-block of a weight row at wrow: (four <8 x float> code quarters, scales, bias or None). 32-element
    types: block b (i64); K-quants: 32-block s (a constant, 0..7) of superblock b."""
    size = KINDS_BY_KIND[kind]
    bp = _ptr(builder, wrow, builder.mul(b, ir.Constant(_I64, size)))
    if kind < 8:
        codes, scales, bias = _block32(builder, kind, bp)
    else:
        codes, scales, bias = _block_k(builder, kind, bp, ir.Constant(_I64, s))
    if kind != 2:  # four <8 x i32> quarters already
        return [builder.sitofp(c, _vec(_F32, 8)) for c in codes], scales, bias
    f = builder.sitofp(codes, _vec(_F32, 32))  # Q8_0's bytes
    quarters = [builder.shuffle_vector(f, f, ir.Constant(_vec(_I32, 8), list(range(8 * k, 8 * k + 8))))
                for k in range(4)]
    return quarters, scales, bias


KINDS_BY_KIND = {kind: size for kind, size in KINDS.values()}


def _row_dot(builder, quarters, scales, xp):
    """<8 x float>: the 32-block's codes against the 32 float inputs at xp, times its scale(s)."""
    v8 = _vec(_F32, 8)
    xs = [builder.load(builder.bitcast(builder.gep(xp, [ir.Constant(_I64, 8 * k)]), v8.as_pointer()), align=4)
          for k in range(4)]
    m = [builder.fmul(c, x, flags=_FP) for c, x in zip(quarters, xs)]
    lo = builder.fadd(m[0], m[1], flags=_FP)
    hi = builder.fadd(m[2], m[3], flags=_FP)
    if len(scales) == 2:  # Q6_K: a scale per 16 inputs
        lo = builder.fmul(lo, _splat(builder, scales[0], 8), flags=_FP)
        return builder.fadd(lo, builder.fmul(hi, _splat(builder, scales[1], 8), flags=_FP), flags=_FP)
    return builder.fmul(builder.fadd(lo, hi, flags=_FP), _splat(builder, scales[0], 8), flags=_FP)


def _tile_ir(context, builder, at, args, kind: int, R: int):
    """IR for y[yoff + r * ystride], r < R (see _tile)."""
    (w_, woff_, x_, r0_, rows_, xs_, y_, yoff_, ystr_, nblk_) = args
    idx = woff_.type

    def base(i, arg, off):
        return builder.gep(context.make_array(at[i])(context, builder, arg).data, [off])

    wrow = base(0, w_, woff_)
    n = builder.mul(nblk_, ir.Constant(idx, 32))
    xrows = [base(2, x_, builder.mul(builder.add(r0_, ir.Constant(idx, r)), n)) for r in range(R)]
    scol = base(5, xs_, r0_)  # the sums of 32-block b, rows r0..: scol[b * rows ..]
    nacc = 2 if R == 1 else 1  # independent accumulators: a lone row's blocks do not wait on each other
    unroll = 8 if kind >= 8 else 2 * nacc  # 32-blocks a loop step: a K-quant superblock (its shifts constants)
    v8, vR = _vec(_F32, 8), _vec(_F32, R)
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(v8, None)) for _ in range(R)] for _ in range(nacc)]
    bacc = cgutils.alloca_once_value(builder, ir.Constant(vR, None))

    def block(b, a, wb, s):
        quarters, scales, bias = _block(builder, kind, wrow, wb, s)
        if bias is not None:
            sp = builder.gep(scol, [builder.mul(b, rows_)])
            sv = builder.load(builder.bitcast(sp, vR.as_pointer()), align=4)
            t = builder.fmul(sv, _splat(builder, bias, R), flags=_FP)
            builder.store(builder.fadd(builder.load(bacc), t, flags=_FP), bacc)
        for r in range(R):
            xp = builder.gep(xrows[r], [builder.shl(b, ir.Constant(idx, 5))])
            t = _row_dot(builder, quarters, scales, xp)
            builder.store(builder.fadd(builder.load(acc[a][r]), t, flags=_FP), acc[a][r])

    step = ir.Constant(idx, unroll)
    with cgutils.for_range(builder, builder.udiv(nblk_, step)) as loop:
        b0 = builder.mul(loop.index, step)
        for u in range(unroll):
            b = builder.add(b0, ir.Constant(idx, u))
            block(b, u % nacc, loop.index if kind >= 8 else b, u)
    if kind < 8:  # the blocks left over (K-quant rows are whole superblocks)
        done = builder.sub(nblk_, builder.urem(nblk_, step))
        with cgutils.for_range(builder, builder.urem(nblk_, step)) as loop:
            b = builder.add(done, loop.index)
            block(b, 0, b, 0)
    _store_row_sums(builder, acc, bacc, base(6, y_, yoff_), ystr_)


@intrinsic
def _tile(typingctx, kind, R, w, woff, x, r0, rows, xs, y, yoff, ystride, nblk):
    """tile(kind, R, w, woff, x, r0, rows, xs, y, yoff, ystride, nblk) sets y[yoff + r * ystride] for r < R (R in
    TILES): the weight row of type `kind` whose bytes start at woff in w, against input rows r0 + r of x [rows,
    nblk * 32] (float32, C order), xs [nblk, rows] their sums per 32 inputs. kind and R are run-time values: each
    (kind, R) is its own loop in the IR."""
    sig = types.none(types.intp, types.intp, w, types.intp, x, types.intp, types.intp, xs, y, types.intp,
                     types.intp, types.intp)

    def codegen(context, builder, signature, args):
        idx = args[0].type
        for k in sorted(KINDS_BY_KIND):
            for r in TILES:
                case = builder.and_(builder.icmp_signed("==", args[0], ir.Constant(idx, k)),
                                    builder.icmp_signed("==", args[1], ir.Constant(idx, r)))
                with builder.if_then(case):
                    _tile_ir(context, builder, signature.args[2:], args[2:], k, r)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _tile_rows(left: int) -> int:
    return 4 if left >= 4 else (2 if left >= 2 else 1)


@njit(cache=True, nogil=True)
def rows_product(kind, w, x, xs, y, ycol, o0, o1):
    """y[:, ycol + o] = x @ W[o] for o in o0..o1 (y float32, C order; W: w [out, row bytes] of type kind; xs:
    block_sums(x); x in NIBBLE_ORDER, permute_nibbles(x), for the kinds NIBBLES marks): _OUT_CHUNK weight rows
    at a time stay in cache while each tile of input rows passes them."""
    rows, n = x.shape
    nblk, rb = n // 32, w.shape[1]
    for c0 in range(o0, o1, _OUT_CHUNK):
        c1 = min(o1, c0 + _OUT_CHUNK)
        r = 0
        while r < rows:
            R = _tile_rows(rows - r)
            for o in range(c0, c1):
                _tile(kind, R, w, o * rb, x, r, rows, xs, y, r * y.shape[1] + ycol + o, y.shape[1], nblk)
            r += R


def block_sums(x2: np.ndarray) -> np.ndarray:
    """x2 [rows, in] float32 -> [in / 32, rows]: the sums of each 32 inputs, what rows_product's xs is."""
    rows = x2.shape[0]
    return np.ascontiguousarray(x2.reshape(rows, -1, 32).sum(axis=-1, dtype=np.float32).T)


@njit(cache=True, nogil=True)
def _sums(x):
    """block_sums in numba."""
    rows, n = x.shape
    xs = np.zeros((n // 32, rows), np.float32)
    for r in range(rows):
        for b in range(n // 32):
            t = np.float32(0)
            for i in range(32):
                t += x[r, b * 32 + i]
            xs[b, r] = t
    return xs


NIBBLES = np.array([k in (3, 4) for k in range(11)])  # kinds whose input is in NIBBLE_ORDER: Q5_0, Q5_1


@njit(cache=True, nogil=True)
def permute_nibbles(x):
    """x [rows, n] with each 32 inputs in NIBBLE_ORDER, what rows_product takes for Q4_0, Q4_1, Q5_0, Q5_1."""
    rows, n = x.shape
    out = np.empty_like(x)
    for r in range(rows):
        for b in range(0, n, 32):
            for p in range(32):
                out[r, b + p] = x[r, b + NIBBLE_ORDER[p]]
    return out


@njit(cache=True, nogil=True)
def segments_product(kinds, starts, blocks, x, y, o0, o1):
    """y[:, o] for o in o0..o1 of a fused product: segment i (type kinds[i], its blocks blocks[i], a tuple of
    read-only arrays) gives y's columns starts[i]..starts[i + 1]. The input's block sums and its permuted copy are
    formed here, in the same call."""
    xs = _sums(x)
    xp = x
    for k in kinds:
        if NIBBLES[k]:
            xp = permute_nibbles(x)
            break
    for i in range(len(kinds)):
        s0 = starts[i]
        a, b = max(o0, s0), min(o1, starts[i + 1])
        if a < b:
            rows_product(kinds[i], blocks[i], xp if NIBBLES[kinds[i]] else x, xs, y, s0, a - s0, b - s0)
