"""Bytes, counted once: the weights as the backend holds them, what one decode step reads of them, and the KV
cache's bytes per position for every cache kind. The fit check (memory.py), bench and its roofline, the engine's
achieved_gbps and distributed all read these; nothing here imports mlxllama.bench.
"""

from __future__ import annotations

import math


def kv_element_bytes(float_bytes: int, kv_bits: int | None = None, group_size: int = 64) -> float:
    """Bytes one K or V element takes in the cache: the float size, or bits/8 plus a scale and a bias (float_bytes
    each) per group."""
    if kv_bits is None:
        return float(float_bytes)
    return kv_bits / 8 + 2 * float_bytes / group_size


def kv_bytes_per_position(args, float_bytes: int = 2, settings=None) -> float:
    """K and V of one position over every layer, for the cache kind `settings` (cache.CacheSettings) asks for."""
    bits = getattr(settings, "kv_bits", None)
    group = getattr(settings, "kv_group_size", 64)
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * kv_element_bytes(
        float_bytes, bits, group)


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
