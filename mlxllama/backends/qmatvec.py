"""Fused products over MLX's 4-bit and 8-bit affine weights (numba), in an octet layout.

The layout. PackedLinear takes a loader's packed weight (uint32 words [out, in * bits / 32]: with 4 bits, byte k of
a row holds inputs 2k in its low nibble and 2k + 1 in its high one; scales and biases [out, in / group], float16 or
float32) and lays each run of eight output rows (an octet) side by side, once, at load: the same codes, scales and
biases, reordered, never requantized. In an octet, every 32 bytes are 16 little-endian 16-bit words, and word
2k + e holds row k's codes of inputs a + 2j + e (j = 0 .. 16 / bits - 1, code j at bit j * bits; a steps by 8
inputs with 4 bits, by 4 with 8). An octet's scales (and biases) are [groups, 8], row k's in lane k. The arrays
keep their 2-D shapes ([rows, bytes a row], [rows, groups]), rows padded with zeros to a multiple of eight.
Resident memory is the file's: symmetric biases (GGUF's Q4_0 and Q8_0) are formed from the scales, not kept.

The product. Each input row is rounded per block of 32 to int16: x ~ dx_b * xq, |xq| <= 32767 (or to int8, |xq| <=
127, llama.cpp's q8 steps: MLXLLAMA_KERNEL_ACT=8), with s_b = dx_b * sum(xq_b) kept for the biases; then
    y[o] = sum_b scale[o, g(b)] * dx_b * (q[o, b] . xq_b) + bias[o, g(b)] * s_b.
int16 inputs: a code word shifted and masked is a <16 x i16> of two adjacent inputs of the octet's eight rows. One
multiply-add of pairs (vpmaddwd; vpdpwssd) against one input row's two values, broadcast, adds to eight int32 lanes,
lane k row k's sum: no horizontal sums. int8 inputs: a 32-bit lane of the words holds four 8-bit codes of its row,
or eight 4-bit ones (its low nibbles four inputs, its high nibbles four more), so one multiply-add of byte quads
(vpdpbusd; on avx2 vpmaddubsw, into int16 sums for 4-bit codes) covers four inputs of eight rows: twice the pairs'
work an instruction. quantize_input writes the int8 inputs in the order of those quads (_quad_slot). A block's eight
sums are scaled (the octet's scales times dx) in one multiply-add and its bias terms added in another, and each
input row's eight results are stored together. R input rows (a tile: 8, 4, 2 or 1; at most 4 where the CPU has
16 vector registers: tallest_tile) share every decoded code vector, so a batch reads and decodes the weights once
per tile of rows, and a lone row (batch-1 decode) runs the same loop with its sums split over independent
accumulators.
(One Zen 4 core, weights in cache, against the row-major layout's per-row pairwise sums: SmolLM2's 1536 x 576, 8
rows, 63 -> 90 G multiply-adds/s; 4096 x 4096, 8 rows, 41 -> 79; one row 23-33 -> 46-48; with int8 inputs 150, 118
and 77-80; benchmarks/README.md.)

The multiply-add is LLVM IR written per instruction set, chosen at run time from the CPU's features (llvmlite's host
features), never at install:
  "vnni"     AVX-512 VNNI or AVX-VNNI: vpdpwssd (vpdpbusd), the products added into the sums in one instruction.
  "avx2"     vpmaddwd (vpmaddubsw), then an add (kept in order: _kept).
  "generic"  plain vector IR (products widened to int32) that any CPU's LLVM backend compiles.
MLXLLAMA_KERNEL_ISA=generic (or avx2, vnni) forces a path; one the CPU lacks falls back to the best it has, and a
path is used only after it computed a small product close to numpy's (kernel_isa). Each path is its own signature of
the compiled functions, so numba's on-disk cache (cache=True) keeps them apart.

Accuracy: rounding x is at most half a step per element (max|x_b| / 65534, or / 254 with MLXLLAMA_KERNEL_ACT=8), so
each output is within sum_b max|x_b| / (2 * lim) * sum_{i in b} |w_i| (plus float32 sums) of the float32 product;
tests/test_qmatvec.py checks this bound on every path. On SmolLM2-135M Q4_1 (test_smollm2_logit_error) decode
logits differ from float32 mode's by at most 4e-4 of the largest logit with int16 inputs and greedy tokens equal the
transformers reference; with int8 inputs by up to 7e-2 (activation outliers: a block's largest value is ~5.6x its
root mean square), and greedy tokens leave the reference after a few tokens on two of its five prompts. That is why
int16 is the default, though int8 runs about 1.6-1.9x the multiply-adds a second (a speed mode, as llama.cpp
computes: benchmarks/compare.py's numpy-fused8).

Long prefills take the same tiles: on this kernel they beat dequantized blocks and BLAS at every row count measured
(numpy_kernels.fused_matmul). dequantize_rows gives the exact float32 weights (embedding rows, tests).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from typing import NamedTuple

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.np.numpy_support import from_dtype as numba_type
from numba.core import cgutils
from numba.extending import intrinsic

from .numpy_threads import PREFETCH

logger = logging.getLogger(__name__)

BITS = (4, 8)
ISAS = ("vnni", "avx2", "generic")
TILES = (8, 4, 2, 1)  # input rows sharing each decoded code vector (up to TALLEST)
OCTET = 8  # output rows laid side by side
_BLOCK = 32  # inputs per activation scale; every MLX group size (32, 64, 128) is a multiple
_OUT_TILES = 8  # octets (~300 KB at 4096 inputs, 4 bits) kept in cache while every tile of input rows passes
_CHAINS = 4  # independent int32 sums a block keeps over a tile's rows (one row: 4 chains of its pair products)

_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()


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


def tallest_tile(features: dict | None = None) -> int:
    """The most input rows a tile takes: 8 where the compiled code has 32 vector registers (AVX-512; arm64), 4 with
    16 (x86 without AVX-512), where eight rows' sums, the code vectors and the broadcast inputs do not fit and
    spill (one Zen 3 core, int16 inputs: 8-row tiles 47 G multiply-adds/s, 4-row 55; int8 70 and 88)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return 8
    f = _host_features() if features is None else features
    return 8 if f.get("avx512f") else 4


TALLEST = tallest_tile()


@functools.cache
def _warn_once(message: str) -> None:
    """A setting's warning once per process, not once per weight it is read for."""
    logger.warning(message)


def choose_isa(features: dict | None = None) -> str:
    """The path used: MLXLLAMA_KERNEL_ISA where this CPU has it, else the best it has."""
    have = available_isas(features)
    want = os.environ.get("MLXLLAMA_KERNEL_ISA", "").strip().lower()
    if want and want != "auto":
        if want in have:
            return want
        _warn_once(f"MLXLLAMA_KERNEL_ISA={want} is not available on this CPU ({', '.join(have)}); using {have[0]}")
    return have[0]


# -- IR helpers -------------------------------------------------------------------------------------------------

def _call(builder, name: str, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


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


# (path, input bits) -> the dtype of an empty array that names them to the compiled functions
_TAGS = {("vnni", 16): np.uint8, ("avx2", 16): np.uint16, ("generic", 16): np.uint32,
         ("vnni", 8): np.int8, ("avx2", 8): np.int16, ("generic", 8): np.int32}
_TAG_PATHS = {numba_type(np.dtype(t)): key for key, t in _TAGS.items()}


def _by_bits_and_rows(isa, tiles, emit):
    """The codegen of a tile intrinsic whose args[1] and args[2] are bits and R at run time: one loop in the IR
    per (bits in BITS, R in tiles(bits)), emit(context, builder, arg types, args, isa, bits, R) writing each,
    over the arguments after R (isa: whatever emit takes to name the path)."""
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


# -- the octet layout -------------------------------------------------------------------------------------------

def padded_rows(rows: int) -> int:
    """Rows held for `rows` output rows: whole octets."""
    return -(-rows // OCTET) * OCTET


@njit(cache=True, nogil=True)
def _repack(src, bits, dst):
    """MLX's words src [out, in * bits / 32] (uint32) -> the octet layout's words dst [padded out, in * bits / 16]
    (uint16, zeros beyond out): a source word covers one step of a (8 inputs with 4 bits, 4 with 8), and gives
    row k's two words 2k and 2k + 1, the codes of its even and odd inputs."""
    rows, steps = src.shape
    flat = dst.reshape(dst.size)
    for o in range(rows):
        at = (o // OCTET) * OCTET * dst.shape[1] + 2 * (o % OCTET)
        for m in range(steps):
            w = np.uint32(src[o, m])
            flat[at + 16 * m] = _evens(w, bits)
            flat[at + 16 * m + 1] = _evens(w >> np.uint32(bits), bits)


@njit(inline="always")
def _evens(w, bits):
    """The codes at the even places of w (codes 0, 2, 4, 6 with 4 bits; 0, 2 with 8) side by side in 16 bits."""
    if bits == 4:
        x = w & np.uint32(0x0F0F0F0F)
        x = (x | (x >> np.uint32(4))) & np.uint32(0x00FF00FF)
    else:
        x = w & np.uint32(0x00FF00FF)
    return np.uint16((x | (x >> np.uint32(8))) & np.uint32(0xFFFF))


def octet_rows(a: np.ndarray) -> np.ndarray:
    """Scales or biases [out, groups] -> the octet layout, as [padded out, groups]: an octet's [groups, 8]."""
    rows, groups = a.shape
    pad = np.zeros((padded_rows(rows), groups), a.dtype)
    pad[:rows] = a
    return np.ascontiguousarray(pad.reshape(-1, OCTET, groups).transpose(0, 2, 1)).reshape(-1, groups)


def _dp(builder, isa: str, acc, codes, x):
    """acc + the pair products of two <16 x i16>, as <8 x i32> (vnni: vpdpwssd; avx2: vpmaddwd and an add)."""
    v8 = _vec(_I32, 8)
    if isa == "vnni":
        return _call(builder, "llvm.x86.avx512.vpdpwssd.256", v8,
                     [acc, builder.bitcast(codes, v8), builder.bitcast(x, v8)])
    if isa == "avx2":
        return _kept(builder, builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", v8, [codes, x])))
    m = builder.mul(builder.sext(codes, _vec(_I32, 16)), builder.sext(x, _vec(_I32, 16)))
    even = builder.shuffle_vector(m, m, ir.Constant(v8, list(range(0, 16, 2))))
    odd = builder.shuffle_vector(m, m, ir.Constant(v8, list(range(1, 16, 2))))
    return builder.add(acc, builder.add(even, odd))


def _kept(builder, v):
    """v through an empty inline asm: the same register, opaque to LLVM. Without it LLVM regroups a block's integer
    adds, forms every product first and, with 16 vector registers (AVX2 without AVX-512), spills them to the stack
    and adds them up afterwards."""
    return builder.call(ir.InlineAsm(ir.FunctionType(v.type, [v.type]), "", "=x,0"), [v])


class _Octet(NamedTuple):
    """What a block of _octet_ir needs: the octet's words, scales and biases, the tile's input pairs (int32 view of
    its first row), a row's pairs, the dx and s columns, and the float accumulators (one <8 x float> per row)."""
    words: object
    scales: object
    biases: object
    half: bool
    symmetric: object
    bfac: object
    shift: object
    pairs: object
    row_pairs: object
    dcol: object
    scol: object
    rows: object
    acc: list
    prefetch: object


def _octet_ir(context, builder, at, args, path: tuple, bits: int, R: int):
    """IR of _octet for one (bits, R): the blocks in a loop, then each row's eight results stored."""
    (w_, t_, xq_, r0_, rows_, dxs_, sc_, bi_, bfac_, y_, ystr_, keep_, nblk_, shift_, pf_) = args

    def data(i, arg):
        return context.make_array(at[i])(context, builder, arg).data

    c = lambda v: ir.Constant(t_.type, v)  # noqa: E731
    n, groups = builder.mul(nblk_, c(_BLOCK)), builder.ashr(nblk_, shift_)
    dcol = builder.gep(data(5, dxs_), [r0_])
    octet = builder.mul(t_, c(OCTET))
    o = _Octet(builder.gep(data(0, w_), [builder.mul(octet, builder.mul(nblk_, c(4 * bits)))]),
               builder.gep(data(6, sc_), [builder.mul(octet, groups)]),
               builder.gep(data(7, bi_), [builder.mul(octet, groups)]), at[6].dtype == types.uint16,
               builder.fcmp_ordered("!=", bfac_, ir.Constant(_F32, 0.0)), bfac_, shift_,
               builder.bitcast(builder.gep(data(2, xq_), [builder.mul(r0_, n)]), _I32.as_pointer()),
               builder.udiv(n, c(2)), dcol, builder.gep(dcol, [builder.mul(nblk_, rows_)]), rows_,
               [cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 8), None)) for _ in range(R)], pf_)
    with cgutils.for_range(builder, nblk_) as loop:
        _octet_block(builder, o, path, bits, R, loop.index)
    yrow = builder.gep(data(9, y_), [builder.add(builder.mul(r0_, ystr_), octet)])
    for r, a in enumerate(o.acc):
        _store_lanes(builder, builder.load(a), builder.gep(yrow, [builder.mul(ystr_, c(r))]), keep_)


def _octet_block(builder, o: _Octet, path: tuple, bits: int, R: int, b):
    """IR: block b of the octet against the tile's R rows, into o.acc (path: the instruction set and input bits)."""
    c = lambda v: ir.Constant(b.type, v)  # noqa: E731
    isa, act = path
    _prefetch(builder, o, bits, b)
    sums = (_quad_sums if act == 8 else _pair_sums)(builder, o, isa, bits, R, b)
    g = builder.mul(builder.ashr(b, o.shift), c(OCTET))
    scale = _load_scale(builder, builder.gep(o.scales, [g]), o.half, 8)
    bias = builder.select(o.symmetric, builder.fmul(scale, _splat(builder, o.bfac, 8)),
                          _load_scale(builder, builder.gep(o.biases, [g]), o.half, 8))
    if _signed_codes(isa, act, bits):  # the sums took codes - 128: add 128 * scale * sum(x)
        bias = builder.fadd(bias, builder.fmul(scale, ir.Constant(_vec(_F32, 8), [128.0] * 8)))
    for r, a in enumerate(o.acc):
        cell = builder.add(builder.mul(b, o.rows), c(r))
        dx, sx = builder.load(builder.gep(o.dcol, [cell])), builder.load(builder.gep(o.scol, [cell]))
        f = builder.fadd(builder.load(a), builder.fmul(builder.sitofp(sums[r], _vec(_F32, 8)),
                                                       builder.fmul(scale, _splat(builder, dx, 8), flags=_FP),
                                                       flags=_FP), flags=_FP)
        builder.store(builder.fadd(f, builder.fmul(bias, _splat(builder, sx, 8), flags=_FP), flags=_FP), a)


def _prefetch(builder, o: _Octet, bits: int, b) -> None:
    """IR: each cache line o.prefetch bytes past block b's codes (bits * 32 bytes) asked for, to read, kept in all
    levels (a prefetch past the array's end does not fault; 0 asks for the lines being read: no effect)."""
    c, i8p = (lambda v: ir.Constant(b.type, v)), ir.IntType(8).as_pointer()  # noqa: E731
    flags = [ir.Constant(_I32, v) for v in (0, 3, 1)]  # read, highest locality, data
    start = builder.add(builder.mul(b, c(bits * 32)), o.prefetch)
    for line in range(bits * 32 // 64):
        ahead = builder.gep(o.words, [builder.add(start, c(64 * line))])
        _call(builder, "llvm.prefetch.p0i8", ir.VoidType(), [builder.bitcast(ahead, i8p)] + flags)


def _code_vectors(builder, o: _Octet, bits: int, b, m: int):
    """The 32-byte step m of block b of the octet's words, as an <8 x i32>."""
    c = lambda v: ir.Constant(b.type, v)  # noqa: E731
    wp = builder.gep(o.words, [builder.mul(builder.add(builder.mul(b, c(bits)), c(m)), c(32))])
    return builder.load(builder.bitcast(wp, _vec(_I32, 8).as_pointer()), align=2)


def _pair_sums(builder, o: _Octet, isa: str, bits: int, R: int, b) -> list:
    """IR: each row's eight int32 sums of block b against int16 inputs (pairs of adjacent inputs)."""
    c = lambda v: ir.Constant(b.type, v)  # noqa: E731
    v16, per = _vec(_I16, 16), 16 // bits
    chains = max(1, _CHAINS // R)
    sums = [[ir.Constant(_vec(_I32, 8), None)] * chains for _ in range(R)]
    mask = ir.Constant(v16, [(1 << bits) - 1] * 16)
    for m in range(bits):  # 32-byte steps a block
        words = builder.bitcast(_code_vectors(builder, o, bits, b, m), v16)
        for j in range(per):
            codes = words if j == 0 else builder.lshr(words, ir.Constant(v16, [bits * j] * 16))
            codes = codes if bits * (j + 1) == 16 else builder.and_(codes, mask)
            q = m * per + j  # the pair's place in the block
            for r in range(R):
                pair = builder.add(builder.mul(o.row_pairs, c(r)), builder.add(builder.mul(b, c(16)), c(q)))
                x = builder.bitcast(_splat(builder, builder.load(builder.gep(o.pairs, [pair]), align=4), 8), v16)
                sums[r][q % chains] = _dp(builder, isa, sums[r][q % chains], codes, x)
    return [_total(builder, chain) for chain in sums]


def _total(builder, chain: list):
    out = chain[0]
    for v in chain[1:]:
        out = builder.add(out, v)
    return out


def _quad_sums(builder, o: _Octet, isa: str, bits: int, R: int, b) -> list:
    """IR: each row's eight int32 sums of block b against int8 inputs (quads: quantize_input's order for these
    bits). A 32-bit lane of the octet's words holds four codes of its row as bytes (8 bits), or eight as nibbles
    (4 bits: the low nibbles are one quad, the high ones the next)."""
    c = lambda v: ir.Constant(b.type, v)  # noqa: E731
    v8 = _vec(_I32, 8)
    chains = max(1, _CHAINS // R)
    narrow = isa == "avx2" and bits == 4  # vpmaddubsw's int16 sums hold a block of 4-bit codes (8 * 3810 < 2**15)
    sums = [[ir.Constant(_vec(_I16, 16) if narrow else v8, None)] * chains for _ in range(R)]
    low = ir.Constant(v8, [0x0F0F0F0F] * 8)
    for m in range(bits):
        words = _code_vectors(builder, o, bits, b, m)
        signs = None
        if _signed_codes(isa, 8, bits):
            signs = builder.bitcast(builder.xor(words, ir.Constant(v8, [0x80808080] * 8)), _vec(ir.IntType(8), 32))
            words = _call(builder, "llvm.abs.v32i8", signs.type, [signs, ir.Constant(ir.IntType(1), 0)])
        quads = [builder.and_(words, low), builder.and_(builder.lshr(words, ir.Constant(v8, [4] * 8)), low)] \
            if bits == 4 else [builder.bitcast(words, v8)]
        for j, codes in enumerate(quads):
            q = m * len(quads) + j  # the quad's place in the block (8 a block)
            for r in range(R):
                at = builder.add(builder.mul(o.row_pairs, c(r)), builder.add(builder.mul(b, c(8)), c(q)))
                x = _splat(builder, builder.load(builder.gep(o.pairs, [at]), align=4), 8)
                sums[r][q % chains] = _dq(builder, isa, narrow, sums[r][q % chains], codes, x, signs)
    totals = [_total(builder, chain) for chain in sums]
    return [_widened(builder, t) for t in totals] if narrow else totals


def _widened(builder, v16):
    """<16 x i16> -> <8 x i32>, adjacent pairs summed (vpmaddwd against ones)."""
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [v16, ir.Constant(_vec(_I16, 16), [1] * 16)])


def _signed_codes(isa: str, act: int, bits: int) -> bool:
    """Whether int8 inputs meet 8-bit codes less 128 (signed bytes): on avx2, whose vpmaddubsw would saturate on
    255 * 127 * 2 and not on 127 * 128 * 2."""
    return isa == "avx2" and act == 8 and bits == 8


def _dq(builder, isa: str, narrow: bool, acc, codes, x, signs=None):
    """acc + the products of unsigned bytes (codes, <8 x i32>) and signed ones (x), four to a lane: vnni's
    vpdpbusd; avx2 with 4-bit codes vpmaddubsw into int16 sums (narrow); avx2 with 8-bit codes less 128 (signs:
    those signed bytes, codes their magnitudes) vpmaddubsw of x with their signs, then vpmaddwd; else plain IR into
    <8 x i32>."""
    v8, b32 = _vec(_I32, 8), _vec(ir.IntType(8), 32)
    if isa == "vnni":
        return _call(builder, "llvm.x86.avx512.vpdpbusd.256", v8, [acc, codes, x])
    if isa == "avx2":
        xb = builder.bitcast(x, b32)
        if signs is not None:
            xb = _call(builder, "llvm.x86.avx2.psign.b", b32, [xb, signs])
        p = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [builder.bitcast(codes, b32), xb])
        return _kept(builder, builder.add(acc, p if narrow else _widened(builder, p)))
    m = builder.mul(builder.zext(builder.bitcast(codes, b32), _vec(_I32, 32)),
                    builder.sext(builder.bitcast(x, b32), _vec(_I32, 32)))
    for k in range(4):
        acc = builder.add(acc, builder.shuffle_vector(m, m, ir.Constant(v8, list(range(k, 32, 4)))))
    return acc


def _store_lanes(builder, v, ptr, keep):
    """IR: the eight floats of v at ptr, or the first `keep` of them (an octet's padded rows are not stored)."""
    full = builder.icmp_signed("==", keep, ir.Constant(keep.type, OCTET))
    with builder.if_else(full) as (whole, part):
        with whole:
            builder.store(v, builder.bitcast(ptr, _vec(_F32, 8).as_pointer()), align=4)
        with part:
            for k in range(OCTET - 1):
                with builder.if_then(builder.icmp_signed(">", keep, ir.Constant(keep.type, k))):
                    builder.store(builder.extract_element(v, ir.Constant(_I32, k)),
                                  builder.gep(ptr, [ir.Constant(keep.type, k)]))


@intrinsic
def _octet(typingctx, tag, bits, R, w, t, xq, r0, rows, dxs, scales, biases, bfac, y, ystride, keep, nblk, shift,
           prefetch):
    """_octet(tag, bits, R, w, t, xq, r0, rows, dxs, scales, biases, bfac, y, ystride, keep, nblk, shift, prefetch)
    sets y[(r0 + r) * ystride + 8 t + k] for r < R (R in TILES) and k < keep: octet t of the weight (w [rows, bytes a
    row], scales and biases [rows, groups], float32 or float16 bits, both in the octet layout; with bfac != 0 the
    biases are bfac * scales) against the rounded input rows r0 .. r0 + R - 1 of xq [rows, in] (int16), whose dx
    and s are dxs[0, b, r0 + r] and dxs[1, b, r0 + r] (dxs [2, nblk, rows]), on the path tag's dtype names. bits
    and R are run-time values: each (bits, R) is its own loop in the IR. Each block asks the cache for the codes
    `prefetch` bytes past its own (0: none)."""
    path = _TAG_PATHS[tag.dtype]
    sig = types.none(tag, types.intp, types.intp, w, types.intp, xq, types.intp, types.intp, dxs, scales, biases,
                     types.float32, y, types.intp, types.intp, types.intp, types.intp, types.intp)

    return sig, _by_bits_and_rows(path, lambda bits: [t for t in TILES if t <= TALLEST], _octet_ir)


_ROUNDER = np.float32(1.5 * 2 ** 23)


@njit(inline="always")
def _rint(v):
    """np.rint(v) for float32 |v| < 2**22 (ties to even, the default rounding), in adds a loop vectorizes: np.rint
    is a call per element."""
    return (v + _ROUNDER) - _ROUNDER


@njit(inline="always")
def running_max(x, i0: int, i1: int, magnitude: bool, floor):
    """max(floor, x[i0:i1]) (of |x| with magnitude) by four independent maxima: one running maximum waits on each
    compare, and without fastmath's no-NaN promise LLVM keeps such a loop scalar (300 scores: 133 -> 43 ns)."""
    m0 = m1 = m2 = m3 = floor
    i = i0
    while i + 4 <= i1:
        if magnitude:
            m0, m1 = max(m0, abs(x[i])), max(m1, abs(x[i + 1]))
            m2, m3 = max(m2, abs(x[i + 2])), max(m3, abs(x[i + 3]))
        else:
            m0, m1, m2, m3 = max(m0, x[i]), max(m1, x[i + 1]), max(m2, x[i + 2]), max(m3, x[i + 3])
        i += 4
    for t in range(i, i1):
        m0 = max(m0, abs(x[t]) if magnitude else x[t])
    return max(max(m0, m1), max(m2, m3))


@njit(inline="always")
def _quad_slot(i: int, bits: int) -> int:
    """Where input i of a block goes among its int8 inputs: in each 8 (4-bit codes) the order 0 4 1 5 2 6 3 7, in
    each 4 (8-bit) 0 2 1 3, the order of a 32-bit lane's codes (see _quad_sums)."""
    if bits == 4:
        return (i & ~7) + 2 * (i & 3) + ((i >> 2) & 1)
    return (i & ~3) + 2 * (i & 1) + ((i >> 1) & 1)


@njit(cache=True, nogil=True)
def quantize_input(x2, lim, bits, xq, dxs):
    """x2 [rows, in] float32 -> xq [rows, in] int16, |xq| <= lim; dxs [2, in / 32, rows]: dx and s per block and
    row, with xq * dx ~ x and s = dx * sum(xq) (the bias then multiplies the same rounded x as the codes do: the
    error is sum w * (x - dx xq), not scale * q * (...)). With lim <= 127 the values are int8, in the first half of
    each row's bytes, in the order the kernel's quads take for weights of `bits` (_quad_slot)."""
    rows, n = x2.shape
    quads = lim <= 127
    for r in range(rows):
        x, out = x2[r], xq[r]
        out8 = out.view(np.int8)
        for b in range(n // _BLOCK):
            s0 = b * _BLOCK
            m = running_max(x, s0, s0 + _BLOCK, True, np.float32(0))
            d = m / lim
            inv = lim / m if m > 0 else np.float32(0)
            t = np.int32(0)
            if quads:
                for i in range(s0, s0 + _BLOCK):
                    v = np.int32(_rint(x[i] * inv))
                    out8[_quad_slot(i, bits)] = v
                    t += v
            else:
                for i in range(s0, s0 + _BLOCK):
                    v = np.int32(_rint(x[i] * inv))
                    out[i] = v
                    t += v
            dxs[0, b, r] = d
            dxs[1, b, r] = d * np.float32(t)


@njit(inline="always")
def _group_shift(group_size: int) -> int:
    """log2 of the 32-input blocks in a scale group (32, 64 or 128 inputs)."""
    return 0 if group_size == 32 else (1 if group_size == 64 else 2)


@njit(inline="always")
def _tile_rows(r1: int, r: int) -> int:
    """The tile height for input rows r..r1: the largest of TILES up to TALLEST that fits."""
    left = r1 - r
    return 8 if left >= 8 and TALLEST >= 8 else (4 if left >= 4 else (2 if left >= 2 else 1))


@njit(cache=True, nogil=True)
def _rows(tag, w, scales, biases, bfac, bits, group_size, xq, dxs, y, o0, o1, prefetch):
    """y[:, o0:o1] on tag's path (o0 a multiple of OCTET): _OUT_TILES octets at a time stay in cache while each
    tile of input rows passes over them."""
    rows, n = xq.shape
    nblk, shift = n // _BLOCK, _group_shift(group_size)
    t1 = (o1 + OCTET - 1) // OCTET
    for c0 in range(o0 // OCTET, t1, _OUT_TILES):
        c1 = min(t1, c0 + _OUT_TILES)
        r = 0
        while r < rows:
            R = _tile_rows(rows, r)
            for t in range(c0, c1):
                _octet(tag, bits, R, w, t, xq, r, rows, dxs, scales, biases, bfac, y, y.shape[1],
                       min(OCTET, o1 - t * OCTET), nblk, shift, prefetch)
            r += R


@njit(cache=True, nogil=True)
def _product(tag, x2, lim, w, scales, biases, bfac, bits, group_size, xq, dxs, y, prefetch):
    """The whole product in one compiled call: the input rounded, then every output row."""
    quantize_input(x2, lim, bits, xq, dxs)
    _rows(tag, w, scales, biases, bfac, bits, group_size, xq, dxs, y, 0, y.shape[1], prefetch)


@njit(cache=True, nogil=True)
def dequantize_rows(words, scales, biases, bfac, bits, group_size, o0, o1, out):
    """Rows o0..o1 of the weight as float32 into out [o1 - o0, in] (C order): words are the octet layout's uint16
    [rows, in * bits / 16]; scales and biases float32 [rows, groups] in the octet layout (with bfac != 0 the
    biases are bfac * scales). scale * q + bias, rounded after the product and after the sum: the very weights
    quant.dequantize forms with float32 scales."""
    n, groups = out.shape[1], scales.shape[1]
    per, mask = 16 // bits, (1 << bits) - 1
    span = 2 * per  # inputs a 32-byte step
    flat, sflat, bflat = words.reshape(words.size), scales.reshape(scales.size), biases.reshape(biases.size)
    for o in range(o0, o1):
        t, k = o // OCTET, o % OCTET
        wbase, sbase = t * OCTET * words.shape[1] + 2 * k, t * OCTET * groups + k
        for g in range(groups):
            s = sflat[sbase + OCTET * g]
            bias = bfac * s if bfac != 0 else bflat[sbase + OCTET * g]
            for m in range(g * group_size // span, (g + 1) * group_size // span):
                for e in range(2):
                    v = flat[wbase + 16 * m + e]
                    for j in range(per):
                        q = np.float32((v >> (bits * j)) & mask)
                        out[o - o0, m * span + 2 * j + e] = q * s + bias


def drops_biases(parts: list) -> bool:
    """Whether PackedLinear forms these projections' biases from their scales instead of keeping them: every bias
    is -2**(bits - 1) times its scale (GGUF's Q4_0 and Q8_0)."""
    factor = np.float32(-(1 << (parts[0].bits - 1)))
    return all(_biases_are(p, factor) for p in parts)


def _biases_are(p, factor: np.float32, rows: int = 4096) -> bool:
    """Whether every bias of p is factor times its scale: told by a SymmetricWeight, else compared in parts of
    `rows` rows (a vocabulary-sized table's biases are never all widened at once)."""
    if getattr(p, "bias_factor", None) is not None:
        return np.float32(p.bias_factor) == factor
    for r in range(0, p.scales.shape[0], rows):
        scales = np.asarray(p.scales[r: r + rows], np.float32)
        if not np.array_equal(np.asarray(p.biases[r: r + rows], np.float32), factor * scales):
            return False
    return True


class PackedLinear:
    """Same-input quantized projections fused by output rows, in the octet layout (see the module doc): words as
    bytes [padded out, in * bits / 8], scales and biases [padded out, in / group] (float32, or float16 held as
    uint16 bits). Where every bias is -2**(bits - 1) times its scale (GGUF's Q4_0 and Q8_0), the biases are not
    kept: the kernel forms them from the scales. shape is (in, out), as numpy_ops' float32 matrices. isa: the kernel
    path (default: kernel_isa()); act: the input rounding's bits (8: llama.cpp's q8 steps; default 16)."""

    def __init__(self, parts: list, isa: str | None = None, act: int | None = None):
        p0 = parts[0]
        self.group_size, self.bits = p0.group_size, p0.bits
        self.isa = isa or kernel_isa()
        self.act = act or activation_bits()
        self._tag = np.empty(0, _TAGS[self.isa, self.act])
        self.lim = np.float32(127 if self.act == 8 else 32767)
        self._buffers: dict[int, tuple] = {}  # thread -> matmul's input buffers (flat, grown to the most rows)
        out = sum(p.weight.shape[0] for p in parts)
        self.shape = (p0.shape[1], out)
        self.words = np.zeros((padded_rows(out), p0.weight.shape[1] * 2), np.uint16)
        o = 0
        for p in parts:
            self._place(np.ascontiguousarray(p.weight, np.uint32), o)
            o += p.weight.shape[0]
        self.bytes = self.words.view(np.uint8)
        dtype = np.result_type(*[p.scales.dtype for p in parts])
        self.scales = octet_rows(_rows_of([p.scales for p in parts], dtype))
        if drops_biases(parts):
            self.biases, self.bias_factor = None, np.float32(-(1 << (self.bits - 1)))
        else:
            self.biases, self.bias_factor = octet_rows(_rows_of([p.biases for p in parts], dtype)), np.float32(0)
        if dtype == np.float16:
            self.scales = self.scales.view(np.uint16)
            self.biases = None if self.biases is None else self.biases.view(np.uint16)

    def _place(self, src: np.ndarray, o: int) -> None:
        """A part's words src [rows, ...] repacked into rows o.. of self.words (an octet the part starts inside
        keeps the previous part's rows: its own are ORed in)."""
        s = o % OCTET
        if not s:
            _repack(src, self.bits, self.words[o: o + padded_rows(src.shape[0])])
            return
        src = np.concatenate([np.zeros((s, src.shape[1]), np.uint32), src])
        packed = np.zeros((padded_rows(src.shape[0]), self.words.shape[1]), np.uint16)
        _repack(src, self.bits, packed)
        self.words[o - s: o - s + packed.shape[0]] |= packed

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.scales.nbytes + (0 if self.biases is None else self.biases.nbytes)

    def _args(self):
        biases = self.scales if self.biases is None else self.biases
        return self.bytes, self.scales, biases, self.bias_factor, self.bits, self.group_size

    def input_buffers(self, rows: int):
        """Empty buffers for `rows` input rows, what quantize_input fills: xq [rows, in] int16, dxs [2, in / 32,
        rows]."""
        n = self.shape[0]
        return np.empty((rows, n), np.int16), np.empty((2, n // _BLOCK, rows), np.float32)

    def quantize_input(self, x2: np.ndarray, buffers=None):
        """What rows() takes for x2 [rows, in] float32 (C order), in buffers (input_buffers) where given."""
        xq, dxs = buffers if buffers is not None else self.input_buffers(x2.shape[0])
        quantize_input(x2, self.lim, self.bits, xq, dxs)
        return xq, dxs

    def rows(self, xin, out: np.ndarray, o0: int, o1: int, prefetch: int = PREFETCH) -> None:
        """out[:, o0:o1] = x @ W[o0:o1].T for xin = quantize_input(x) (o0 a multiple of OCTET); out C-order float32;
        releases the GIL. prefetch: bytes ahead of each block that it asks the cache for (0: none)."""
        _rows(self._tag, *self._args(), xin[0], xin[1], out, o0, o1, prefetch)

    def matmul(self, x2: np.ndarray, prefetch: int = PREFETCH) -> np.ndarray:
        """x2 [rows, in] (float32, C order) @ W.T on this thread, in one compiled call, the rounded input in buffers
        kept per thread (grown to the most rows it has seen); prefetch as in rows()."""
        rows, n = x2.shape[0], self.shape[0]
        key = threading.get_ident()
        flat = self._buffers.get(key)
        if flat is None or flat[0].size < rows * n:
            flat = self._buffers[key] = tuple(b.reshape(-1) for b in self.input_buffers(rows))
        xq, dxs = flat[0][: rows * n].reshape(rows, n), flat[1][: 2 * (n // _BLOCK) * rows].reshape(2, -1, rows)
        out = np.empty((rows, self.shape[1]), np.float32)
        _product(self._tag, np.ascontiguousarray(x2, dtype=np.float32), self.lim, *self._args(), xq, dxs, out,
                 prefetch)
        return out

    def dequantize(self, o0: int, o1: int, out: np.ndarray) -> np.ndarray:
        """Rows o0..o1 as float32 [o1 - o0, in] in out (C order); releases the GIL."""
        if not (out.flags.c_contiguous and out.dtype == np.float32 and out.shape == (o1 - o0, self.shape[0])):
            raise ValueError(f"dequantize needs a C-order float32 [{o1 - o0}, {self.shape[0]}] buffer")
        lo, hi = o0 // OCTET * OCTET, padded_rows(o1)
        scales = self.scales[lo:hi]
        scales = scales.view(np.float16).astype(np.float32) if scales.dtype == np.uint16 else scales
        biases = scales if self.biases is None else self.biases[lo:hi]
        biases = biases.view(np.float16).astype(np.float32) if biases.dtype == np.uint16 else biases
        dequantize_rows(self.words[lo:hi], scales, biases, self.bias_factor, self.bits, self.group_size, o0 - lo,
                        o1 - lo, out)
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
        _warn_once(f"MLXLLAMA_KERNEL_ACT={want}: expected 8 or 16; using 16")
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
