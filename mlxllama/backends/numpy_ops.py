"""numpy implementation of the backend ops: BLAS does the products, everything else is a few ufuncs.

Weights are laid out once at load as [in, out] float32 matrices ("W transposed"), so that a decode step's
matrix-vector product is BLAS's column-major gemv, the fastest form numpy reaches.
The embedding table is stored the same way, [hidden, vocab]: the tied output head reads it as is, and a token's
embedding is one of its columns.

Weight modes (NumpyOps(weights=...), or MLXLLAMA_NUMPY_WEIGHTS):
  "fused"      4-bit and 8-bit weights stay as stored (MLX's codes, scales and biases: the file's bytes, with
               each eight output rows laid side by side), read by the integer kernel of qmatvec.py (numba, the
               `fast-cpu` extra) for products of any number of rows, in tiles of rows sharing each decoded
               code vector: the fastest decode and prefill; inputs are rounded to int16 per block of 32 (see
               qmatvec for the error).
  "float32"    quantized weights are dequantized once at load: 4 bytes per weight; the fastest prefill.
  "quantized"  plain numpy: codes kept (4-bit: two per byte) with float32 scales and biases, widened into a
               cache-sized scratch buffer a block at a time, per use: about a fifth of float32's memory,
               slower decode, prefill nearly as fast (benchmarks/README.md has the figures).
  "auto"       (default) "fused" from the first 4- or 8-bit weight on where numba is installed, else "float32"
               (with a one-line notice when a quantized model is widened).
All use the same weights (scale * q + bias in float32, as mx.quantized_matmul forms them); a quantized decode step
sums per group before scaling, another rounding order (~1e-6 relative). Other bit widths than 4 and 8 use the
"quantized" layout in "fused" mode.

Other weight types (a loader's tensor that is not a QuantizedWeight nor an array, e.g. raw GGUF K-quant blocks)
plug in by duck typing, whatever the mode:
  - prepare_linear(parts): if type(parts[0]) has a `prepare_numpy(parts)` static or class method, its result is
    the prepared weight (held as is);
  - linear(x, w): if the prepared w has `matmul(x2) -> y2` (x2 float32 [rows, in], C order; y2 float32
    [rows, out]), it computes the product (on the calling thread; it may use its own threads); one whose class
    sets `takes_workers = True` is called as matmul(x2, workers, nworkers) and may share the product with up to
    nworkers - 1 of this backend's Workers (a step's timed thread count for one row, all of them for more), as
    kquants.KQuantLinear does;
  - embedding(table, ids): a prepared table with `dequantize(o0, o1, out)` (rows o0..o1 of W as float32 into
    out [o1 - o0, in]) and `shape == (in, out)`, as qmatvec.PackedLinear has;
  - prepared_nbytes(w) and the model's accounting read `nbytes` of the loader's tensor and of what
    prepare_numpy returned.

In "fused" mode a single-token step of one sequence runs as one compiled call (numpy_step.DecodeProgram, through
decode_program): every layer and the head on the same kernel, its own buffers, one or two threads by the same timed
choice; other steps, caches and modes run the ops below one by one.

A NumpyOps may be used from several threads at once: what one forward pass decides (its thread count) is kept per
thread, and the process-wide BLAS thread count is set only while some forward pass runs and restored after the
last one ends (numpy_threads.BlasThreads, through threadpoolctl).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
import threading
import time

import numpy as np

from ..errors import UsageError
from ..weights import QuantizedWeight
from .contract import QuantizedKV
from .numpy_kernels import (FUSED_SPLIT, QUERY_BLOCK, causal_bias, dense_matmul, fused_matmul,  # noqa: F401
                            quantized_matmul, query_block, softmax_product)
from .numpy_layouts import (QLinear, RopeTable, dense_linear, dequantize_columns, dequantize_kv,  # noqa: F401
                            quantized_linear)
from .numpy_threads import PREFETCH, Blas, BlasThreads, ThreadChoice, Workers, cpu_count

NOT_DISTRIBUTED = "the numpy backend runs in one process; distributed inference (--parallel) needs --backend mlx"

WEIGHT_MODES = ("auto", "fused", "float32", "quantized")
CAUSAL_ROWS = 16  # a prompt's query rows a compiled attention unit takes (of one K/V head)
_FUSED_SPLIT = FUSED_SPLIT
_ThreadChoice = ThreadChoice
_dequantize_kv = dequantize_kv
_blas = Blas()
_blas_threads = BlasThreads(_blas)


def _custom(w) -> bool:
    """A weight type that prepares itself (see the module doc)."""
    return callable(getattr(type(w), "prepare_numpy", None))


MMAP_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache
def map_large_arrays() -> bool:
    """Arrays under MMAP_THRESHOLD bytes (32 MB: a long prompt's activations) carved from the heap and reused, where
    glibc would map and unmap each on its own until its adaptive threshold has risen (glibc's mallopt
    M_MMAP_THRESHOLD, fixed here): every layer's freed activations were fresh zeroed pages again at the next
    layer, about 150,000 page faults a 512-token prefill of a random 1B Q4_0 model. With it, that prefill went from
    111-116 to 118-127 tokens/s with int16 inputs and from 160 to 189 with int8 (2 Zen 4 cores), and the run's peak
    RSS from 1.28-1.47x to 1.31x the file's weights (compare.py; benchmarks/README.md). Once per process; not where
    the user set MALLOC_MMAP_THRESHOLD_, nor on a C library without mallopt. Returns whether it was set."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        # a fixed threshold also stops glibc raising the heap's trim threshold with it (to twice it): set that too,
        # or every smaller array freed at the heap's top is given back and faulted in again (a 16-stream decode
        # step's logits)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                     2 * MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class NumpyOps:
    """The backend contract (contract.py) over numpy and its BLAS."""

    name = "numpy"
    on_gpu = False
    lazy = False
    float_dtype = np.float32
    float16_dtype = np.float16
    float_bytes = 4
    kv_dtype, kv_bytes = "float16", 2  # as llama.cpp's cache: half the bytes, and half the reads a step
    attends_half = True  # a prompt's compiled rows read float16 K/V as stored; the numpy blocks widen them

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
        self.threads = threads or cpu_count()
        self.workers = Workers(self.threads)
        self._local = threading.local()  # per calling thread: forward-pass depth, step workers and prefetch
        choose = self.threads > 1 and (mode != "float32" or _blas.available)
        prefetch = (PREFETCH, 0) if mode in ("auto", "fused") and _qmatvec() is not None else (0,)
        self._choice = ThreadChoice(tuple((t, p) for t in ((1, self.threads) if choose else (1,)) for p in prefetch))
        self._blas_for_mode()
        map_large_arrays()

    def _blas_for_mode(self) -> None:
        """Packed modes run BLAS one thread per call (multi-row products are split over this backend's workers).
        OpenBLAS ignores a thread count raised or lowered from another thread than the one that set it last, so
        the count is set here, when the mode is known (at load), not by whichever thread runs a forward pass
        (a server's engine thread)."""
        if self.weights_mode != "float32" and _blas.available and _blas.get() != 1:
            _blas.set(1)

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
        (and "auto" where numba imports) 4/8-bit tensors as stored (rows padded to whole octets), less the
        biases the kernel forms from the scales (qmatvec.drops_biases); in "quantized" mode codes (4-bit two per
        byte, others one per byte) with float32 scales and biases; a weight type that prepares itself, its
        nbytes."""
        if _custom(w):
            return int(w.numpy_nbytes() if hasattr(w, "numpy_nbytes") else w.nbytes)
        fused = self.weights_mode == "fused" or (self._auto and _qmatvec() is not None)
        if isinstance(w, QuantizedWeight) and fused and w.bits in _qmatvec().BITS:
            q = _qmatvec()
            per_row = (w.weight.nbytes + w.scales.nbytes * (1 if q.drops_biases([w]) else 2)) / w.weight.shape[0]
            return int(per_row * q.padded_rows(w.weight.shape[0]))
        if isinstance(w, QuantizedWeight) and (self.weights_mode == "quantized" or fused):
            rows, cols = w.shape
            code = 0.5 if w.bits == 4 and cols % 2 == 0 else 1
            return int(rows * cols * code) + 2 * int(w.scales.size) * 4
        return int(np.prod(w.shape)) * 4

    def prepare_linear(self, parts: list):
        """Fuse same-input projections by output rows; lay the result out as [in, out] (as stored in "fused"
        mode: qmatvec.PackedLinear; a weight type with prepare_numpy: what it returns)."""
        custom = [p for p in parts if _custom(p)]
        if custom and len(custom) == len(parts):
            return type(custom[0]).prepare_numpy(parts)
        if custom:  # one projection mixing layouts (GGUF blocks beside float or affine parts): blocks as float32
            parts = [p.dequantize() if _custom(p) else p for p in parts]
        quantized = all(isinstance(p, QuantizedWeight) for p in parts)
        if quantized and len({(p.bits, p.group_size) for p in parts}) == 1:
            if self._auto and self.weights_mode == "float32":
                self.weights_mode = "fused" if _qmatvec() is not None else "float32"
                self._blas_for_mode()
                if self.weights_mode == "float32":
                    _notice(f"numba is not usable ({_QMATVEC_ERROR}): quantized weights are widened to float32, "
                            "4 bytes each (pip install 'mlxllama[fast-cpu]' for the fused 4-bit kernel)")
            if self.weights_mode == "fused" and parts[0].bits in _qmatvec().BITS:
                return _qmatvec().PackedLinear(parts)
            if self.weights_mode in ("quantized", "fused"):
                return quantized_linear(parts)
        return dense_linear(parts)

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

    def decode_program(self, model):
        """The whole single-token step in one compiled call (numpy_step.DecodeProgram), and steps of several rows
        (its .rows, numpy_rows.RowsProgram), where the model's weights are all "fused" and numba imports; else
        None."""
        if self.weights_mode != "fused" or _qmatvec() is None:
            return None
        from .numpy_rows import RowsProgram
        from .numpy_step import DecodeProgram

        program = DecodeProgram.build(model, self)
        if program is not None:
            program.rows = RowsProgram(program)  # steps of several rows, one or several sequences
        return program

    def step_options(self) -> tuple[tuple[int, int], ...]:
        """The (threads, prefetch bytes) a step's timed choice picks from (numpy_threads.PREFETCH)."""
        return self._choice.options

    def step_threads(self) -> int:
        """Threads the current single-row forward pass may use (its timed choice); 1 outside one."""
        return getattr(self._local, "step_workers", 1)

    def prefetch_found(self) -> int:
        """The prefetch of the fastest single-row steps so far (until every option is timed, the first option's:
        PREFETCH where the fused kernel runs, else 0)."""
        return self._choice.best[1]

    def step_prefetch(self) -> int:
        """Bytes ahead that the fused kernel's blocks prefetch in the current single-row forward pass (its timed
        choice); numpy_threads.PREFETCH outside one."""
        return getattr(self._local, "step_prefetch", PREFETCH)

    @contextlib.contextmanager
    def forward_scope(self, rows: int):
        """Around one forward pass (the outermost of nested scopes decides). Multi-row products run BLAS
        single-threaded, split by columns over this backend's own worker threads, which share the work
        dynamically. Single-row steps are bound by memory bandwidth: OpenBLAS's threaded gemv is faster than one
        thread while another core is idle, and many times slower when other processes hold the cores, so the thread
        count of these steps is chosen by timing them (ThreadChoice), and with it whether the fused kernel
        prefetches (step_options); longer passes take the prefetch found so far."""
        local = self._local
        if getattr(local, "depth", 0):
            local.depth += 1
            try:
                yield
            finally:
                local.depth -= 1
            return
        option = self._choice.pick() if rows == 1 else (1, self.prefetch_found())
        threads = option[0]
        # float32 weights: BLAS's threads split the gemv; quantized: this backend's workers split the columns
        local.depth, local.step_workers, local.step_prefetch = 1, threads, option[1]
        t0 = time.perf_counter()
        try:
            with _blas_threads.held(threads if self.weights_mode == "float32" else 1):
                yield
        finally:
            local.depth, local.step_workers, local.step_prefetch = 0, 1, PREFETCH
            if rows == 1:
                self._choice.record(option, time.perf_counter() - t0)

    # -- ops used by the forward pass ------------------------------------------------------------------------

    def asarray(self, tokens) -> np.ndarray:
        return np.asarray(tokens, dtype=np.int64)

    def embedding(self, table, ids: np.ndarray, start: int | None = None) -> np.ndarray:
        """Columns `ids` of the [hidden, vocab] table, as [*ids.shape, hidden]."""
        if start is not None:
            raise UsageError(NOT_DISTRIBUTED)
        flat = ids.reshape(-1)
        if isinstance(table, np.ndarray):
            cols = table[:, flat]
        elif isinstance(table, QLinear):
            cols = dequantize_columns(table, flat)
        else:  # qmatvec.PackedLinear or a weight type with dequantize(): [vocab, hidden] rows
            out = np.empty((flat.shape[0], table.shape[0]), np.float32)
            for j, i in enumerate(flat.tolist()):
                table.dequantize(i, i + 1, out[j: j + 1])
            return out.reshape(*ids.shape, -1)
        return np.ascontiguousarray(cols.T).reshape(*ids.shape, -1)

    def linear(self, x: np.ndarray, w) -> np.ndarray:
        """x [..., in] @ w [in, out], by w's layout (see numpy_kernels)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        step_workers = getattr(self._local, "step_workers", 1)
        if isinstance(w, np.ndarray):
            y = dense_matmul(self.workers, x2, w)
        elif isinstance(w, QLinear):
            y = quantized_matmul(self.workers, x2, w, step_workers)
        elif _qmatvec() is not None and isinstance(w, _qmatvec().PackedLinear):
            y = fused_matmul(self.workers, x2, w, step_workers, self.step_prefetch())
        elif getattr(w, "takes_workers", False):  # a weight type that computes its own product on our threads
            nworkers = step_workers if x2.shape[0] == 1 else self.workers.threads
            y = w.matmul(np.ascontiguousarray(x2, dtype=np.float32), self.workers, nworkers)
        else:  # a weight type that computes its own product (see the module doc)
            y = w.matmul(np.ascontiguousarray(x2, dtype=np.float32))
        return y.reshape(*lead, -1)

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        d = x.shape[-1]
        if x.size == d:
            v = x.reshape(-1)
            out = v * np.float32(1.0 / math.sqrt(float(np.dot(v, v)) / d + eps))
            out *= w
            return out.reshape(x.shape)
        x2 = x.reshape(-1, *x.shape[x.ndim - max(1, np.ndim(w)):])  # rows of the axes w spans
        out = np.empty(x2.shape, np.result_type(x, w, np.float32))

        def rows(r: slice):
            ms = np.einsum("...i,...i->...", x2[r], x2[r])[..., None] / np.float32(d)
            np.multiply(x2[r], np.float32(1.0) / np.sqrt(ms + np.float32(eps)), out=out[r])
            out[r] *= w

        self.workers.by_rows(rows, x2.shape[0], x2.size)
        return out.reshape(x.shape)

    def rope(self, x: np.ndarray, offset: int, table: RopeTable) -> np.ndarray:
        """Non-interleaved (HF order) rotation of x [B, H, L, D]: x * cos + rotate_half(x) * sin."""
        cos, sin = table.get(offset, x.shape[2])
        out = np.empty(x.shape, np.result_type(x, cos))
        half = x.shape[-1] // 2

        def heads(h: slice):
            xs = x[:, h]
            np.multiply(xs, cos, out=out[:, h])
            swapped = xs.reshape(*xs.shape[:-1], 2, half)[..., ::-1, :].reshape(xs.shape)  # [x2, x1] (a copy)
            swapped *= sin  # sin is [-sin, sin] across the two halves
            out[:, h] += swapped

        self.workers.by_rows(heads, x.shape[1], x.size)
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool,
                  window: int | None = None) -> np.ndarray:
        """q [B, H, L, D]; k, v [B, KV, T, D] with H a multiple of KV. Causal mask aligned bottom-right; with a
        window, a query sees itself and the window - 1 keys before it. Queries go in blocks, each against only the
        keys it can see (about half the work of a full causal L x T score matrix); the softmax is normalized after
        the product with v (a [.., D] division, not [.., T]). One sequence's rows take compiled code where numba is
        there (_causal_rows)."""
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
            k, v = dequantize_kv(k), dequantize_kv(v)
        if causal and B == 1 and 1 < L and _qmatvec() is not None:
            return self._causal_rows(q, k, v, scale, window)
        if k.dtype == np.float16:  # a float16 cache as stored (attends_half)
            k, v = k.astype(np.float32), v.astype(np.float32)
        rep = H // KV
        qg = (q * np.float32(scale)).reshape(B, KV, rep, L, D)
        kt = k.transpose(0, 1, 3, 2)[:, :, None]  # [B, KV, 1, D, T]
        vg = v[:, :, None]
        if not causal or L == 1:
            return softmax_product(np.matmul(qg, kt), vg).reshape(B, H, L, D)
        out = np.empty((B, KV, rep, L, D), np.float32)
        past = T - L
        qblock = query_block(B * H, T)

        def block(s: int):
            e = min(s + qblock, L)
            n, end = e - s, past + e
            start = 0 if window is None else max(0, past + s - window + 1)  # keys before it are out of every window
            shape = (B, KV, rep, n, end - start)
            scores = self.workers.scratch(math.prod(shape))[: math.prod(shape)].reshape(shape)
            np.matmul(qg[:, :, :, s:e], kt[..., start:end], out=scores)
            scores[..., end - start - n:] += causal_bias(n)
            if window is not None:
                too_old = np.arange(start, end)[None, :] <= np.arange(past + s, past + e)[:, None] - window
                scores += np.where(too_old, np.float32(-np.inf), np.float32(0))
            out[:, :, :, s:e] = softmax_product(scores, vg[:, :, :, start:end])

        self.workers.run(block, list(range(0, L, qblock))[::-1])  # longest blocks first
        return out.reshape(B, H, L, D)

    def _causal_rows(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int | None):
        """attention() of a prompt's rows (one sequence) in compiled code (numpy_step.causal_rows, the decode step's
        per-row attention), in units of CAUSAL_ROWS rows of a K/V head shared by the workers, latest rows first.
        The per-block matmuls and softmax passes of the numpy path took a quarter of SmolLM2's 512-token prefill."""
        from .numpy_attend import HALF_NATIVE
        from .numpy_step import causal_rows

        _, H, L, D = q.shape
        KV, T = k.shape[1], k.shape[2]
        rep = H // KV
        qc = np.ascontiguousarray(q[0], dtype=np.float32)
        if k.dtype == np.float16 and HALF_NATIVE:  # read as its bits, widened in the compiled loads
            kc, vc = np.ascontiguousarray(k).view(np.uint16), np.ascontiguousarray(v).view(np.uint16)
        else:
            kc, vc = np.ascontiguousarray(k, dtype=np.float32), np.ascontiguousarray(v, dtype=np.float32)
        out = np.empty((L, H * D), np.float32)

        def unit(u: tuple[int, int]) -> None:
            g, r0 = u
            causal_rows(qc, kc, vc, g, r0, min(L, r0 + CAUSAL_ROWS), T - L, window or 0, np.float32(scale),
                        np.empty((rep, D), np.float32), np.empty(max(D, rep), np.float32),
                        np.empty(rep * T, np.float32), out)

        units = [(g, r0) for r0 in reversed(range(0, L, CAUSAL_ROWS)) for g in range(KV)]
        self.workers.share(unit, units, self.workers.threads)
        return out.reshape(L, H, D).transpose(1, 0, 2)[None]

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
        F = gate.shape[-1]
        g2, u2 = gate.reshape(-1, F), up.reshape(-1, F)
        out = np.empty(g2.shape, np.result_type(gate, up))

        def rows(r: slice):
            t = out[r]
            np.negative(g2[r], out=t)
            np.exp(t, out=t)
            t += 1.0
            np.divide(g2[r], t, out=t)
            t *= u2[r]

        self.workers.by_rows(rows, g2.shape[0], g2.size)
        return out.reshape(gate.shape)

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
            _listen_for_compiles()
    return _QMATVEC


COMPILE_NOTICE = ("compiling the CPU kernels for this machine (once: numba caches them), so this first run takes "
                  "longer")


def _listen_for_compiles() -> None:
    """numba's "numba:compile" event starts only where its cache holds no code for this CPU: at the first of this
    package's functions to compile, one notice (a first run would otherwise sit silent for 20 s or more)."""
    from numba.core import event

    class Notice(event.Listener):
        def on_start(self, ev) -> None:
            fn = getattr(ev.data.get("dispatcher"), "py_func", None)
            if getattr(fn, "__module__", "").startswith("mlxllama."):
                _notice(COMPILE_NOTICE)

        def on_end(self, ev) -> None:
            pass

    event.register("numba:compile", Notice())


def _notice(line: str) -> None:
    """One line on stderr, once per process."""
    if line not in _NOTICES:
        _NOTICES.add(line)
        print(f"mlxllama: {line}", file=sys.stderr)
