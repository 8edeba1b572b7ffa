"""numpy implementation of the backend ops: BLAS does the products, everything else is a few ufuncs.

Weights are laid out once at load as [in, out] float32 matrices ("W transposed"), so that a decode step's
matrix-vector product is BLAS's column-major gemv, the fastest form numpy reaches.
The embedding table is stored the same way, [hidden, vocab]: the tied output head reads it as is, and a token's
embedding is one of its columns.

Weight modes (NumpyOps(weights=...), or MLXLLAMA_NUMPY_WEIGHTS):
  "fused"      4-bit and 8-bit weights stay as stored (MLX's packed words, scales and biases: the file's
               bytes), read by the fused kernel of qmatvec.py (numba, the `fast-cpu` extra) for
               products of up to 16 rows; longer ones dequantize a block of rows at a time for BLAS. The fastest
               decode; inputs are rounded to int16 per block of 32 (~1e-5 relative, see qmatvec).
  "float32"    quantized weights are dequantized once at load: 4 bytes per weight; the fastest prefill.
  "quantized"  plain numpy: codes kept (4-bit: two per byte) with float32 scales and biases, widened into a
               cache-sized scratch buffer a block at a time, per use: about a fifth of float32's memory,
               slower decode, prefill nearly as fast (benchmarks/README.md has the figures).
  "auto"       (default) "fused" from the first 4- or 8-bit weight on where numba is installed, else "float32"
               (with a one-line notice when a quantized model is widened).
All use the same weights (scale * q + bias in float32, as mx.quantized_matmul forms them); a quantized decode step
sums per group before scaling, another rounding order (~1e-6 relative). Other bit widths than 4 and 8 use the
"quantized" layout in "fused" mode.

A NumpyOps may be used from several threads at once: what one forward pass decides (its thread count) is kept per
thread, and the process-wide OpenBLAS thread count is set only while some forward pass runs and restored after
the last one ends (_BlasThreads).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
import time

import numpy as np

from ..errors import UsageError
from ..weights import QuantizedWeight
from .contract import QuantizedKV

NOT_DISTRIBUTED = "the numpy backend runs in one process; distributed inference (--parallel) needs --backend mlx"

WEIGHT_MODES = ("auto", "fused", "float32", "quantized")
_BLOCK = 1 << 21  # weights dequantized at a time in "quantized" mode (8 MB of float32: stays in cache)
_CHUNK_ROWS = 4096  # rows dequantized at a time while laying weights out at load
_PARALLEL_ROWS = 16  # products with at least this many rows are split over the worker threads
_GEMM_BLOCK = 1 << 20  # bytes of float32 weight per column block in a product of 2.._PARALLEL_ROWS - 1 rows
_FUSED_ROWS = 16  # "fused" mode: products of at most this many rows run the fused kernel, longer ones BLAS
_FUSED_SPLIT = 1 << 21  # "fused" mode: single-row products of at least this many weights (~60 us) are shared


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


class NumpyOps:
    """The backend contract (contract.py) over numpy and its BLAS."""

    name = "numpy"
    on_gpu = False
    lazy = False
    float_dtype = np.float32
    float_bytes = kv_bytes = 4

    def __init__(self, weights: str | None = None, threads: int | None = None):
        """weights: "auto" (default), "fused", "float32" or "quantized" (see the module doc). threads: workers
        for multi-row products and quantized blocks (default: the CPUs this process may use)."""
        mode = weights or os.environ.get("MLXLLAMA_NUMPY_WEIGHTS") or "auto"
        if mode not in WEIGHT_MODES:
            raise UsageError(f"numpy weights mode must be one of {', '.join(WEIGHT_MODES)}, got {mode!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        self._auto = mode == "auto"
        if mode == "fused" and _qmatvec() is None:
            _notice(f"the fused kernel needs numba ({_QMATVEC_ERROR}): quantized weights stay quantized, "
                    "in plain numpy (pip install 'mlxllama[fast-cpu]')")
            mode = "quantized"
        self.weights_mode = "float32" if self._auto else mode  # auto: "fused" at the first 4/8-bit weight
        self.threads = threads or _cpu_count()
        self._pool = None
        self._scratch: dict[int, np.ndarray] = {}  # per worker thread, for on-the-fly dequantization
        self._local = threading.local()  # per calling thread: forward-pass depth and step workers
        choose = self.threads > 1 and (mode != "float32" or _blas.available)
        self._choice = _ThreadChoice((1, self.threads) if choose else (1,))

    @property
    def keeps_quantized(self) -> bool:
        """Quantized weights stay packed: "fused", "quantized", and "auto" where numba imports (it chooses "fused"
        at the first quantized weight, so callers may ask before the model is laid out)."""
        return self.weights_mode in ("quantized", "fused") or (self._auto and _qmatvec() is not None)

    def device(self) -> str:
        return "cpu (numpy)"

    # -- weight preparation (once, at load) -----------------------------------------------------------------

    def prepared_nbytes(self, w) -> int:
        """Bytes prepare_* will hold for a loader's tensor: float32 everywhere in "float32" mode; in "fused" mode
        (and "auto" where numba imports) 4/8-bit tensors as stored; in "quantized" mode codes (4-bit two per byte,
        others one per byte) with float32 scales and biases."""
        if hasattr(type(w), "prepare_numpy"):  # [kquant hook: the kernel branch has the reconciled form]
            return int(w.numpy_nbytes())
        fused = self.weights_mode == "fused" or (self._auto and _qmatvec() is not None)
        if isinstance(w, QuantizedWeight) and fused and w.bits in _qmatvec().BITS:
            return int(w.nbytes)
        if isinstance(w, QuantizedWeight) and (self.weights_mode == "quantized" or fused):
            rows, cols = w.shape
            code = 0.5 if w.bits == 4 and cols % 2 == 0 else 1
            return int(rows * cols * code) + 2 * int(w.scales.size) * 4
        return int(np.prod(w.shape)) * 4

    def prepare_linear(self, parts: list):
        """Fuse same-input projections by output rows; lay the result out as [in, out] (as stored in "fused"
        mode: qmatvec.PackedLinear)."""
        hooked = [type(p) for p in parts if hasattr(type(p), "prepare_numpy")]  # [kquant hook]
        if hooked:
            return hooked[0].prepare_numpy(parts)
        quantized = all(isinstance(p, QuantizedWeight) for p in parts)
        if quantized and len({(p.bits, p.group_size) for p in parts}) == 1:
            if self._auto and self.weights_mode == "float32":
                self.weights_mode = "fused" if _qmatvec() is not None else "float32"
                if self.weights_mode == "float32":
                    _notice(f"numba is not usable ({_QMATVEC_ERROR}): quantized weights are widened to float32, "
                            "4 bytes each (pip install 'mlxllama[fast-cpu]' for the fused 4-bit kernel)")
            if self.weights_mode == "fused" and parts[0].bits in _qmatvec().BITS:
                return _qmatvec().PackedLinear(parts)
            if self.weights_mode in ("quantized", "fused"):
                return _quantized_linear(parts)
        cols = sum(p.shape[0] for p in parts)
        out = np.empty((parts[0].shape[1], cols), np.float32)
        o = 0
        for p in parts:
            for r in range(0, p.shape[0], _CHUNK_ROWS):
                rows = _dense_rows(p, r, min(r + _CHUNK_ROWS, p.shape[0]))
                out[:, o + r: o + r + rows.shape[0]] = rows.T
            o += p.shape[0]
        return out

    def prepare_norm(self, w) -> np.ndarray:
        return np.array(w, dtype=np.float32)  # a copy: no view keeps a loader's file mapping alive

    def prepare_embedding(self, w):
        return self.prepare_linear([w])  # [hidden, vocab]: a token's embedding is a column

    def tied_head(self, embedding):
        return embedding

    def rope_table(self, inv_freq: np.ndarray):
        return RopeTable(inv_freq)

    def compile(self, fn):
        return fn

    @contextlib.contextmanager
    def forward_scope(self, rows: int):
        """Around one forward pass (the outermost of nested scopes decides). Multi-row products run BLAS
        single-threaded, split by columns over this backend's own worker threads (see _run), which share the work
        dynamically. Single-row steps are bound by memory bandwidth: OpenBLAS's threaded gemv is faster than one
        thread while another core is idle, and many times slower when other processes hold the cores, so the thread
        count of these steps is chosen by timing them (_ThreadChoice)."""
        local = self._local
        if getattr(local, "depth", 0):
            local.depth += 1
            try:
                yield
            finally:
                local.depth -= 1
            return
        threads = self._choice.pick() if rows == 1 else 1
        # float32 weights: BLAS's threads split the gemv; quantized: this backend's workers split the columns
        local.depth, local.step_workers = 1, threads
        t0 = time.perf_counter()
        try:
            with _blas_threads.held(threads if self.weights_mode == "float32" else 1):
                yield
        finally:
            local.depth, local.step_workers = 0, 1
            if rows == 1:
                self._choice.record(threads, time.perf_counter() - t0)

    # -- ops used by the forward pass ------------------------------------------------------------------------

    def asarray(self, tokens) -> np.ndarray:
        return np.asarray(tokens, dtype=np.int64)

    def embedding(self, table, ids: np.ndarray, start: int | None = None) -> np.ndarray:
        """Columns `ids` of the [hidden, vocab] table, as [*ids.shape, hidden]."""
        if start is not None:
            raise UsageError(NOT_DISTRIBUTED)
        flat = ids.reshape(-1)
        if isinstance(table, QLinear):
            cols = _dequantize_columns(table, flat)
        elif not isinstance(table, np.ndarray):  # qmatvec.PackedLinear: [vocab, hidden] rows as stored
            out = np.empty((flat.shape[0], table.shape[0]), np.float32)
            for j, i in enumerate(flat.tolist()):
                table.dequantize(i, i + 1, out[j: j + 1])
            return out.reshape(*ids.shape, -1)
        else:
            cols = table[:, flat]
        return np.ascontiguousarray(cols.T).reshape(*ids.shape, -1)

    def linear(self, x: np.ndarray, w) -> np.ndarray:
        """x [..., in] @ w [in, out]. One row goes through gemv with a 1-D vector (numpy would otherwise call
        gemm with one row, about half as fast)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        if hasattr(w, "matmul"):  # [kquant hook] a weight type's own product (backends/kquants.py)
            y = w.matmul(x2)
        elif isinstance(w, QLinear):
            y = self._quantized_matmul(x2, w)
        elif not isinstance(w, np.ndarray):  # qmatvec.PackedLinear
            y = self._fused_matmul(x2, w)
        elif rows == 1:
            y = np.matmul(x2[0], w)
        elif rows < _PARALLEL_ROWS:
            # a few rows (a batched decode step): a packed sgemm over the whole weight would copy all of it per
            # call; instead one column block at a time, each small enough to stay in cache while every row uses it
            y = np.empty((rows, w.shape[1]), np.float32)
            step = max(64, _GEMM_BLOCK // (4 * w.shape[0]) // 64 * 64)
            blocks = [slice(c, min(c + step, w.shape[1])) for c in range(0, w.shape[1], step)]
            self._run(lambda c: np.matmul(x2, w[:, c], out=y[:, c]), blocks)
        elif self.threads == 1:
            y = np.matmul(x2, w)
        else:
            y = np.empty((rows, w.shape[1]), np.float32)
            self._run(lambda c: np.matmul(x2, w[:, c], out=y[:, c]), _column_blocks(w.shape[1], self.threads))
        return y.reshape(*lead, -1)

    def _quantized_matmul(self, x2: np.ndarray, w: QLinear) -> np.ndarray:
        """x2 @ w, a block of columns at a time, each block's codes widened to float32 in a scratch buffer.
        Several rows: the block is dequantized (scale * q + bias) and multiplied. One row: the codes are multiplied
        per group and scaled afterwards, y = sum_g scale_g * (x_g . q_g) + bias_g * sum(x_g), two passes fewer
        over the block (same weights, another rounding order: ~1e-6 relative)."""
        n_in, n_out = w.shape
        g = w.group_size
        rows = x2.shape[0]
        out = np.empty((rows, n_out), np.float32)
        step = max(64, _BLOCK // n_in // 64 * 64)  # columns widened at a time
        workers = self.threads if rows >= _PARALLEL_ROWS else getattr(self._local, "step_workers", 1)
        if rows == 1:
            xg = x2[0].reshape(-1, 1, g)
            xsum = xg.sum(axis=(1, 2))

        def block(cols: slice):
            n = cols.stop - cols.start
            codes = _codes_block(w, cols, self._scratch_for(n_in * step)[: n_in * n].reshape(n_in, n))
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
        self._run(span, _spans(n_out, workers if rows == 1 else 4 * workers))
        return out

    def _fused_matmul(self, x2: np.ndarray, w) -> np.ndarray:
        """x2 @ w for a qmatvec.PackedLinear: the fused kernel over spans of output columns for up to _FUSED_ROWS
        rows; above, a block of weight rows at a time dequantized into a scratch buffer and multiplied by BLAS."""
        n_in, n_out = w.shape
        rows = x2.shape[0]
        out = np.empty((rows, n_out), np.float32)
        x2 = np.ascontiguousarray(x2, dtype=np.float32)
        if rows <= _FUSED_ROWS:
            xin = w.quantize_input(x2)
            if rows == 1:  # a step's thread count is timed; small products stay on this thread (handoffs cost)
                workers = getattr(self._local, "step_workers", 1) if n_in * n_out >= _FUSED_SPLIT else 1
                self._share(lambda c: w.rows(xin, out, c.start, c.stop), _spans(n_out, 8 * workers), workers)
            else:
                self._run(lambda c: w.rows(xin, out, c.start, c.stop), _spans(n_out, 4 * self.threads))
            return out
        step = max(64, _BLOCK // n_in // 64 * 64)  # weight rows dequantized at a time

        def span(c: slice):
            scratch = self._scratch_for(step * n_in)
            for o in range(c.start, c.stop, step):
                e = min(o + step, c.stop)
                block = w.dequantize(o, e, scratch[: (e - o) * n_in].reshape(e - o, n_in))
                np.matmul(x2, block.T, out=out[:, o:e])

        self._run(span, _spans(n_out, 4 * self.threads))
        return out

    def _share(self, fn, items: list, workers: int) -> None:
        """fn(item) for every item, claimed one at a time by this thread and workers - 1 pool threads: a thread
        slowed by another process leaves its share to the others, and this thread never waits for a pool thread
        that has not started (one that starts late finds nothing left)."""
        if workers == 1 or len(items) == 1:
            for it in items:
                fn(it)
            return
        import itertools
        import threading

        claim, left, lock, finished = itertools.count(), [len(items)], threading.Lock(), threading.Event()
        errors: list[BaseException] = []

        def work():
            for i in iter(claim.__next__, None):
                if i >= len(items):
                    return
                try:
                    fn(items[i])
                except BaseException as e:  # raised again by the calling thread
                    errors.append(e)
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        finished.set()

        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mlxllama-numpy")
        for _ in range(workers - 1):
            self._pool.submit(work)
        work()
        finished.wait()
        if errors:
            raise errors[0]

    def _scratch_for(self, size: int) -> np.ndarray:
        import threading

        key = threading.get_ident()
        buf = self._scratch.get(key)
        if buf is None or buf.size < size:
            buf = self._scratch[key] = np.empty(size, np.float32)
        return buf

    def _run(self, fn, items: list) -> None:
        """fn(item) for every item, on the worker threads (numpy releases the GIL in BLAS and ufunc loops)."""
        if self.threads == 1 or len(items) == 1:
            for it in items:
                fn(it)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mlxllama-numpy")
        for f in [self._pool.submit(fn, it) for it in items]:
            f.result()

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        d = x.shape[-1]
        if x.size == d:
            v = x.reshape(-1)
            out = v * np.float32(1.0 / math.sqrt(float(np.dot(v, v)) / d + eps))
        else:
            ms = np.einsum("...i,...i->...", x, x)[..., None] / np.float32(d)
            out = x * (np.float32(1.0) / np.sqrt(ms + np.float32(eps)))
        out *= w
        return out.reshape(x.shape)

    def rope(self, x: np.ndarray, offset: int, table: RopeTable) -> np.ndarray:
        """Non-interleaved (HF order) rotation of x [B, H, L, D]: x * cos + rotate_half(x) * sin."""
        cos, sin = table.get(offset, x.shape[2])
        out = x * cos
        half = x.shape[-1] // 2
        swapped = x.reshape(*x.shape[:-1], 2, half)[..., ::-1, :].reshape(x.shape)  # [x2, x1] (a copy)
        swapped *= sin  # sin is [-sin, sin] across the two halves
        out += swapped
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool,
                  window: int | None = None) -> np.ndarray:
        """q [B, H, L, D]; k, v [B, KV, T, D] with H a multiple of KV. Causal mask aligned bottom-right; with a
        window, a query sees itself and the window - 1 keys before it. Queries go in blocks, each against only the
        keys it can see (about half the work of a full causal L x T score matrix); the softmax is normalized after
        the product with v (a [.., D] division, not [.., T])."""
        B, H, L, D = q.shape
        KV, T = k.shape[1], k.shape[2]
        if window is not None and T <= window:
            window = None
        if window is not None and L == 1:
            if isinstance(k, QuantizedKV):
                k, v = k.sliced(-window), v.sliced(-window)
            else:
                k, v = k[:, :, -window:], v[:, :, -window:]
            T, window = window, None
        if isinstance(k, QuantizedKV):  # a quantized cache: widened here, per call (numpy has no quantized matmul)
            k, v = _dequantize_kv(k), _dequantize_kv(v)
        rep = H // KV
        qg = (q * np.float32(scale)).reshape(B, KV, rep, L, D)
        kt = k.transpose(0, 1, 3, 2)[:, :, None]  # [B, KV, 1, D, T]
        vg = v[:, :, None]
        if not causal or L == 1:
            return _softmax_product(np.matmul(qg, kt), vg).reshape(B, H, L, D)
        out = np.empty((B, KV, rep, L, D), np.float32)
        past = T - L

        def block(s: int):
            e = min(s + _QUERY_BLOCK, L)
            n, end = e - s, past + e
            start = 0 if window is None else max(0, past + s - window + 1)  # keys before it are out of every window
            scores = np.matmul(qg[:, :, :, s:e], kt[..., start:end])  # [B, KV, rep, n, end - start]
            scores[..., end - start - n:] += _causal_bias(n)
            if window is not None:
                too_old = np.arange(start, end)[None, :] <= np.arange(past + s, past + e)[:, None] - window
                scores += np.where(too_old, np.float32(-np.inf), np.float32(0))
            out[:, :, :, s:e] = _softmax_product(scores, vg[:, :, :, start:end])

        self._run(block, list(range(0, L, _QUERY_BLOCK))[::-1])  # longest blocks first
        return out.reshape(B, H, L, D)

    def quantize_kv(self, x: np.ndarray, group_size: int, bits: int) -> QuantizedKV:
        """mx.quantize's format along the last axis, bit for bit (quant.quantize)."""
        from ..quant import quantize

        lead = x.shape[:-1]
        qw = quantize(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1]), group_size, bits)
        return QuantizedKV(qw.weight.reshape(*lead, -1), qw.scales.reshape(*lead, -1), qw.biases.reshape(*lead, -1),
                           group_size, bits)

    def all_sum(self, x):  # one process: the sum over ranks is x (tensor parallelism needs --backend mlx)
        return x

    def all_gather(self, x):
        return x

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        t = np.negative(gate)
        np.exp(t, out=t)
        t += 1.0
        np.divide(gate, t, out=t)
        t *= up
        return t

    def zeros(self, shape, dtype=None) -> np.ndarray:
        return np.zeros(shape, dtype=dtype or np.float32)

    def concatenate(self, arrays, axis: int) -> np.ndarray:
        return np.concatenate(arrays, axis=axis)

    def argmax(self, logits: np.ndarray) -> np.ndarray:
        return logits.argmax(axis=-1)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def eval(self, *xs) -> None:
        pass

    def async_eval(self, *xs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def peak_memory(self) -> int:
        """Peak resident set size of this process, in bytes."""
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


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


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def _column_blocks(n: int, workers: int) -> list[slice]:
    """About four blocks per worker (so a worker slowed by another process leaves its share to the others),
    each a multiple of 64 columns and at least 256."""
    step = max(256, -(-n // (4 * workers) // 64) * 64)
    return [slice(c, min(c + step, n)) for c in range(0, n, step)]


def _spans(n: int, parts: int) -> list[slice]:
    """About `parts` column ranges covering n, multiples of 64 columns."""
    step = max(64, -(-n // parts // 64) * 64)
    return [slice(c, min(c + step, n)) for c in range(0, n, step)]


def _softmax_product(scores: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(scores) @ v, with scores overwritten."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    den = scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, v)
    out /= den
    return out


_QUERY_BLOCK = 128
_BIAS: dict[int, np.ndarray] = {}


def _causal_bias(n: int) -> np.ndarray:
    """[n, n]: 0 on and below the diagonal, -inf above."""
    if n not in _BIAS:
        _BIAS[n] = np.triu(np.full((n, n), -np.inf, np.float32), 1)
    return _BIAS[n]


# -- quantized weights ---------------------------------------------------------------------------------------

def _dequantize_kv(x: QuantizedKV) -> np.ndarray:
    """float32 [B, KV, T, D]: scale * q + bias in float32, as mx.quantized_matmul forms them."""
    from ..quant import unpack

    B, KV, T, D = x.shape
    q = unpack(np.ascontiguousarray(x.data), x.bits).reshape(B, KV, T, D // x.group_size, x.group_size)
    w = q.astype(np.float32)
    w *= x.scales[..., None]
    w += x.biases[..., None]
    return w.reshape(B, KV, T, D)


_QMATVEC = None
_QMATVEC_ERROR = ""
_NOTICES: set[str] = set()


def _qmatvec():
    """The fused kernel module, or None where numba cannot be imported (_QMATVEC_ERROR says why)."""
    global _QMATVEC, _QMATVEC_ERROR
    if _QMATVEC is None and not _QMATVEC_ERROR:
        try:
            from . import qmatvec
        except ImportError as e:  # numba missing, or too old/new for this numpy
            _QMATVEC_ERROR = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            _QMATVEC = qmatvec
    return _QMATVEC


def _notice(line: str) -> None:
    """One line on stderr, once per process."""
    if line not in _NOTICES:
        _NOTICES.add(line)
        import sys

        print(f"mlxllama: {line}", file=sys.stderr)


def _dense_rows(w, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a weight as float32 [rows, in]; quantized rows are dequantized with float32 scales,
    as mx.quantized_matmul does with float32 inputs (and GGUF's own dequantization)."""
    if isinstance(w, QuantizedWeight):
        from ..quant import dequantize

        part = QuantizedWeight(w.weight[start:stop], w.scales[start:stop].astype(np.float32),
                               w.biases[start:stop].astype(np.float32), w.group_size, w.bits)
        return dequantize(part, np.float32)
    return np.asarray(w[start:stop], dtype=np.float32)


def _quantized_linear(parts: list[QuantizedWeight]) -> QLinear:
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
        for r in range(0, p.shape[0], _CHUNK_ROWS):
            s = slice(r, min(r + _CHUNK_ROWS, p.shape[0]))
            q = unpack(np.ascontiguousarray(p.weight[s]), p.bits).T  # [in, rows]
            cols = slice(o + s.start, o + s.stop)
            codes[:, cols] = (q[:half] | (q[half:] << 4)) if nibbles else q
            scales[:, 0, cols] = p.scales[s].T
            biases[:, 0, cols] = p.biases[s].T
        o += p.shape[0]
    return QLinear(codes, scales, biases, p0.group_size, p0.bits)


def _codes_block(w: QLinear, cols: slice, out: np.ndarray) -> np.ndarray:
    """The codes of columns `cols` of w, as float32 [in, n] in out."""
    codes = w.codes[:, cols]
    if w.codes.shape[0] != w.shape[0]:  # nibble-packed
        half = w.shape[0] // 2
        np.bitwise_and(codes, 15, out=out[:half], casting="unsafe")
        np.right_shift(codes, 4, out=out[half:], casting="unsafe")
    else:
        np.copyto(out, codes, casting="unsafe")
    return out


def _dequantize_columns(w: QLinear, ids: np.ndarray) -> np.ndarray:
    """Columns `ids` (an index array) of w as float32 [in, len(ids)]."""
    codes = w.codes[:, ids]
    if w.codes.shape[0] != w.shape[0]:
        codes = np.concatenate([codes & 15, codes >> 4], axis=0)
    out = codes.astype(np.float32).reshape(-1, w.group_size, len(ids))
    out *= w.scales[:, :, ids]
    out += w.biases[:, :, ids]
    return out.reshape(w.shape[0], len(ids))


class _ThreadChoice:
    """The faster of a few options, by timing: each option's step time is a moving average; after trying each
    twice, the best is used and the others are retried now and then, less often each time they lose again
    (every 16 steps, then 32, ... up to 512: a retry that is 20x slower then costs 4%)."""

    def __init__(self, options: tuple[int, ...]):
        self.options = options
        self.avg: dict[int, float] = {}
        self.tries = {o: 0 for o in options}
        self.best = options[0]
        self.interval, self.countdown = 16, 16

    def pick(self) -> int:
        for o in self.options:
            if self.tries[o] < 2:
                return o
        self.countdown -= 1
        if self.countdown <= 0:
            self.countdown = self.interval
            others = [o for o in self.options if o != self.best]
            return others[(self.interval // 16) % len(others)] if others else self.best
        return self.best

    def record(self, option: int, seconds: float) -> None:
        self.tries[option] += 1
        prev = self.avg.get(option)
        self.avg[option] = seconds if prev is None else 0.7 * prev + 0.3 * seconds
        if len(self.avg) < len(self.options):
            return
        best = min(self.avg, key=self.avg.get)
        if best != self.best:
            self.best, self.interval = best, 16
        elif option != self.best:
            self.interval = min(2 * self.interval, 512)


# -- BLAS threads ---------------------------------------------------------------------------------------------

class _OpenBLAS:
    """get/set the thread count of the OpenBLAS numpy links (numpy's Linux and Windows wheels); elsewhere
    (Accelerate on macOS, an unknown BLAS) `available` is False and nothing is changed."""

    NAMES = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
             ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
             ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
             ("openblas_get_num_threads", "openblas_set_num_threads"))

    def __init__(self):
        self._get = self._set = None
        self.available = False
        try:
            libs = self._loaded_openblas()
        except OSError:
            return
        for path in libs:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for get, set_ in self.NAMES:
                if hasattr(lib, get) and hasattr(lib, set_):
                    self._get, self._set = getattr(lib, get), getattr(lib, set_)
                    self._get.restype, self._set.argtypes = ctypes.c_int, [ctypes.c_int]
                    self.available = True
                    return

    @staticmethod
    def _loaded_openblas() -> list[str]:
        if not os.path.exists("/proc/self/maps"):
            return []
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
        return sorted(paths)

    def get(self) -> int:
        return int(self._get())

    def set(self, n: int) -> None:
        self._set(int(n))


_blas = _OpenBLAS()


class _BlasThreads:
    """OpenBLAS's thread count is one setting for the whole process. While forward passes run (from any thread),
    it is the count the latest one asked for; when the last one ends, the count from before the first returns."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._before: int | None = None

    @contextlib.contextmanager
    def held(self, want: int):
        if not _blas.available:
            yield
            return
        with self._lock:
            if self._active == 0:
                self._before = _blas.get()
            self._active += 1
            if _blas.get() != want:
                _blas.set(want)
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0 and _blas.get() != self._before:
                    _blas.set(self._before)


_blas_threads = _BlasThreads()
