"""How the numpy backend lays weights out: float32 [in, out] matrices, the "quantized" mode's codes (QLinear), the
rope table, and the widening of quantized KV. The fused mode's layout (PackedLinear) is in qmatvec.py."""

from __future__ import annotations

import numpy as np

from ..weights import QuantizedWeight
from .contract import QuantizedKV

CHUNK_ROWS = 4096  # rows dequantized at a time while laying weights out at load


class QLinear:
    """A quantized [in, out] matrix in "quantized" mode: codes[i, o] (4-bit: rows i and i + in/2 share a byte,
    low nibble first), float32 scales and biases [in / group, 1, out]; w = scale * code + bias."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int):
        self.codes, self.scales, self.biases = codes, scales, biases
        self.group_size, self.bits = group_size, bits
        self.shape = (scales.shape[0] * group_size, scales.shape[2])

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.biases.nbytes


def dense_linear(parts: list) -> np.ndarray:
    """Same-input projections fused by output rows, as one float32 [in, sum(out)] matrix."""
    cols = sum(p.shape[0] for p in parts)
    out = np.empty((parts[0].shape[1], cols), np.float32)
    o = 0
    for p in parts:
        for r in range(0, p.shape[0], CHUNK_ROWS):
            rows = dense_rows(p, r, min(r + CHUNK_ROWS, p.shape[0]))
            out[:, o + r: o + r + rows.shape[0]] = rows.T
        o += p.shape[0]
    return out


class RopeTable:
    """cos and sign-folded sin of position * inv_freq over the full head width, grown on demand:
    cos = [c, c], sin = [-s, s], so that rope(x) = x * cos + [x2, x1] * sin."""

    def __init__(self, inv_freq: np.ndarray):
        self.inv_freq = inv_freq.astype(np.float64)
        self.cos = np.zeros((0, 2 * inv_freq.shape[0]), np.float32)
        self.sin = self.cos

    def get(self, offset: int, length: int):
        end = offset + length
        if end > self.cos.shape[0]:
            n = max(end, 2 * self.cos.shape[0], 256)
            ang = np.arange(n, dtype=np.float64)[:, None] * self.inv_freq[None, :]
            c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
            self.cos, self.sin = np.concatenate([c, c], axis=1), np.concatenate([-s, s], axis=1)
        return self.cos[offset:end], self.sin[offset:end]


def dequantize_kv(x: QuantizedKV) -> np.ndarray:
    """float32 [B, KV, T, D]: scale * q + bias in float32, as mx.quantized_matmul forms them."""
    from ..quant import unpack

    B, KV, T, D = x.shape
    q = unpack(np.ascontiguousarray(x.data), x.bits).reshape(B, KV, T, D // x.group_size, x.group_size)
    w = q.astype(np.float32)
    w *= x.scales[..., None]
    w += x.biases[..., None]
    return w.reshape(B, KV, T, D)


def dense_rows(w, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a weight as float32 [rows, in]; quantized rows are dequantized with float32 scales,
    as mx.quantized_matmul does with float32 inputs (and GGUF's own dequantization)."""
    if isinstance(w, QuantizedWeight):
        from ..quant import dequantize

        part = QuantizedWeight(w.weight[start:stop], w.scales[start:stop].astype(np.float32),
                               w.biases[start:stop].astype(np.float32), w.group_size, w.bits)
        return dequantize(part, np.float32)
    return np.asarray(w[start:stop], dtype=np.float32)


def quantized_linear(parts: list[QuantizedWeight]) -> QLinear:
    """Codes transposed to [in, out] (4-bit: nibble-packed as in QLinear), scales and biases [in / g, 1, out]."""
    from ..quant import unpack

    p0 = parts[0]
    n_in, n_out = p0.shape[1], sum(p.shape[0] for p in parts)
    half = n_in // 2
    nibbles = p0.bits == 4 and n_in % 2 == 0
    codes = np.empty((half if nibbles else n_in, n_out), np.uint8)
    scales = np.empty((n_in // p0.group_size, 1, n_out), np.float32)
    biases = np.empty_like(scales)
    o = 0
    for p in parts:
        for r in range(0, p.shape[0], CHUNK_ROWS):
            s = slice(r, min(r + CHUNK_ROWS, p.shape[0]))
            q = unpack(np.ascontiguousarray(p.weight[s]), p.bits).T  # [in, rows]
            cols = slice(o + s.start, o + s.stop)
            codes[:, cols] = (q[:half] | (q[half:] << 4)) if nibbles else q
            scales[:, 0, cols] = p.scales[s].T
            biases[:, 0, cols] = p.biases[s].T
        o += p.shape[0]
    return QLinear(codes, scales, biases, p0.group_size, p0.bits)


def codes_block(w: QLinear, cols: slice, out: np.ndarray) -> np.ndarray:
    """The codes of columns `cols` of w, as float32 [in, n] in out."""
    codes = w.codes[:, cols]
    if w.codes.shape[0] != w.shape[0]:  # nibble-packed
        half = w.shape[0] // 2
        np.bitwise_and(codes, 15, out=out[:half], casting="unsafe")
        np.right_shift(codes, 4, out=out[half:], casting="unsafe")
    else:
        np.copyto(out, codes, casting="unsafe")
    return out


def dequantize_columns(w: QLinear, ids: np.ndarray) -> np.ndarray:
    """Columns `ids` (an index array) of w as float32 [in, len(ids)]."""
    codes = w.codes[:, ids]
    if w.codes.shape[0] != w.shape[0]:
        codes = np.concatenate([codes & 15, codes >> 4], axis=0)
    out = codes.astype(np.float32).reshape(-1, w.group_size, len(ids))
    out *= w.scales[:, :, ids]
    out += w.biases[:, :, ids]
    return out.reshape(w.shape[0], len(ids))
