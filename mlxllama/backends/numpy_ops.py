"""numpy implementation of the backend ops. Weights are widened to float32 once at load; BLAS does the products."""

from __future__ import annotations

import time

import numpy as np

from ..weights import QuantizedWeight

name = "numpy"
float_dtype = np.float32


def device() -> str:
    return "cpu (numpy)"


# -- weight preparation (once, at load) ---------------------------------------------------------------

def prepare_dense(w) -> np.ndarray:
    if isinstance(w, QuantizedWeight):
        from ..quant import dequantize

        # float32 scales, as mx.quantized_matmul does with float32 inputs (and GGUF's own dequantization)
        wide = QuantizedWeight(w.weight, w.scales.astype(np.float32), w.biases.astype(np.float32),
                               w.group_size, w.bits)
        return dequantize(wide, np.float32)
    return np.ascontiguousarray(w, dtype=np.float32)


def prepare_linear(parts: list) -> np.ndarray:
    """Fuse same-input projections by stacking their output rows; store transposed for x @ W."""
    mats = [prepare_dense(p) for p in parts]
    w = mats[0] if len(mats) == 1 else np.concatenate(mats, axis=0)
    return np.ascontiguousarray(w.T)


def prepare_norm(w) -> np.ndarray:
    return np.ascontiguousarray(w, dtype=np.float32)


def prepare_embedding(w) -> np.ndarray:
    return prepare_dense(w)


def tied_head(embedding: np.ndarray) -> np.ndarray:
    return embedding.T  # a view: no second copy of the table


def rope_table(inv_freq: np.ndarray, max_len: int):
    return RopeTable(inv_freq)


class RopeTable:
    """cos/sin of position * inv_freq, grown on demand."""

    def __init__(self, inv_freq: np.ndarray):
        self.inv_freq = inv_freq.astype(np.float64)
        self.cos = np.zeros((0, inv_freq.shape[0]), np.float32)
        self.sin = self.cos

    def get(self, offset: int, length: int):
        end = offset + length
        if end > self.cos.shape[0]:
            n = max(end, 2 * self.cos.shape[0], 256)
            ang = np.arange(n, dtype=np.float64)[:, None] * self.inv_freq[None, :]
            self.cos, self.sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        return self.cos[offset:end], self.sin[offset:end]


# -- ops used by the forward pass ------------------------------------------------------------------------

def asarray(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


def embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return table[ids]


def linear(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    return x @ wt


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.einsum("...i,...i->...", x, x)[..., None] / x.shape[-1]
    return x * (1.0 / np.sqrt(ms + eps)) * w


def rope(x: np.ndarray, offset: int, table: RopeTable) -> np.ndarray:
    """Non-interleaved (HF order) rotation of x [B, H, L, D]."""
    half = x.shape[-1] // 2
    cos, sin = table.get(offset, x.shape[2])
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool) -> np.ndarray:
    """q [B, H, L, D]; k, v [B, KV, T, D] with H a multiple of KV. Causal mask aligned bottom-right."""
    B, H, L, D = q.shape
    KV, T = k.shape[1], k.shape[2]
    rep = H // KV
    qg = q.reshape(B, KV, rep * L, D)
    scores = (qg @ k.transpose(0, 1, 3, 2)) * scale  # [B, KV, rep*L, T]
    if causal and L > 1:
        scores = scores.reshape(B, KV, rep, L, T)
        mask = np.arange(T)[None, :] > (np.arange(L)[:, None] + (T - L))
        scores = np.where(mask, -np.inf, scores).reshape(B, KV, rep * L, T)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return (scores @ v).reshape(B, H, L, D)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return gate / (1.0 + np.exp(-gate)) * up


def zeros(shape, dtype=None) -> np.ndarray:
    return np.zeros(shape, dtype=dtype or np.float32)


def concatenate(arrays, axis: int) -> np.ndarray:
    return np.concatenate(arrays, axis=axis)


def argmax(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=-1)


def to_numpy(x) -> np.ndarray:
    return np.asarray(x)


def eval(*xs) -> None:
    pass


def async_eval(*xs) -> None:
    pass


def synchronize() -> None:
    pass


def clock() -> float:
    return time.perf_counter()


def peak_memory() -> int:
    """Peak resident set size of this process, in bytes."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
