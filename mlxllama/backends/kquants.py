"""GGUF quantized blocks (K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS, and Q4_0/Q4_1/Q8_0 beside them) multiplied as the file
stores them, on the numpy backend (numba).

Every type decodes, block by block, into integer codes c with one scale and one bias per sub-block of S elements
(S = 16 or 32): w = scale * c + bias, formed in float32 exactly as gguf.quants.dequantize forms it (Q4_K: scale
d * sc, bias -(dmin * m); Q6_K: scale d * sc, code q - 32, no bias; IQ4: the code is the type's table value). Then

  a product with up to _DIRECT_ROWS input rows decodes each block once and, per input row and sub-block, adds
      scale * (c . x) + bias * sum(x)
  in float32 (the weights are never formed: another rounding order than x @ W, ~1e-6 relative): Q4_0, Q4_1, Q5_0,
  Q5_1, Q8_0, Q4_K, Q5_K and Q6_K in kquants_tiles' vector IR, tiles of up to 4 rows sharing each decoded block;
  IQ4_NL (up to _FEW_ROWS rows) in a plain loop; the rest (Q2_K, Q3_K, IQ4_XS) in matmul_rows, every row of the
  product per decoded block;
  a longer one dequantizes a block of weight rows into a cache-sized buffer (bit for bit gguf's weights) and
  multiplies it with BLAS.

Threads: a product's output rows (across its fused parts) go in spans of 64 or more, claimed by the calling thread
and the numpy backend's worker threads (matmul's workers: numpy_ops passes its Workers and a step's timed thread
count) from _SHARE_MIN multiply-adds on; without workers, this module's own pool (_spread). The kernels release
the GIL.

Resident memory is the file's tensor bytes; nothing is widened at load.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from numba import njit

from . import kquants_tiles
from .numpy_threads import spans

# type name -> (kind, elements per block, elements per sub-block, bytes per block)
TYPES = {
    "Q4_0": (0, 32, 32, 18), "Q4_1": (1, 32, 32, 20), "Q8_0": (2, 32, 32, 34), "Q5_0": (3, 32, 32, 22),
    "Q5_1": (4, 32, 32, 24), "IQ4_NL": (5, 32, 32, 18), "Q2_K": (6, 256, 16, 84), "Q3_K": (7, 256, 16, 110),
    "Q4_K": (8, 256, 32, 144), "Q5_K": (9, 256, 32, 176), "Q6_K": (10, 256, 16, 210), "IQ4_XS": (11, 256, 32, 136),
}
_DIRECT_ROWS = 16  # products of at most this many input rows decode in the kernel; longer ones go through BLAS
_DEQUANT_BLOCK = 1 << 20  # float32 weights dequantized at a time for BLAS (4 MB)
_SPLIT = 1 << 20  # products over at least this many weights are split over threads

_HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)  # fp16 bits -> f32
_IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


@njit(nogil=True, cache=True, inline="always")
def _h(row, p, half):
    return half[np.int64(row[p]) | (np.int64(row[p + 1]) << 8)]


@njit(nogil=True, cache=True, inline="always")
def _decode(kind, blk, half, iq4, c, sc, bi):
    """One block (its bytes): codes c[:QK], scale sc[s] and bias bi[s] per sub-block (w = sc * c + bi)."""
    if kind <= 5:
        _decode_32(kind, blk, half, iq4, c, sc, bi)
    else:
        _decode_256(kind, blk, half, iq4, c, sc, bi)


@njit(nogil=True, cache=True, inline="always")
def _decode_32(kind, blk, half, iq4, c, sc, bi):
    """A 32-element block: Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, IQ4_NL."""
    d = _h(blk, 0, half)
    sc[0] = d
    bi[0] = np.float32(0)
    if kind == 2:  # Q8_0
        for i in range(32):
            c[i] = np.float32(np.int8(blk[2 + i]))
        return
    q0 = 2
    hb = np.uint32(0)
    if kind == 1:  # Q4_1
        bi[0] = _h(blk, 2, half)
        q0 = 4
    elif kind == 3:  # Q5_0
        hb = np.uint32(blk[2]) | (np.uint32(blk[3]) << 8) | (np.uint32(blk[4]) << 16) \
            | (np.uint32(blk[5]) << 24)
        q0 = 6
    elif kind == 4:  # Q5_1
        bi[0] = _h(blk, 2, half)
        hb = np.uint32(blk[4]) | (np.uint32(blk[5]) << 8) | (np.uint32(blk[6]) << 16) \
            | (np.uint32(blk[7]) << 24)
        q0 = 8
    off = np.float32(8) if kind == 0 else (np.float32(16) if kind == 3 else np.float32(0))
    for i in range(16):
        b = blk[q0 + i]
        lo = np.int64(b & 15)
        hi = np.int64(b >> 4)
        if kind == 5:
            c[i] = iq4[lo]
            c[i + 16] = iq4[hi]
        else:
            lo |= np.int64((hb >> i) & 1) << 4
            hi |= np.int64((hb >> (i + 16)) & 1) << 4
            c[i] = np.float32(lo) - off
            c[i + 16] = np.float32(hi) - off


@njit(nogil=True, cache=True, inline="always")
def _decode_256(kind, blk, half, iq4, c, sc, bi):
    """A 256-element block: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS."""
    if kind == 6:  # Q2_K: scales[16] qs[64] d dmin
        d = _h(blk, 80, half)
        dmin = _h(blk, 82, half)
        for s in range(16):
            v = blk[s]
            sc[s] = d * np.float32(v & 15)
            bi[s] = -(dmin * np.float32(v >> 4))
        for j in range(2):
            for k in range(4):
                for l in range(32):
                    c[j * 128 + k * 32 + l] = np.float32((blk[16 + j * 32 + l] >> (2 * k)) & 3)
        return
    if kind == 7:  # Q3_K: hmask[32] qs[64] scales[12] d
        d = _h(blk, 108, half)
        for s in range(16):
            lo = (blk[96 + s % 8] >> (4 * (s // 8))) & 15
            hi = (blk[104 + s % 4] >> (2 * (s // 4))) & 3
            sc[s] = d * np.float32(np.int64(lo | (hi << 4)) - 32)
            bi[s] = np.float32(0)
        for j in range(2):
            for k in range(4):
                for l in range(32):
                    q = np.int64((blk[32 + j * 32 + l] >> (2 * k)) & 3)
                    h = np.int64((blk[l] >> (j * 4 + k)) & 1)
                    c[j * 128 + k * 32 + l] = np.float32(q - 4 * (1 - h))
        return
    if kind == 8 or kind == 9:  # Q4_K / Q5_K: d dmin scales[12] (qh[32]) qs[128]
        d = _h(blk, 0, half)
        dmin = _h(blk, 2, half)
        for s in range(8):
            if s < 4:
                a = blk[4 + s] & 63
                m = blk[8 + s] & 63
            else:
                a = (blk[12 + s - 4] & 15) | ((blk[4 + s - 4] >> 2) & 0x30)
                m = (blk[12 + s - 4] >> 4) | ((blk[8 + s - 4] >> 2) & 0x30)
            sc[s] = d * np.float32(a)
            bi[s] = -(dmin * np.float32(m))
        qs = 16 if kind == 8 else 48
        for j in range(4):
            for t in range(2):
                for l in range(32):
                    q = np.int64((blk[qs + j * 32 + l] >> (4 * t)) & 15)
                    if kind == 9:
                        q |= np.int64((blk[16 + l] >> (2 * j + t)) & 1) << 4
                    c[j * 64 + t * 32 + l] = np.float32(q)
        return
    if kind == 10:  # Q6_K: ql[128] qh[64] scales[16] (int8) d
        d = _h(blk, 208, half)
        for s in range(16):
            sc[s] = d * np.float32(np.int8(blk[192 + s]))
            bi[s] = np.float32(0)
        for j in range(2):
            for k in range(4):
                for l in range(32):
                    e = k * 32 + l  # inside this half: ql byte j*64 + e % 64, nibble e // 64
                    q = np.int64((blk[j * 64 + e % 64] >> (4 * (e // 64))) & 15)
                    q |= np.int64((blk[128 + j * 32 + l] >> (2 * k)) & 3) << 4
                    c[j * 128 + e] = np.float32(q - 32)
        return
    # kind 11, IQ4_XS: d scales_h (u16) scales_l[4] qs[128]
    d = _h(blk, 0, half)
    sh = np.int64(blk[2]) | (np.int64(blk[3]) << 8)
    for s in range(8):
        lo = np.int64((blk[4 + s // 2] >> (4 * (s % 2))) & 15)
        hi = (sh >> (2 * s)) & 3
        sc[s] = d * np.float32((lo | (hi << 4)) - 32)
        bi[s] = np.float32(0)
        for t in range(2):
            for l in range(16):
                c[s * 32 + t * 16 + l] = iq4[np.int64((blk[8 + s * 16 + l] >> (4 * t)) & 15)]


@njit(nogil=True, cache=True)
def dequantize_rows(kind, qk, sub, bsize, blocks, o0, o1, half, iq4, out):
    """Rows o0..o1 of the weight as float32 into out [o1 - o0, cols]: sc * c + bi, each step rounded to float32
    (no fused multiply-add), the very weights gguf.quants.dequantize forms."""
    n = out.shape[1]
    c = np.empty(qk, np.float32)
    ns = qk // sub
    sc = np.empty(ns, np.float32)
    bi = np.empty(ns, np.float32)
    for o in range(o0, o1):
        row = blocks[o]
        for b in range(n // qk):
            _decode(kind, row[b * bsize:(b + 1) * bsize], half, iq4, c, sc, bi)
            for s in range(ns):
                for i in range(sub):
                    out[o - o0, b * qk + s * sub + i] = sc[s] * c[s * sub + i] + bi[s]


@njit(nogil=True, cache=True, fastmath=True)
def matmul_rows(kind, qk, sub, bsize, blocks, x, xsum, half, iq4, y, o0, o1):
    """y[:, o] = x @ W[o] for o in o0..o1, x [rows, cols] float32, xsum [rows, cols / sub] its sub-block sums."""
    rows, n = x.shape
    c = np.empty(qk, np.float32)
    ns = qk // sub
    sc = np.empty(ns, np.float32)
    bi = np.empty(ns, np.float32)
    acc = np.empty(rows, np.float32)
    for o in range(o0, o1):
        row = blocks[o]
        acc[:] = 0
        for b in range(n // qk):
            _decode(kind, row[b * bsize:(b + 1) * bsize], half, iq4, c, sc, bi)
            for r in range(rows):
                t = np.float32(0)
                for s in range(ns):
                    dot = np.float32(0)
                    base = b * qk + s * sub
                    for i in range(sub):
                        dot += c[s * sub + i] * x[r, base + i]
                    t += sc[s] * dot + bi[s] * xsum[r, b * ns + s]
                acc[r] += t
        for r in range(rows):
            y[r, o] = acc[r]


# -- IQ4_NL's direct product, for a few input rows (the commoner types: kquants_tiles) --------------------------

@njit(nogil=True, cache=True, fastmath=True)
def _mv_iq4_nl(blocks, half, iq4, x, y, o0, o1):
    """y[:, o] for IQ4_NL rows o0..o1 (18-byte blocks: d, 16 bytes of table indices)."""
    rows, n = x.shape
    for o in range(o0, o1):
        row = blocks[o]
        for r in range(rows):
            acc = np.float32(0)
            for b in range(n // 32):
                p = b * 18
                dot = np.float32(0)
                for i in range(16):
                    v = row[p + 2 + i]
                    dot += iq4[v & 15] * x[r, b * 32 + i] + iq4[v >> 4] * x[r, b * 32 + 16 + i]
                acc += _h(row, p, half) * dot
            y[r, o] = acc


# -- llama.cpp's activation rounding (an explicit numerics option: numerics.py) -------------------------------
#
# llama.cpp's CPU products quantize each input row before integer dot products: to Q8_K (256 per block) for the
# K-quants, to Q8_0 (32 per block) for Q4_0/Q5_0/Q8_0/IQ4_NL, to Q8_1 (Q8_0's values and the block's sum, stored
# as float16) for Q4_1/Q5_1. These give the exact values those blocks hold, so that a float product over them
# reproduces llama.cpp's up to float32 summation order.

Q8_K_TYPES = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})
Q8_1_TYPES = frozenset({"Q4_1", "Q5_1"})


def q8_0_values(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [rows, n] float32 (n a multiple of 32) -> (values [rows, n], q [rows, n / 32, 32], d [rows, n / 32, 1]) of
    llama.cpp's quantize_row_q8_0 on AVX2: d = amax / 127 stored as float16, q = round-half-even(x * (127 / amax))."""
    g = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(g).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    nz = amax != 0
    inv = np.where(nz, np.float32(127) / np.where(nz, amax, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.rint(g * inv)
    d16 = d.astype(np.float16).astype(np.float32)
    return (q * d16).reshape(x.shape), q, d


def q8_1_sums(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The sum Q8_1 stores per block ([rows, n / 32]): float16(d * sum(q)), d the float32 scale before rounding."""
    return (d[..., 0] * q.sum(axis=-1, dtype=np.float32)).astype(np.float16).astype(np.float32)


def q8_k_values(x: np.ndarray) -> np.ndarray:
    """x [rows, n] float32 (n a multiple of 256) -> the values of llama.cpp's quantize_row_q8_K_ref: iscale =
    -127 / max (max: the first element of largest magnitude, signed), q = min(127, round-half-even(iscale * x)),
    d = 1 / iscale in float32."""
    g = x.reshape(x.shape[0], -1, 256)
    mx = np.take_along_axis(g, np.abs(g).argmax(axis=-1)[..., None], axis=-1)
    nz = mx != 0
    iscale = np.where(nz, np.float32(-127) / np.where(nz, mx, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint(iscale * g), np.float32(127))
    d = np.where(nz, np.float32(1) / np.where(nz, iscale, np.float32(1)), np.float32(0)).astype(np.float32)
    return (q * d).reshape(x.shape)


def llamacpp_activations(x: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """What llama.cpp multiplies a `qtype` weight with: x rounded to Q8_K, Q8_0 or Q8_1 values, and for Q8_1 the
    float16 block sums its Q4_1/Q5_1 products use for the bias term (None otherwise)."""
    if qtype in Q8_K_TYPES:
        return q8_k_values(x), None
    values, q, d = q8_0_values(x)
    return values, (q8_1_sums(q, d) if qtype in Q8_1_TYPES else None)


_FEW_ROWS = 4  # at most this many input rows: IQ4_NL's direct product (the other untiled types: matmul_rows)


ACTIVATIONS = ("float32", "llama.cpp")
TILED = {qtype: kind for qtype, (kind, _) in kquants_tiles.KINDS.items()}  # types with vector tiles


class KQuantLinear:
    """Same-input GGUF matrices fused by output rows, as stored: one segment per part, each its blocks
    [rows, row_bytes] and type. shape is (in, out), as numpy_ops' float32 matrices.

    activations: "float32" (default: the input as it is) or "llama.cpp" (each part's input rounded as llama.cpp's
    CPU product rounds it for that type: llamacpp_activations; numerics.py sets it)."""

    takes_workers = True  # numpy_ops calls matmul(x2, workers, nworkers)

    def __init__(self, parts: list):
        self.segments = []
        o = 0
        for p in parts:
            kind, qk, sub, bsize = TYPES[p.qtype]
            self.segments.append((o, o + p.shape[0], (kind, qk, sub, bsize), np.ascontiguousarray(p.blocks)))
            o += p.shape[0]
        self.shape = (parts[0].shape[1], o)
        self.qtypes = tuple(p.qtype for p in parts)
        self.activations = "float32"
        self._tiled = None  # (kinds, starts, a tuple of the blocks) where every part has vector tiles
        if all(q in TILED for q in self.qtypes):
            self._tiled = (np.array([TILED[q] for q in self.qtypes], np.int64),
                           np.array([seg[0] for seg in self.segments] + [o], np.int64),
                           tuple(_read_only(seg[3]) for seg in self.segments))

    @property
    def nbytes(self) -> int:
        return sum(int(seg[3].nbytes) for seg in self.segments)

    def matmul(self, x2: np.ndarray, workers=None, nworkers: int = 1) -> np.ndarray:
        """x2 [rows, in] float32 -> [rows, out]. workers (a numpy_threads.Workers): spans of output rows shared by
        this thread and nworkers - 1 of its threads; without, this module's own threads, one per core."""
        x2 = np.ascontiguousarray(x2, dtype=np.float32)
        if self.activations == "float32" and self._tiled is not None and x2.shape[0] <= _DIRECT_ROWS:
            return self._tiles(x2, workers, nworkers)
        share = None if workers is None else _shared_by(workers, nworkers)
        if self.activations == "float32":
            return _product(x2, self.segments, self.qtypes, share=share)
        out = np.empty((x2.shape[0], self.shape[1]), np.float32)
        for (o0, o1, fmt, blocks), qtype in zip(self.segments, self.qtypes):
            xs, sums = llamacpp_activations(x2, qtype)
            out[:, o0:o1] = _product(xs, [(0, o1 - o0, fmt, blocks)], (qtype,), sums, share)
        return out

    def _tiles(self, x2: np.ndarray, workers, nworkers: int) -> np.ndarray:
        """Every part by the vector tiles: one compiled call per thread (this one is a decode step's path, so it
        does the fewest Python steps)."""
        kinds, starts, blocks = self._tiled
        n_in, n_out = self.shape
        out = np.empty((x2.shape[0], n_out), np.float32)
        if workers is not None and (nworkers == 1 or x2.shape[0] * n_in * n_out < _SHARE_MIN):
            kquants_tiles.segments_product(kinds, starts, blocks, x2, out, 0, n_out)
            return out
        share = _spread if workers is None else _shared_by(workers, nworkers)
        share(lambda a, b: kquants_tiles.segments_product(kinds, starts, blocks, x2, out, a, b), n_out,
              x2.shape[0] * n_in * n_out)
        return out

    def dequantize(self, o0: int, o1: int, out: np.ndarray) -> np.ndarray:
        """Output rows o0..o1 (across segments) as float32 [o1 - o0, in] in out (C order)."""
        return _dequantize(self.segments, o0, o1, out)


def _read_only(blocks: np.ndarray) -> np.ndarray:
    """A read-only view: the file's pages are read-only, and one type for all parts keeps segments_product's
    tuple of blocks uniform (one compiled function per number of parts)."""
    view = blocks.view()
    view.flags.writeable = False
    return view


def _dequantize(segments, o0: int, o1: int, out: np.ndarray) -> np.ndarray:
    for s0, s1, (kind, qk, sub, bsize), blocks in segments:
        a, b = max(o0, s0), min(o1, s1)
        if a < b:
            dequantize_rows(kind, qk, sub, bsize, blocks, a - s0, b - s0, _HALF, _IQ4, out[a - o0: b - o0])
    return out


def _product(x2: np.ndarray, segments: list, qtypes: tuple, q8_1_sums: np.ndarray | None = None,
             share=None) -> np.ndarray:
    """x2 [rows, in] float32 times the segments' weights -> [rows, out]. q8_1_sums (one Q4_1/Q5_1 segment): the
    per-32 input sums its bias term takes instead of x2's own (llama.cpp's float16 Q8_1 sums). share(fn, n, work):
    fn(a, b) over spans of [0, n) on some threads (default _spread)."""
    rows, n_in = x2.shape
    n_out = segments[-1][1]
    out = np.empty((rows, n_out), np.float32)
    share = share or _spread
    if rows <= _DIRECT_ROWS:
        sums = _input_sums(x2, segments, qtypes, q8_1_sums)

        def direct(a: int, b: int) -> None:
            for (o0, o1, fmt, blocks), qtype in zip(segments, qtypes):
                if max(a, o0) < min(b, o1):
                    _segment_rows(qtype, fmt, blocks, x2, sums, out, o0, max(a, o0) - o0, min(b, o1) - o0)

        share(direct, n_out, n_out * n_in * rows)
        return out
    step = max(16, _DEQUANT_BLOCK // n_in)

    def span(a: int, b: int) -> None:
        buf = np.empty((min(step, b - a), n_in), np.float32)
        for s in range(a, b, step):
            e = min(s + step, b)
            np.matmul(x2, _dequantize(segments, s, e, buf[: e - s]).T, out=out[:, s:e])

    share(span, n_out, n_out * n_in * 8)
    if q8_1_sums is not None:  # the bias term with the stored sums, not x2's: add m * (stored - exact) per block
        delta = q8_1_sums - x2.reshape(rows, -1, 32).sum(axis=-1, dtype=np.float32)
        out += delta @ _block_mins(segments[0][3], segments[0][2][3]).T
    return out


def _input_sums(x2: np.ndarray, segments: list, qtypes: tuple, q8_1_sums) -> dict:
    """x2's sums per sub-block size the segments need ([rows, in / sub]), and "tiles": per 32 inputs, [in / 32,
    rows] (kquants_tiles' layout); q8_1_sums stands for the sums per 32 where given. "nibbles": x2 permuted for
    the nibble types' tiles (kquants_tiles.permute_nibbles), where there are any."""
    rows = x2.shape[0]
    sums = {} if q8_1_sums is None else {32: q8_1_sums, "tiles": np.ascontiguousarray(q8_1_sums.T)}
    if any(q in TILED and kquants_tiles.NIBBLES[TILED[q]] for q in qtypes):
        sums["nibbles"] = kquants_tiles.permute_nibbles(x2)  # not sums: the input as those tiles read it
    for (_, _, (_, _, sub, _), _), qtype in zip(segments, qtypes):
        key = "tiles" if qtype in TILED else sub
        if key not in sums:
            per = x2.reshape(rows, -1, 32 if key == "tiles" else sub).sum(axis=-1, dtype=np.float32)
            sums[key] = np.ascontiguousarray(per.T if key == "tiles" else per)
    return sums


def _segment_rows(qtype: str, fmt: tuple, blocks, x2, sums: dict, out, o0: int, a: int, b: int) -> None:
    """out[:, o0 + a: o0 + b] from rows a..b of one segment (its output columns start at o0)."""
    if qtype in TILED:
        x = sums["nibbles"] if kquants_tiles.NIBBLES[TILED[qtype]] else x2
        kquants_tiles.rows_product(TILED[qtype], blocks, x, sums["tiles"], out, o0, a, b)
        return
    kind, qk, sub, bsize = fmt
    y = np.empty((x2.shape[0], b), np.float32)  # the kernels index y by the segment's row
    if qtype == "IQ4_NL" and x2.shape[0] <= _FEW_ROWS:
        _mv_iq4_nl(blocks, _HALF, _IQ4, x2, y, a, b)
    else:
        matmul_rows(kind, qk, sub, bsize, blocks, x2, sums[sub], _HALF, _IQ4, y, a, b)
    out[:, o0 + a: o0 + b] = y[:, a:b]


def _block_mins(blocks: np.ndarray, bsize: int) -> np.ndarray:
    """Q4_1 / Q5_1: each block's m (the float16 after d), [rows, blocks] float32."""
    b = blocks.reshape(blocks.shape[0], -1, bsize)
    return _HALF[b[..., 2].astype(np.int64) | (b[..., 3].astype(np.int64) << 8)]


def dequantize(w) -> np.ndarray:
    """A weights.GGMLWeight as float32 [rows, cols], bit for bit gguf.quants.dequantize's."""
    out = np.empty(w.shape, np.float32)
    kind, qk, sub, bsize = TYPES[w.qtype]
    dequantize_rows(kind, qk, sub, bsize, np.ascontiguousarray(w.blocks), 0, w.shape[0], _HALF, _IQ4, out)
    return out


def prepare_numpy(parts: list) -> KQuantLinear:
    unknown = sorted({p.qtype for p in parts if p.qtype not in TYPES})
    if unknown:
        raise ValueError(f"no numpy kernel for GGUF type {unknown[0]}")
    return KQuantLinear(parts)


def prepared_nbytes(w) -> int:
    return int(w.nbytes)


_POOL = None
_POOL_LOCK = threading.Lock()


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


_SHARE_MIN = 1 << 20  # products of fewer multiply-adds (~150 us in the tiles) stay on the calling thread


def _shared_by(workers, nworkers: int):
    """A share function (see _product) over a numpy backend's Workers: spans of 64 rows or more claimed one at a
    time by this thread and nworkers - 1 pool threads."""
    def share(fn, n: int, work: int) -> None:
        if nworkers == 1 or work < _SHARE_MIN or n < 128:
            fn(0, n)
            return
        workers.share(lambda c: fn(c.start, c.stop), spans(n, 4 * nworkers), nworkers)

    return share


def _spread(fn, n: int, work: int) -> None:
    """fn(a, b) over [0, n) in a few spans on this module's worker threads (the kernels release the GIL); small
    products stay on the calling thread."""
    threads = _threads()
    if threads == 1 or work < _SPLIT or n < 64:
        fn(0, n)
        return
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="mlxllama-kquants")
    parts = min(threads * 2, n // 16)
    edges = [n * i // parts for i in range(parts + 1)]
    futures = [_POOL.submit(fn, a, b) for a, b in zip(edges[1:-1], edges[2:])]
    fn(edges[0], edges[1])
    for f in futures:
        f.result()
