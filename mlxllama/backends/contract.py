"""The contract between the forward pass (model.py) and a backend (mlx_ops.py, numpy_ops.py).

A backend is one object with the capabilities below as attributes and the ops as methods. Callers outside
backends/ ask these capabilities; they never test a backend's name, which is for display only.

Array conventions: hidden states [B, L, D]; q [B, H, L, Dh]; k, v [B, KV, T, Dh] (H a multiple of KV);
token ids [B, L] ints. "Prepared" weights are whatever the backend laid out at load (prepare_*), opaque to callers
except for `.nbytes`.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, NamedTuple, Protocol, runtime_checkable

import numpy as np


class QuantizedKV(NamedTuple):
    """Keys or values as a quantized cache holds them: MLX's affine layout along head_dim (mx.quantize's), in the
    backend's arrays. data uint32 [B, KV, T, Dh * bits / 32]; scales and biases [B, KV, T, Dh / group_size]."""

    data: Any
    scales: Any
    biases: Any
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple:
        B, KV, T, W = self.data.shape
        return (B, KV, T, W * 32 // self.bits)

    def sliced(self, start: int | None = None, stop: int | None = None) -> "QuantizedKV":
        """Positions [start, stop) along T."""
        t = slice(start, stop)
        return self._replace(data=self.data[:, :, t], scales=self.scales[:, :, t], biases=self.biases[:, :, t])


@runtime_checkable
class Backend(Protocol):
    name: str  # "mlx", "numpy": shown to users, never branched on
    on_gpu: bool  # computes on a GPU (Metal or CUDA)
    lazy: bool  # arrays are computed when evaluated: queue the next step (async_eval) before reading a result
    keeps_quantized: bool  # quantized weights stay packed in memory (False: widened to floats at load)
    float_dtype: Any  # the dtype of activations, dense weights as held, and the KV cache
    float16_dtype: Any  # the backend's float16 (a float16 KV cache stores it)
    float_bytes: int  # bytes per element of float_dtype
    kv_dtype: str | None  # a float cache's storage unless asked otherwise: "float16", or None (float_dtype)
    kv_bytes: int  # bytes per K or V element in a float cache kept as kv_dtype
    attends_half: bool  # attention() takes a float16 cache's K/V as stored (float16_dtype), widening what it reads

    def device(self) -> str: ...
    def peak_memory(self) -> int: ...  # bytes: the backend's own peak allocation, or the process's peak RSS

    # weight preparation, once at load
    def prepared_nbytes(self, w) -> int: ...  # bytes prepare_* will hold for a loader's tensor (the fit check)
    def prepare_linear(self, parts: list) -> Any: ...  # same-input projections [out_i, in] fused by output rows
    def prepare_norm(self, w) -> Any: ...  # also biases and other vectors
    def prepare_embedding(self, w) -> Any: ...
    def tied_head(self, embedding) -> Any: ...
    def rope_table(self, inv_freq: np.ndarray) -> Any: ...
    def compile(self, fn: Callable) -> Callable: ...  # may compile fn(h, *args) for single-token steps
    # the whole single-token step of one sequence as one call, built once at load, or None (the op-by-op path):
    # program(tokens [1, 1], cache) -> logits [1, 1, vocab] with the cache written and advanced exactly as the
    # op-by-op step leaves it, or None for a step it does not take (the cache untouched). It may also have
    # rows(chunks, caches, rows): Model.forward_batch's step (several rows of several sequences) in one call, logits
    # [sum(rows), vocab] ([0, vocab] where every rows[i] is 0), or None for a step it does not take
    def decode_program(self, model) -> Callable | None: ...
    def forward_scope(self, rows: int) -> ContextManager: ...  # around one forward pass of `rows` token rows

    # the ops of the forward pass
    def asarray(self, tokens) -> Any: ...
    def embedding(self, table, ids, start: int | None = None) -> Any: ...  # start: table holds rows start.. only
    # (ids outside them give zero rows); None: the whole vocabulary
    def linear(self, x, w) -> Any: ...  # x [..., in] @ W.T
    def rms_norm(self, x, w, eps: float) -> Any: ...  # w broadcasts against x's trailing axes
    def rope(self, x, offset: int, table) -> Any: ...  # x [B, heads, L, Dh], positions offset.. (HF order)
    # k and v: arrays, or QuantizedKV (a quantized cache's), attended without widening the whole cache
    def attention(self, q, k, v, scale: float, causal: bool, window: int | None = None) -> Any: ...
    def quantize_kv(self, x, group_size: int, bits: int) -> QuantizedKV: ...  # x [B, KV, L, Dh]
    def swiglu(self, gate, up) -> Any: ...

    # tensor parallelism (distributed.py): identities unless the backend holds a group of ranks
    def all_sum(self, x) -> Any: ...  # the sum of x over the ranks (row-parallel partial products)
    def all_gather(self, x) -> Any: ...  # the ranks' x concatenated along the last axis, rank order (logits)

    # arrays and evaluation
    def zeros(self, shape, dtype=None) -> Any: ...
    def concatenate(self, arrays, axis: int) -> Any: ...
    def argmax(self, logits) -> Any: ...
    def to_numpy(self, x) -> np.ndarray: ...
    def eval(self, *xs) -> None: ...
    def async_eval(self, *xs) -> None: ...
    def synchronize(self) -> None: ...
