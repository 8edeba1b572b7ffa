"""The numpy backend's products: x2 [rows, in] @ W for each weight layout (numpy_layouts, qmatvec), split over
the backend's worker threads; and the pieces of blocked attention."""

from __future__ import annotations

import numpy as np

from .numpy_layouts import QLinear, codes_block
from .numpy_threads import PREFETCH, Workers, column_blocks, spans

PARALLEL_ROWS = 16  # products with at least this many rows are split over the worker threads
GEMM_BLOCK = 1 << 20  # bytes of float32 weight per column block in a product of 2..PARALLEL_ROWS - 1 rows
QUANT_BLOCK = 1 << 20  # weights dequantized at a time for BLAS (4 MB of float32; 8 MB was no faster on pp512)
FUSED_SPLIT = 1 << 21  # "fused" mode: products of at least this many multiply-adds (~100 us) are shared


def dense_matmul(workers: Workers, x2: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x2 @ w for a float32 [in, out] matrix. One row goes through gemv with a 1-D vector (numpy would otherwise
    call gemm with one row, about half as fast)."""
    rows = x2.shape[0]
    if rows == 1:
        return np.matmul(x2[0], w)[None]
    y = np.empty((rows, w.shape[1]), np.float32)
    if rows < PARALLEL_ROWS:
        # a few rows (a batched decode step): a packed sgemm over the whole weight would copy all of it per call;
        # instead one column block at a time, each small enough to stay in cache while every row uses it
        step = max(64, GEMM_BLOCK // (4 * w.shape[0]) // 64 * 64)
        blocks = [slice(c, min(c + step, w.shape[1])) for c in range(0, w.shape[1], step)]
    elif workers.threads == 1:
        return np.matmul(x2, w)
    else:
        blocks = column_blocks(w.shape[1], workers.threads)
    workers.run(lambda c: np.matmul(x2, w[:, c], out=y[:, c]), blocks)
    return y


def quantized_matmul(workers: Workers, x2: np.ndarray, w: QLinear, step_workers: int) -> np.ndarray:
    """x2 @ w, a block of columns at a time, each block's codes widened to float32 in a scratch buffer.
    Several rows: the block is dequantized (scale * q + bias) and multiplied. One row: the codes are multiplied
    per group and scaled afterwards, y = sum_g scale_g * (x_g . q_g) + bias_g * sum(x_g), two passes fewer
    over the block (same weights, another rounding order: ~1e-6 relative)."""
    n_in, n_out = w.shape
    g = w.group_size
    rows = x2.shape[0]
    out = np.empty((rows, n_out), np.float32)
    step = max(64, QUANT_BLOCK // n_in // 64 * 64)  # columns widened at a time
    nworkers = workers.threads if rows >= PARALLEL_ROWS else step_workers
    if rows == 1:
        xg = x2[0].reshape(-1, 1, g)
        xsum = xg.sum(axis=(1, 2))

    def block(cols: slice):
        n = cols.stop - cols.start
        codes = codes_block(w, cols, workers.scratch(n_in * step)[: n_in * n].reshape(n_in, n))
        grouped = codes.reshape(-1, g, n)
        if rows == 1:
            part = np.matmul(xg, grouped)[:, 0, :]  # [groups, n]
            part *= w.scales[:, 0, cols]
            y = out[0, cols]
            np.sum(part, axis=0, out=y)
            y += xsum @ w.biases[:, 0, cols]
        else:
            np.multiply(grouped, w.scales[:, :, cols], out=grouped)
            np.add(grouped, w.biases[:, :, cols], out=grouped)
            np.matmul(x2, codes, out=out[:, cols])

    def span(r: slice):
        for c in range(r.start, r.stop, step):
            block(slice(c, min(c + step, r.stop)))

    # one span per worker for a single row (each handoff costs), several per worker for many (load sharing)
    workers.run(span, spans(n_out, nworkers if rows == 1 else 4 * nworkers))
    return out


def fused_matmul(workers: Workers, x2: np.ndarray, w, step_workers: int, prefetch: int = PREFETCH) -> np.ndarray:
    """x2 @ w for a qmatvec.PackedLinear: the integer tiles for any number of rows, over spans of output columns
    (the input rounded once, every span reading it). Long prefills take them too: on one Zen 4 core (4096 x 4096
    4-bit, benchmarks/kernels.py) they make about 80 G multiply-adds/s from 32 rows up, where numpy's float32
    sgemm alone makes 24-50 at 32 to 512 rows, before any dequantizing (benchmarks/README.md)."""
    n_in, n_out = w.shape
    rows = x2.shape[0]
    # a step's thread count is timed; products too small to share stay on this thread (handoffs cost)
    nworkers = step_workers if rows == 1 else workers.threads
    if nworkers == 1 or rows * n_in * n_out < FUSED_SPLIT:
        return w.matmul(x2, prefetch)  # one compiled call
    out = np.empty((rows, n_out), np.float32)
    x2 = np.ascontiguousarray(x2, dtype=np.float32)
    xq, dxs = w.input_buffers(rows)
    workers.by_rows(lambda r: w.quantize_input(x2[r], (xq[r], dxs[:, :, r])), rows, x2.size)
    xin = xq, dxs
    parts = spans(n_out, (8 if rows == 1 else 4) * nworkers)
    workers.share(lambda c: w.rows(xin, out, c.start, c.stop, prefetch), parts, nworkers)
    return out


QUERY_BLOCK = 128


def query_block(heads: int, keys: int) -> int:
    """Queries a causal attention block takes at a time: QUERY_BLOCK, fewer where their scores [heads, block, keys]
    would pass QUANT_BLOCK floats (the scores live in the thread's scratch, which dequantized weights also use:
    long contexts do not widen it), never under 16."""
    return max(16, min(QUERY_BLOCK, QUANT_BLOCK // max(1, heads * keys)))


_BIAS: dict[int, np.ndarray] = {}


def causal_bias(n: int) -> np.ndarray:
    """[n, n]: 0 on and below the diagonal, -inf above."""
    if n not in _BIAS:
        _BIAS[n] = np.triu(np.full((n, n), -np.inf, np.float32), 1)
    return _BIAS[n]


def softmax_product(scores: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(scores) @ v, with scores overwritten."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    den = scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, v)
    out /= den
    return out
