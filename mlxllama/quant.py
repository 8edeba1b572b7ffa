"""MLX affine quantization in numpy, bit-identical to mx.quantize / mx.dequantize on MLX's CPU backend.

The algorithm (MLX's CPU kernel), per group of `group_size` consecutive values of a row, all in float32:
    lo, hi = min, max of the group
    scale = max((hi - lo) / (2**bits - 1), 1e-7), negated unless |lo| > |hi|
    edge = lo if |lo| > |hi| else hi                 (the endpoint with the larger magnitude)
    q0 = rint(edge / scale)                           (round half to even)
    if q0 != 0: scale = edge / q0; bias = edge        (so that edge is represented exactly)
    else:       bias = 0
    q = clip(rint((w - bias) / scale), 0, 2**bits - 1)
except for bits=1, where simply scale = max(hi - lo, 1e-7) and bias = lo.
The q values use the float32 scale and bias; only afterwards are scales and biases rounded to w's dtype.
Packing is a little-endian bit stream: element j sits at bits [bits*j, bits*(j+1)) of the row's bytes,
read as little-endian uint32 words.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .config import ModelArgs
from .errors import UsageError
from .weights import LAYER_LINEARS, QUANT_BITS, QUANT_GROUP_SIZES, GGMLWeight, QuantizedWeight, SymmetricWeight

BITS = (1,) + QUANT_BITS  # 1 bit quantizes too (MLX's rule differs there); model files use QUANT_BITS
GROUP_SIZES = QUANT_GROUP_SIZES
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_CHUNK = 1 << 22  # elements quantized or dequantized at a time, to bound float32 temporaries

_QUANTIZED_NAME = re.compile(
    r"model\.embed_tokens|lm_head|model\.layers\.\d+\.(" + "|".join(re.escape(n) for n in LAYER_LINEARS) + ")")


def _check_params(group_size: int, bits: int) -> None:
    if bits not in BITS:
        raise UsageError(f"quantization bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise UsageError(f"quantization group size must be one of 32, 64, 128, got {group_size!r}")


def _pack_geometry(bits: int) -> tuple[int, int]:
    """(values, bytes) of the smallest run of values that fills whole bytes."""
    values = 8 // math.gcd(bits, 8)
    return values, values * bits // 8


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer values in [0, 2**bits) along the last axis into uint32 words, MLX's layout."""
    if bits not in range(1, 9):
        raise UsageError(f"cannot pack {bits!r}-bit values (1 to 8 bits)")
    q = np.asarray(q)
    if q.ndim == 0 or not np.issubdtype(q.dtype, np.integer):
        raise UsageError(f"pack expects an integer array with at least one axis, got {q.dtype} {q.shape}")
    n = q.shape[-1]
    if n * bits % 32:
        raise UsageError(f"cannot pack {n} values of {bits} bits into whole uint32 words")
    if q.size and (q.min() < 0 or q.max() >= 1 << bits):
        raise UsageError(f"pack: values out of range for {bits} bits")
    values, nbytes = _pack_geometry(bits)
    work = np.uint8 if nbytes == 1 else np.uint64  # whole values per byte: stay in uint8
    runs = q.reshape(*q.shape[:-1], n // values, values).astype(work)
    if nbytes == 1:  # a value or a few a byte: OR the shifted columns (a reduce over so short an axis is slow)
        stream = runs[..., 0].copy()
        for k in range(1, values):
            stream |= runs[..., k] << work(k * bits)
    else:
        stream = np.bitwise_or.reduce(runs << (np.arange(values, dtype=work) * work(bits)), axis=-1)
        stream = (stream[..., None] >> (np.arange(nbytes, dtype=work) * work(8))).astype(np.uint8)
    stream = np.ascontiguousarray(stream.reshape(*q.shape[:-1], n * bits // 8))
    return stream.view("<u4").astype(np.uint32, copy=False)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack: uint32 words [..., w] -> uint8 values [..., w * 32 // bits]; a view for 8 bits."""
    if bits not in range(1, 9):
        raise UsageError(f"cannot unpack {bits!r}-bit values (1 to 8 bits)")
    packed = np.asarray(packed)
    if packed.ndim == 0 or packed.dtype != np.uint32:
        raise UsageError(f"unpack expects a uint32 array with at least one axis, got {packed.dtype} {packed.shape}")
    n = packed.shape[-1] * 32 // bits
    stream = np.ascontiguousarray(packed.astype("<u4", copy=False)).view(np.uint8)
    if bits == 8:
        return stream
    values, nbytes = _pack_geometry(bits)
    if nbytes == 1:
        acc, work = stream, np.uint8
    else:
        work = np.uint64
        runs = stream.reshape(*packed.shape[:-1], n // values, nbytes).astype(work)
        acc = np.bitwise_or.reduce(runs << (np.arange(nbytes, dtype=work) * work(8)), axis=-1)
    out = (acc[..., None] >> (np.arange(values, dtype=work) * work(bits))) & work((1 << bits) - 1)
    return out.astype(np.uint8).reshape(*packed.shape[:-1], n)


def _quantize_rows(w: np.ndarray, group_size: int, bits: int):
    rows, cols = w.shape
    n_bins = np.float32((1 << bits) - 1)
    g = w.reshape(rows, cols // group_size, group_size).astype(np.float32)
    hi = g.max(axis=-1)
    lo = g.min(axis=-1)
    if bits == 1:
        # bias is lo itself, so its zero sign matters: MLX keeps the first of equal minima (+0 == -0).
        bias = np.take_along_axis(g, g.argmin(axis=-1)[..., None], axis=-1)[..., 0]
        scale = np.maximum(hi - lo, np.float32(1e-7))
    else:
        lo_side = np.abs(lo) > np.abs(hi)
        scale = np.maximum((hi - lo) / n_bins, np.float32(1e-7))
        scale = np.where(lo_side, scale, -scale)
        edge = np.where(lo_side, lo, hi)
        q0 = np.rint(edge / scale)
        nonzero = q0 != 0
        scale = np.where(nonzero, np.divide(edge, q0, out=np.zeros_like(edge), where=nonzero), scale)
        bias = np.where(nonzero, edge, np.float32(0))
    q = np.rint((g - bias[..., None]) / scale[..., None])
    q = np.clip(q, 0, n_bins).astype(np.uint8).reshape(rows, cols)
    return pack(q, bits), scale.astype(w.dtype), bias.astype(w.dtype)


def quantize(w: np.ndarray, group_size: int = 64, bits: int = 4) -> QuantizedWeight:
    """Quantize a 2-D float16/float32 matrix exactly as mx.quantize(w, group_size, bits) does."""
    _check_params(group_size, bits)
    w = np.asarray(w)
    if w.dtype not in FLOAT_DTYPES:
        raise UsageError(f"quantize expects float16 or float32 weights, got {w.dtype}")
    if w.ndim != 2:
        raise UsageError(f"quantize expects a 2-D matrix, got shape {w.shape}")
    rows, cols = w.shape
    if cols == 0 or cols % group_size:
        raise UsageError(f"cannot quantize a matrix of width {cols} in groups of {group_size}")
    packed = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, cols // group_size), w.dtype)
    biases = np.empty_like(scales)
    step = max(1, _CHUNK // cols)
    # Extreme ranges overflow exactly where MLX's float32 arithmetic does; follow it silently.
    with np.errstate(over="ignore", invalid="ignore"):
        for r in range(0, rows, step):
            s = slice(r, r + step)
            if not np.isfinite(w[s]).all():
                raise UsageError(f"cannot quantize weights that contain NaN or infinity (row {r} onwards)")
            packed[s], scales[s], biases[s] = _quantize_rows(w[s], group_size, bits)
    return QuantizedWeight(packed, scales, biases, group_size, bits)


def _dequantize_rows(weight, scales, biases, group_size, bits, compute, dtype):
    """scale * q + bias evaluated in `compute` (each operation rounded to it), returned as `dtype`."""
    rows = weight.shape[0]
    q = unpack(weight, bits).reshape(rows, -1, group_size).astype(compute)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf in float16, as MLX does
        w = q * scales[..., None].astype(compute, copy=False) + biases[..., None].astype(compute, copy=False)
        return w.reshape(rows, -1).astype(dtype, copy=False)


def _check_qw(qw: QuantizedWeight) -> None:
    _check_params(qw.group_size, qw.bits)
    rows, words = qw.weight.shape
    groups = words * 32 // qw.bits // qw.group_size
    if qw.weight.dtype != np.uint32 or words * 32 % (qw.bits * qw.group_size):
        raise UsageError(f"quantized weight {qw.weight.dtype} {qw.weight.shape} does not fit "
                         f"{qw.bits}-bit groups of {qw.group_size}")
    if qw.scales.shape != (rows, groups) or qw.biases.shape != (rows, groups):
        raise UsageError(f"quantized weight scales {qw.scales.shape} / biases {qw.biases.shape} do not match "
                         f"{(rows, groups)}")
    if qw.scales.dtype not in FLOAT_DTYPES or qw.biases.dtype != qw.scales.dtype:
        raise UsageError(f"quantized weight scales/biases must share a float dtype, got "
                         f"{qw.scales.dtype} and {qw.biases.dtype}")


def dequantize(qw: QuantizedWeight, dtype=np.float32) -> np.ndarray:
    """The float matrix [rows, cols], equal to mx.dequantize(..., dtype=dtype).

    Like MLX, the arithmetic happens in the scales' dtype (float16 scales give float16-rounded weights)
    and the result is then cast to `dtype`.
    """
    _check_qw(qw)
    dtype = np.dtype(dtype)
    rows, cols = qw.shape
    out = np.empty((rows, cols), dtype)
    step = max(1, _CHUNK // max(cols, 1))
    for r in range(0, rows, step):
        s = slice(r, r + step)
        out[s] = _dequantize_rows(qw.weight[s], qw.scales[s], qw.biases[s], qw.group_size, qw.bits,
                                  qw.scales.dtype, dtype)
    return out


def quantized_matmul(x: np.ndarray, qw: QuantizedWeight) -> np.ndarray:
    """x @ W.T in float32 for x [..., cols], dequantizing W a block of rows at a time.

    Like mx.quantized_matmul with float32 x, scales and biases are widened first, so W = scale * q + bias
    is formed in float32 (not rounded to float16 as dequantize does for float16 scales).
    """
    _check_qw(qw)
    rows, cols = qw.shape
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] != cols:
        raise UsageError(f"quantized_matmul: input of shape {x.shape} does not match weight of shape {(rows, cols)}")
    x2 = x.reshape(-1, cols)
    out = np.empty((x2.shape[0], rows), np.float32)
    step = max(1, _CHUNK // max(cols, 1))
    for r in range(0, rows, step):
        s = slice(r, r + step)
        w = _dequantize_rows(qw.weight[s], qw.scales[s], qw.biases[s], qw.group_size, qw.bits,
                             np.float32, np.float32)
        np.matmul(x2, w.T, out=out[:, s])
    return out.reshape(*x.shape[:-1], rows)


def is_quantizable(name: str) -> bool:
    """Whether mlxllama quantizes this internal weight name (every linear, the embedding, lm_head)."""
    return _QUANTIZED_NAME.fullmatch(name) is not None


def quantize_weights(weights: dict, args: ModelArgs, group_size: int = 64, bits: int = 4,
                     dtype=np.float16, progress=None) -> tuple[dict, ModelArgs]:
    """Quantize a model in the internal layout as mlx-lm's convert would after casting to `dtype`.

    Linears, the embedding and lm_head become QuantizedWeight; everything else is cast to `dtype`.
    Already-quantized tensors with the same (bits, group_size) pass through untouched; others are
    dequantized, cast to `dtype` and requantized. progress(done, total) is called after each tensor.
    """
    _check_params(group_size, bits)
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise UsageError(f"quantization dtype must be float16 or float32, got {dtype}")
    out = {}
    for name, w in weights.items():
        if progress is not None:
            progress(len(out), len(weights))
        if not is_quantizable(name):
            if isinstance(w, (QuantizedWeight, GGMLWeight)):
                raise UsageError(f"tensor {name} is quantized but should be a float vector")
            out[name] = np.asarray(w).astype(dtype, copy=False)
            continue
        if isinstance(w, GGMLWeight):
            w = ggml_affine(w) or w.dequantize().astype(dtype)
        if isinstance(w, QuantizedWeight):
            if (w.bits, w.group_size) == (bits, group_size):
                out[name] = w
                continue
            w = dequantize(w, dtype)
        w = np.asarray(w)
        if w.ndim != 2 or w.shape[-1] % group_size:
            raise UsageError(f"tensor {name} of shape {w.shape} cannot be quantized in groups of {group_size}")
        out[name] = quantize(w.astype(dtype, copy=False), group_size, bits)
    return out, args.replace(quantization={"group_size": group_size, "bits": bits}, torch_dtype=dtype.name)


# -- GGUF blocks in MLX's affine layout ------------------------------------------------------------------------

# GGUF types with an exact MLX affine form (bits, group 32): w = scale * q + bias gives gguf's float32 weights
GGML_AFFINE = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}
_GGML_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176}


def _scales_biases(d: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(d, None) where every bias factor * d is a float16 (always, except for absurd block scales: factor is a power
    of two, so only a finite |factor * d| over float16's largest, 65504, is not), else float32 (d, factor * d)."""
    a = np.abs(d)
    if not np.any((a > np.float16(65504 / abs(factor))) & (a != np.float16(np.inf))):
        return d, None
    d32 = d.astype(np.float32)
    return d32, np.float32(factor) * d32


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` (even) of each block [..., bytes] (an even count, the last axis contiguous)."""
    return np.ascontiguousarray(blocks.view("<f2")[..., at // 2])


def _low_high(qs: np.ndarray) -> np.ndarray:
    """GGUF's 32-element nibble runs (byte i: element i low, i + 16 high) -> codes in element order."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _ggml_codes(blocks, at, bits, out):
    """GGUF blocks [rows, blocks, bytes] (codes from byte `at` on) -> MLX's code bytes out [rows, blocks * 32 *
    bits / 8], byte for byte what pack() gives of the codes in element order. 4 bits: GGUF's byte i holds elements
    i (low nibble) and i + 16, MLX's byte k elements 2k and 2k + 1. 8 bits: signed codes, stored plus 128."""
    width = 4 * bits
    for r in range(blocks.shape[0]):
        for b in range(blocks.shape[1]):
            src, dst = blocks[r, b, at:], out[r, b * width:(b + 1) * width]
            if bits == 8:
                for k in range(32):
                    dst[k] = src[k] ^ 0x80
                continue
            for k in range(8):
                even, odd = src[2 * k], src[2 * k + 1]
                dst[k] = (even & 0x0F) | ((odd << 4) & 0xF0)
                dst[8 + k] = (even >> 4) | (odd & 0xF0)


_COMPILED: list = []  # _ggml_codes through numba, once asked for (empty: not yet; [None]: numba is missing)


def _codes_kernel():
    """_ggml_codes compiled where numba is installed (the numpy backend's [fast-cpu]), else None: numpy's form of
    the same bytes runs instead (7x slower on a 4096 x 2048 Q4_0 matrix)."""
    if not _COMPILED:
        try:
            from numba import njit
        except ImportError:
            _COMPILED.append(None)
        else:
            _COMPILED.append(njit(cache=True, nogil=True)(_ggml_codes))
    return _COMPILED[0]


def _ggml_words(blocks: np.ndarray, at: int, bits: int) -> np.ndarray:
    """The codes of Q4_0 / Q4_1 (bits 4) or Q8_0 (bits 8) blocks as MLX's words [rows, blocks * bits]."""
    rows, kernel = blocks.shape[0], _codes_kernel()
    if kernel is None:
        q = blocks[..., at:] ^ np.uint8(0x80) if bits == 8 else _low_high(blocks[..., at:])
        return pack(np.ascontiguousarray(q).reshape(rows, -1), bits)
    out = np.empty((rows, blocks.shape[1] * 32 * bits // 8), np.uint8)
    kernel(blocks, at, bits, out)
    return out.view("<u4").astype(np.uint32, copy=False)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32 high bits (a little-endian uint32 per block) -> one 0/16 per element."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    return bits.astype(np.uint8) << np.uint8(4)


def ggml_affine(w: GGMLWeight) -> QuantizedWeight | None:
    """w in MLX's affine layout (group 32), value for value, or None where its type has no exact affine form
    (Q6_K, Q3_K and Q2_K scale sub-blocks of 16; IQ4 codes index a non-uniform table). Scales and biases are
    float32 where float16 would round them (K-quants' d * sc), float16 otherwise."""
    bits = GGML_AFFINE.get(w.qtype)
    if bits is None:
        return None
    n = w.blocks.shape[0]
    blocks = np.asarray(w.blocks).reshape(n, -1, _GGML_BLOCK_BYTES[w.qtype])
    factor = words = None  # symmetric types: biases = factor * scales; words: formed straight from the bytes
    if w.qtype in ("Q4_K", "Q5_K"):
        q, scales, biases = _k_affine(blocks, w.qtype)
    else:
        d = _half(blocks, 0)
        if w.qtype == "Q8_0":  # int8 q -> q + 128; w = d*q = d*(q+128) - 128*d
            words, factor = _ggml_words(blocks, 2, 8), -128
        elif w.qtype == "Q4_0":
            words, factor = _ggml_words(blocks, 2, 4), -8
        elif w.qtype == "Q4_1":
            words, scales, biases = _ggml_words(blocks, 4, 4), d, _half(blocks, 2)
        elif w.qtype == "Q5_0":
            q, factor = _low_high(blocks[..., 6:]) | _high_bits(blocks[..., 2:6]), -16
        else:  # Q5_1
            q, scales, biases = _low_high(blocks[..., 8:]) | _high_bits(blocks[..., 4:8]), d, _half(blocks, 2)
        if factor is not None:
            scales, biases = _scales_biases(d, factor)
    if words is None:
        words = pack(np.ascontiguousarray(q).reshape(n, -1), bits)
    if factor is not None and scales.dtype == np.float16:
        return SymmetricWeight(words, scales, factor, 32, bits)
    return QuantizedWeight(words, scales, biases, 32, bits)


def _k_affine(blocks: np.ndarray, qtype: str):
    """Q4_K / Q5_K blocks [rows, nb, bytes] -> codes [rows, nb, 8, 32], float32 scales d*sc and biases -dmin*m."""
    from gguf.quants import Q4_K

    n, nb = blocks.shape[:2]
    d, dmin = _half(blocks, 0).astype(np.float32), _half(blocks, 2).astype(np.float32)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    scales = (d[..., None] * sc.reshape(n, nb, 8).astype(np.float32)).reshape(n, -1)
    biases = -(dmin[..., None] * m.reshape(n, nb, 8).astype(np.float32)).reshape(n, -1)
    qs = blocks[..., 16:] if qtype == "Q4_K" else blocks[..., 48:]
    q = (qs.reshape(n, nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)) & np.uint8(0x0F)
    q = q.reshape(n, nb, 8, 32)
    if qtype == "Q5_K":
        qh = blocks[..., 16:48].reshape(n, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
        q = q | ((qh & np.uint8(1)) << np.uint8(4))
    return q, scales, biases


def dequantize_any(w, dtype=np.float32) -> np.ndarray:
    """A QuantizedWeight or GGMLWeight as a float matrix (dtype), exactly; other arrays as they are."""
    if isinstance(w, GGMLWeight):
        return w.dequantize().astype(dtype, copy=False)
    if isinstance(w, QuantizedWeight):
        return dequantize(w, dtype)
    return np.asarray(w)
