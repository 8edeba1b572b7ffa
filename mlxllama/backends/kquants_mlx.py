"""GGUF blocks with no exact MLX affine form (Q6_K, Q3_K and Q2_K, whose scales cover 16 elements where MLX's
groups are at least 32; IQ4_NL and IQ4_XS, whose codes index a non-uniform table), decoded with MLX ops.

MLX's fallback for these types (mlx_ops.prepare_linear): the file's blocks stay resident as they are (uint8), and each
product decodes its weight into a float32 transient, then multiplies; the values are gguf.quants.dequantize's, each
operation in the same order. Slower than mx.quantized_matmul (one weight's float copy per product), at the file's
memory. The types that do have an exact affine form take mx.quantized_matmul (quant.ggml_affine).
"""

from __future__ import annotations

import mlx.core as mx

# type -> (elements per block, bytes per block)
RAW_TYPES = {"Q2_K": (256, 84), "Q3_K": (256, 110), "Q6_K": (256, 210), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}
_IQ4 = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _u8(values) -> mx.array:
    return mx.array(values, dtype=mx.uint8)


def _half(b: mx.array, at: int) -> mx.array:
    """The float16 field at byte `at` of each block, as float32 [..., 1]."""
    return mx.view(mx.contiguous(b[..., at:at + 2]), mx.float16).astype(mx.float32)


def _split(x: mx.array, shifts, mask: int, width: int) -> mx.array:
    """x [..., n] -> [..., len(shifts), n]: (x >> shift) & mask for each shift (GGUF's bit-plane order)."""
    return (x.reshape(*x.shape[:-1], 1, width) >> _u8(shifts).reshape(-1, 1)) & mask


def _q6_k(b: mx.array) -> mx.array:
    r, nb = b.shape[:2]
    d = _half(b, 208)
    dsc = (d * mx.view(mx.contiguous(b[..., 192:208]), mx.int8).astype(mx.float32)).reshape(r, nb, 16, 1)
    ql = _split(b[..., 0:128].reshape(r, nb, 2, 64), [0, 4], 0x0F, 64).reshape(r, nb, 8, 32)
    qh = _split(b[..., 128:192].reshape(r, nb, 2, 32), [0, 2, 4, 6], 0x03, 32).reshape(r, nb, 8, 32)
    q = ((ql | (qh << 4)).astype(mx.int8) - 32).astype(mx.float32).reshape(r, nb, 16, 16)
    return dsc * q


def _q3_k(b: mx.array) -> mx.array:
    r, nb = b.shape[:2]
    d = _half(b, 108)
    low = _split(b[..., 96:104], [0, 4], 0x0F, 8).reshape(r, nb, 16)
    high = _split(b[..., 104:108], [0, 2, 4, 6], 0x03, 4).reshape(r, nb, 16)
    sc = ((low | (high << 4)).astype(mx.int8) - 32).astype(mx.float32)
    dl = (d * sc).reshape(r, nb, 16, 1)
    ql = _split(b[..., 32:96].reshape(r, nb, 2, 32), [0, 2, 4, 6], 0x03, 32).reshape(r, nb, 16, 16)
    qh = _split(b[..., 0:32], list(range(8)), 0x01, 32).reshape(r, nb, 16, 16)
    q = (ql.astype(mx.int8) - ((qh ^ 1) << 2).astype(mx.int8)).astype(mx.float32)
    return dl * q


def _q2_k(b: mx.array) -> mx.array:
    r, nb = b.shape[:2]
    d, dmin = _half(b, 80), _half(b, 82)
    sc = b[..., 0:16]
    dl = (d * (sc & 0x0F).astype(mx.float32)).reshape(r, nb, 16, 1)
    ml = (dmin * (sc >> 4).astype(mx.float32)).reshape(r, nb, 16, 1)
    q = _split(b[..., 16:80].reshape(r, nb, 2, 32), [0, 2, 4, 6], 0x03, 32).reshape(r, nb, 16, 16)
    return dl * q.astype(mx.float32) - ml


def _iq4_nl(b: mx.array) -> mx.array:
    r, nb = b.shape[:2]
    q = _split(b[..., 2:18], [0, 4], 0x0F, 16).reshape(r, nb, 32)
    return _half(b, 0) * mx.take(mx.array(_IQ4, dtype=mx.float32), q.astype(mx.uint32))


def _iq4_xs(b: mx.array) -> mx.array:
    r, nb = b.shape[:2]
    d = _half(b, 0)
    low = ((b[..., 4:8].reshape(r, nb, 4, 1) >> _u8([0, 4])) & 0x0F).reshape(r, nb, 8)
    sh = mx.view(mx.contiguous(b[..., 2:4]), mx.uint16)  # [r, nb, 1]
    high = ((sh >> mx.array(list(range(0, 16, 2)), dtype=mx.uint16)) & 0x03).astype(mx.uint8)
    sc = ((low | (high << 4)).astype(mx.int8) - 32).astype(mx.float32)
    dl = (d * sc).reshape(r, nb, 8, 1)
    q = _split(b[..., 8:136].reshape(r, nb, 8, 16), [0, 4], 0x0F, 16).reshape(r, nb, 8, 32)
    return dl * mx.take(mx.array(_IQ4, dtype=mx.float32), q.astype(mx.uint32))


_DECODE = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q6_K": _q6_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}


def decode(qtype: str, blocks: mx.array) -> mx.array:
    """blocks uint8 [rows, n_blocks, block_bytes] of a RAW_TYPES type -> float32 [rows, n_blocks * elements]."""
    return _DECODE[qtype](blocks).reshape(blocks.shape[0], -1)
