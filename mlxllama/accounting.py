"""Bytes, counted once: the weights as the backend holds them, what one decode step reads of them, and the KV
cache's bytes per position for every cache kind. The fit check (memory.py), bench and its roofline, the engine's
achieved_gbps and distributed all read these; nothing here imports mlxllama.bench.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .weights import LAYER_LINEARS, GGMLWeight, QuantizedWeight


def kv_element_bytes(float_bytes: int, kv_bits: int | None = None, group_size: int = 64,
                     kv_dtype: str | None = None) -> float:
    """Bytes one K or V element takes in the cache: float_bytes (the backend's float size) for a float cache with
    kv_dtype None, 2 or 4 for "float16" or "float32" (cache.for_backend says which a backend keeps), or bits/8 plus
    a scale and a bias (float_bytes each) per group."""
    if kv_bits is None:
        return {"float16": 2.0, "float32": 4.0}.get(kv_dtype, float(float_bytes))
    return kv_bits / 8 + 2 * float_bytes / group_size


def kv_bytes_per_position(args, float_bytes: int = 2, settings=None) -> float:
    """K and V of one position over every layer, for the cache kind `settings` (cache.CacheSettings) asks for."""
    bits = getattr(settings, "kv_bits", None)
    group = getattr(settings, "kv_group_size", 64)
    dtype = getattr(settings, "kv_dtype", None)
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * kv_element_bytes(
        float_bytes, bits, group, dtype)


def kv_positions_held(ctx: int, settings=None) -> int:
    """Positions a cache holds after ctx tokens (a rotating window: at most its size)."""
    window = getattr(settings, "max_kv_size", None)
    return min(ctx, window) if window else ctx


def kv_bytes(args, ctx: int, batch: int = 1, float_bytes: int = 2, settings=None) -> int:
    """Bytes of the KV cache for `batch` sequences of `ctx` positions."""
    return math.ceil(kv_bytes_per_position(args, float_bytes, settings) * kv_positions_held(ctx, settings) * batch)


def weights_held(weights: dict, ops) -> int:
    """Bytes the backend will hold for the loader's weights (ops.prepared_nbytes of each), before laying them out;
    after, Model.resident_nbytes counts the same from the held arrays."""
    return sum(int(ops.prepared_nbytes(w)) for w in weights.values())


def weight_bytes_per_step(model) -> int:
    """Weight bytes one decode step reads: every tensor as held, except the embedding table (untied: only the
    tokens' rows are read; one row counted)."""
    total = model.resident_nbytes
    embed = getattr(model, "embed", None)
    if embed is not None and not model.args.tie_word_embeddings:
        total -= int(embed.nbytes)
        total += -(-int(embed.nbytes) // max(1, model.args.vocab_size))
    return total


def decode_bytes(weight_bytes: int, kv_bytes_read: float) -> float:
    """Bytes one decode step reads: the weights once, plus the KV of every decoding sequence."""
    return weight_bytes + kv_bytes_read


# -- what a decode step reads, for bench and its roofline (per model, from the loader's tensors) --------------

@dataclass(frozen=True)
class Accounting:
    params: int                   # every weight element (logical, unpacked), the whole embedding table included
    matmul_params: int            # weight MACs per token: every linear plus the output head
    weight_bytes: int             # every stored tensor: the memory the weights take
    weight_bytes_per_token: int   # read per decode step: all but the embedding table, plus one row of it
    kv_bytes_per_position: int    # K and V, all layers, one position
    attn_flops_per_position: int  # 4 * layers * heads * head_dim

    def kv_bytes(self, ctx: float) -> float:
        return self.kv_bytes_per_position * ctx

    def bytes_per_step(self, ctx: float, batch: int = 1) -> float:
        """Bytes one decode step reads: the weights once, the KV cache of each of `batch` sequences."""
        return self.weight_bytes_per_token + batch * self.kv_bytes(ctx)

    def bytes_per_token(self, ctx: float) -> float:
        return self.bytes_per_step(ctx, 1)

    def flops_per_token(self, ctx: float) -> float:
        return 2 * self.matmul_params + self.attn_flops_per_position * ctx

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Accounting":
        return cls(**{f.name: int(d[f.name]) for f in fields(cls)})


def _nbytes(t) -> int:
    return int(t.nbytes)


def _elements(t) -> int:
    shape = t.shape if isinstance(t, QuantizedWeight) else tuple(t.shape)
    return int(np.prod(shape))


def kv_and_attention(args, kv_bytes: float) -> tuple[int, int]:
    """kv_bytes per K or V element: a float size, or a quantized cache's (cache.kv_element_bytes)."""
    kv = round(2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * kv_bytes)
    attn = 4 * args.num_hidden_layers * args.num_attention_heads * args.head_dim
    return kv, attn


def account_weights(args, weights: dict, kv_bytes: int = 2) -> Accounting:
    """Exact accounting from a loaded model's tensors (the internal layout of mlxllama.weights).

    kv_bytes is the KV cache element size the backend uses (2 for float16, 4 for float32).
    """
    embed = weights["model.embed_tokens"]
    head = weights.get("lm_head", embed)
    vocab = embed.shape[0]
    total_bytes = sum(_nbytes(t) for t in weights.values())
    per_token = total_bytes - _nbytes(embed) + math.ceil(_nbytes(embed) / vocab)
    if "lm_head" not in weights:
        per_token += _nbytes(embed)  # tied: the table is read again, whole, as the output head
    linears = [weights[f"model.layers.{i}.{k}"] for i in range(args.num_hidden_layers) for k in LAYER_LINEARS]
    kv, attn = kv_and_attention(args, kv_bytes)
    return Accounting(
        params=sum(_elements(t) for t in weights.values()),
        matmul_params=sum(_elements(t) for t in linears) + _elements(head),
        weight_bytes=total_bytes,
        weight_bytes_per_token=per_token,
        kv_bytes_per_position=kv,
        attn_flops_per_position=attn,
    )


def quant_label(weights: dict) -> str:
    """How the linears are stored: 'q4 g32', 'float16', or a '/'-joined mix ('q4 g32/q6 g32')."""
    kinds = []
    for name, t in weights.items():
        if ".layers." not in name or not name.endswith(LAYER_LINEARS):
            continue
        kind = f"q{t.bits} g{t.group_size}" if isinstance(t, QuantizedWeight) else \
            t.qtype if isinstance(t, GGMLWeight) else str(t.dtype)
        if kind not in kinds:
            kinds.append(kind)
    return "/".join(kinds) or "unknown"
