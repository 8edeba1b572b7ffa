"""MLX implementation of the backend ops: mx.fast kernels and mx.quantized_matmul; runs on Metal, CUDA or CPU."""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..weights import GGMLWeight, QuantizedWeight
from .contract import QuantizedKV

DEQUANTIZED_MATMUL_ROWS = 16  # on the CPU, inputs with at least this many rows take the dequantize-then-matmul path
BLOCKED_ATTENTION_ROWS = 16  # on the CPU, causal attention over at least this many queries goes block by block
CPU_QUERY_BLOCK = 64  # query rows per block of the CPU's causal attention


def gpu_available() -> bool:
    return bool(mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()))


class MLXOps:
    """The backend contract (contract.py) over MLX."""

    name = "mlx"
    lazy = True
    keeps_quantized = True
    kv_dtype = None  # the activations' dtype: float16 on a GPU; float32 on the CPU, where half is emulated
    attends_half = False  # a float16 cache is widened to the activations' dtype before attention

    def __init__(self, dtype=None, group=None):
        # Half precision on a GPU, as mlx-lm does; float32 on the CPU, where MLX emulates half precision.
        self.on_gpu = gpu_available()
        self.float_dtype = dtype or (mx.float16 if self.on_gpu else mx.float32)
        self.float16_dtype = mx.float16
        self.float_bytes = self.kv_bytes = self.float_dtype.size
        self.group = group  # an mx.distributed group whose ranks each hold a tensor-parallel shard; None: alone

    def device(self) -> str:
        d = mx.default_device()
        if d.type == mx.gpu:
            if mx.metal.is_available():
                info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
                return f"gpu (Metal, {info.get('device_name', 'Apple GPU')})"
            return "gpu (CUDA)"
        return "cpu (MLX)"

    # -- weight preparation ---------------------------------------------------------------------------

    def _dense(self, w) -> mx.array:
        if isinstance(w, QuantizedWeight):
            w = mx.dequantize(mx.array(w.weight), mx.array(w.scales), mx.array(w.biases),
                              group_size=w.group_size, bits=w.bits)
            return w.astype(self.float_dtype)
        return mx.array(np.asarray(w)).astype(self.float_dtype)

    def prepared_nbytes(self, w) -> int:
        """Bytes prepare_* will hold for a loader's tensor: quantized ones packed with scales and biases in the
        compute dtype, the rest in it."""
        if isinstance(w, QuantizedWeight):
            return int(w.weight.nbytes + 2 * w.scales.size * self.float_bytes)
        if isinstance(w, GGMLWeight):
            from ..quant import GGML_AFFINE

            bits = GGML_AFFINE.get(w.qtype)
            if bits is None:  # kept as the file's blocks (RawLinear)
                return w.nbytes
            rows, cols = w.shape
            return rows * cols * bits // 8 + 2 * rows * (cols // 32) * self.float_bytes
        return int(np.prod(w.shape)) * self.float_bytes

    def prepare_linear(self, parts: list):
        """Fuse same-input projections by stacking output rows; quantized rows stack exactly. Scales and biases
        take the compute dtype (float32 on the CPU: MLX's CPU kernels are faster with it)."""
        if any(isinstance(p, GGMLWeight) for p in parts):
            return self._prepare_blocks(parts)
        if all(isinstance(p, QuantizedWeight) for p in parts) and \
                len({(p.bits, p.group_size, p.scales.dtype) for p in parts}) == 1:
            p0 = parts[0]
            cat = (lambda xs: xs[0]) if len(parts) == 1 else (lambda xs: np.concatenate(xs, axis=0))
            scales = mx.array(cat([p.scales for p in parts])).astype(self.float_dtype)
            biases = mx.array(cat([p.biases for p in parts])).astype(self.float_dtype)
            out = QLinear(mx.array(cat([p.weight for p in parts])), scales, biases, p0.group_size, p0.bits)
        else:
            mats = [self._dense(p) for p in parts]
            w = mats[0] if len(mats) == 1 else mx.concatenate(mats, axis=0)
            # MLX's CPU matmul (reference BLAS) is faster for x @ W than for x @ W.T
            out = w if self.on_gpu else DenseT(mx.contiguous(w.T))
        mx.eval(out)  # materialize now: the loader's copy can go, and no lazy cast is left holding both
        return out

    def _prepare_blocks(self, parts: list):
        """GGUF blocks: types with an exact affine form become QLinear (quant.ggml_affine: K-quants' d * sc scales
        are float32, exact on the CPU; a GPU's float16 compute rounds them), the others stay as the file's blocks
        and are decoded per product (RawLinear, kquants_mlx). Parts of different layouts are kept apart
        (SplitLinear) rather than widened."""
        from ..quant import ggml_affine

        laid = [(ggml_affine(p) or p) if isinstance(p, GGMLWeight) else p for p in parts]
        affine = all(isinstance(p, QuantizedWeight) for p in laid)
        if affine and len({(p.bits, p.group_size) for p in laid}) == 1:
            return self.prepare_linear([QuantizedWeight(p.weight, p.scales.astype(np.float32),
                                                        p.biases.astype(np.float32), p.group_size, p.bits)
                                        for p in laid])
        if len(laid) > 1:
            return SplitLinear(tuple(self.prepare_linear([p]) for p in laid))
        from .kquants_mlx import RAW_TYPES

        p = laid[0]
        _, block_bytes = RAW_TYPES[p.qtype]
        out = RawLinear(mx.array(np.asarray(p.blocks).reshape(p.shape[0], -1, block_bytes)), p.qtype)
        mx.eval(out.blocks)
        return out

    def prepare_norm(self, w):
        out = self._dense(w)
        mx.eval(out)
        return out

    def prepare_embedding(self, w):
        if isinstance(w, (QuantizedWeight, GGMLWeight)):
            return self.prepare_linear([w])
        out = self._dense(w)
        mx.eval(out)
        return out

    def tied_head(self, embedding):
        return embedding

    def rope_table(self, inv_freq: np.ndarray):
        return mx.array((1.0 / inv_freq.astype(np.float64)).astype(np.float32))  # mx.fast.rope takes periods

    def forward_scope(self, rows: int):
        return contextlib.nullcontext()

    def compile(self, fn):
        """fn(h, *args) compiled (mx.compile) for single-token steps, whose shapes never change: one compilation
        serves every layer and every token, the positions offset passed as an array. Multi-token calls (prompt
        chunks of any length) run fn as is."""
        compiled = per_thread_compile(fn)

        def call(h, *args):
            if h.shape[1] != 1:
                return fn(h, *args)
            return compiled(h, *(mx.array(a, dtype=mx.int32) if isinstance(a, int) else a for a in args))

        return call

    def decode_program(self, model):
        return None  # single-token steps go through compile()'d pieces

    # -- ops ---------------------------------------------------------------------------------------------

    def asarray(self, tokens):
        return tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens, dtype=np.int32))

    def embedding(self, table, ids, start: int | None = None):
        if start is not None:  # a vocabulary shard: rows of other ranks' ids are zero (all_sum fills them in)
            rows = (table.weight if isinstance(table, QLinear) else
                    table.blocks if isinstance(table, RawLinear) else table).shape[0]
            mine = (ids >= start) & (ids < start + rows)
            return mx.where(mine[..., None], self.embedding(table, mx.where(mine, ids - start, 0)), 0)
        if isinstance(table, RawLinear):
            from .kquants_mlx import decode

            rows = decode(table.qtype, table.blocks[ids.reshape(-1)])
            return rows.reshape(*ids.shape, -1).astype(self.float_dtype)
        if isinstance(table, QLinear):
            return mx.dequantize(table.weight[ids], table.scales[ids], table.biases[ids],
                                 group_size=table.group_size, bits=table.bits).astype(self.float_dtype)
        return table[ids]

    def linear(self, x, w):
        if isinstance(w, SplitLinear):
            return mx.concatenate([self.linear(x, p) for p in w.parts], axis=-1)
        if isinstance(w, RawLinear):  # decoded per product: a float transient of this one weight
            from .kquants_mlx import decode

            return x @ decode(w.qtype, w.blocks).astype(x.dtype).T
        if isinstance(w, QLinear):
            if not self.on_gpu and x.size // x.shape[-1] >= DEQUANTIZED_MATMUL_ROWS:
                # MLX's CPU quantized_matmul is a scalar loop; for many rows, dequantizing (a transient float
                # copy of this one weight) and a plain x @ W (reference BLAS, W laid out [in, out]) is faster
                wt = mx.dequantize(w.weight, w.scales, w.biases, group_size=w.group_size, bits=w.bits)
                return x @ mx.contiguous(wt.T)
            return mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                                       group_size=w.group_size, bits=w.bits)
        if isinstance(w, DenseT):
            return x @ w.wt
        return x @ w.T

    def rms_norm(self, x, w, eps: float):
        if w.ndim > 1:  # per-head weights (q/k norms of several heads at once)
            return mx.fast.rms_norm(x, None, eps) * w
        return mx.fast.rms_norm(x, w, eps)

    def rope(self, x, offset, periods):
        return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=offset, freqs=periods)

    def attention(self, q, k, v, scale: float, causal: bool, window: int | None = None):
        B, H, L, D = q.shape
        KV, T = k.shape[1], k.shape[2]
        if window is not None and T <= window:
            window = None  # every key is inside the window
        if window is not None and L == 1:
            if isinstance(k, QuantizedKV):
                k, v, window = k.sliced(-window), v.sliced(-window), None
            else:
                k, v, window = k[:, :, -window:], v[:, :, -window:], None
        if isinstance(k, QuantizedKV):
            return self._quantized_attention(q, k, v, scale, causal, window)
        if self.on_gpu or L < BLOCKED_ATTENTION_ROWS or not causal:
            mask = "causal" if causal and L > 1 else None
            if window is not None:
                mask = _visible(mx.arange(T - L, T)[:, None], mx.arange(T)[None, :], window)
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        # The CPU's scaled_dot_product_attention computes the full L x T scores with q @ k.T (the slow reference-BLAS
        # form). Here: keys transposed once, query blocks against only the keys they see; same values.
        qg = (q * scale).reshape(B, KV, H // KV, L, D)
        kt = mx.contiguous(k.swapaxes(-1, -2))[:, :, None]  # [B, KV, 1, D, T]
        vg = v[:, :, None]
        past = T - L
        outs = []
        for s in range(0, L, CPU_QUERY_BLOCK):
            e = min(s + CPU_QUERY_BLOCK, L)
            scores = qg[:, :, :, s:e] @ kt[..., : past + e]
            seen = _visible(mx.arange(s, e)[:, None] + past, mx.arange(past + e)[None, :], window)
            outs.append(mx.softmax(mx.where(seen, scores, -mx.inf), axis=-1) @ vg[:, :, :, : past + e])
        return mx.concatenate(outs, axis=3).reshape(B, H, L, D)

    def _quantized_attention(self, q, k: QuantizedKV, v: QuantizedKV, scale: float, causal: bool, window):
        """Attention over quantized keys and values, as mlx-lm's quantized_scaled_dot_product_attention: the scores
        are mx.quantized_matmul of the queries with the packed keys, the output that of the probabilities with the
        packed values; no float copy of the cache is made."""
        B, H, L, D = q.shape
        KV, T = k.shape[1], k.shape[2]
        qg = (q * scale).reshape(B, KV, H // KV, L, D)
        kq = [a[:, :, None] for a in (k.data, k.scales, k.biases)]  # [B, KV, 1, T, ...] against the q groups
        vq = [a[:, :, None] for a in (v.data, v.scales, v.biases)]
        scores = mx.quantized_matmul(qg, *kq, transpose=True, group_size=k.group_size, bits=k.bits)
        if causal and (L > 1 or window is not None):
            seen = _visible(mx.arange(T - L, T)[:, None], mx.arange(T)[None, :], window)
            scores = mx.where(seen, scores, mx.finfo(scores.dtype).min)
        probs = mx.softmax(scores, axis=-1, precise=True)
        out = mx.quantized_matmul(probs, *vq, transpose=False, group_size=v.group_size, bits=v.bits)
        return out.reshape(B, H, L, D)

    def quantize_kv(self, x, group_size: int, bits: int) -> QuantizedKV:
        data, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
        return QuantizedKV(data, scales, biases, group_size, bits)

    def swiglu(self, gate, up):
        return nn_silu(gate) * up

    def all_sum(self, x):
        return x if self.group is None else mx.distributed.all_sum(x, group=self.group)

    def all_gather(self, x):
        if self.group is None:
            return x
        n = self.group.size()
        g = mx.distributed.all_gather(x, group=self.group)  # [n * B, ...]: stacked along the first axis
        return mx.moveaxis(g.reshape(n, *x.shape), 0, -2).reshape(*x.shape[:-1], n * x.shape[-1])

    def zeros(self, shape, dtype=None):
        return mx.zeros(shape, dtype=dtype or self.float_dtype)

    def concatenate(self, arrays, axis: int):
        return mx.concatenate(arrays, axis=axis)

    def argmax(self, logits):
        return mx.argmax(logits, axis=-1)

    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, mx.array):
            if x.dtype == mx.bfloat16:
                x = x.astype(mx.float32)
            return np.array(x)
        return np.asarray(x)

    def eval(self, *xs):
        mx.eval(*xs)

    def async_eval(self, *xs):
        mx.async_eval(*xs)

    def synchronize(self):
        mx.synchronize()

    def peak_memory(self) -> int:
        if self.on_gpu:
            return int(mx.get_peak_memory())
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class QLinear(NamedTuple):
    """A quantized weight resident on the MLX device (possibly several projections fused by rows). A tuple, so
    that compiled functions take it as inputs (arrays) and constants (group_size, bits)."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes


class RawLinear(NamedTuple):
    """A GGUF weight with no exact affine form, resident as the file's blocks: uint8 [rows, n_blocks, block_bytes]
    of type qtype (kquants_mlx.RAW_TYPES), decoded per product."""

    blocks: mx.array
    qtype: str

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes


class SplitLinear(NamedTuple):
    """Same-input projections of different layouts (a GGUF K-quant mix: Q4_K beside Q6_K), each prepared alone;
    the product concatenates their outputs."""

    parts: tuple

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


class DenseT(NamedTuple):
    """A float weight stored transposed, [in, out] (the CPU layout; see prepare_linear)."""

    wt: mx.array

    @property
    def nbytes(self) -> int:
        return self.wt.nbytes


def _visible(q_pos, k_pos, window: int | None):
    """Which keys each query attends to: causal, and within the sliding window where there is one."""
    seen = k_pos <= q_pos
    return seen if window is None else seen & (k_pos > q_pos - window)


def per_thread_compile(fn):
    """mx.compile(fn), one compiled function per calling thread. MLX keeps each thread's traces in a C++
    thread_local cache that a compiled function erases its entries from when it is freed, on the cache of the thread
    that made it. A function made on one thread and called on another (the engine's) leaves that thread's entries
    to its C++ thread-exit destructors, which need the GIL: when the thread ends as the interpreter finalizes,
    they abort the process ("terminate called without an active exception", 1 exit in ~15 here). Made on the
    calling thread and held in its threading.local, each compiled function is freed with the thread's Python
    state, while the interpreter still runs, and takes its entries with it."""
    local = threading.local()

    def call(*args):
        compiled = getattr(local, "fn", None)
        if compiled is None:
            compiled = local.fn = mx.compile(fn)
        return compiled(*args)

    return call


def _silu(x):
    return x * mx.sigmoid(x)


nn_silu = per_thread_compile(_silu)
