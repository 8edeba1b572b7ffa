"""RoPE frequencies: the inverse frequencies per rotated pair, with linear or llama3 scaling applied."""

from __future__ import annotations

import numpy as np

from .config import ModelArgs
from .errors import ConfigError


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """Inverse frequencies (length head_dim/2, float32) with linear or llama3 scaling applied."""
    dims = args.head_dim
    inv = 1.0 / (args.rope_theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
    rs = args.rope_scaling
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "linear":
            inv = inv / rs["factor"]
        elif kind == "llama3":
            factor = rs["factor"]
            low = rs.get("low_freq_factor", 1.0)
            high = rs.get("high_freq_factor", 4.0)
            old_ctx = rs.get("original_max_position_embeddings", 8192)
            low_wavelen = old_ctx / low
            high_wavelen = old_ctx / high
            wavelen = 2 * np.pi / inv
            smooth = (old_ctx / wavelen - low) / (high - low)
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
            inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    if args.rope_freq_factors is not None:
        factors = np.asarray(args.rope_freq_factors, dtype=np.float64)
        if factors.shape != inv.shape or not np.all(factors > 0):
            raise ConfigError(f"rope frequency factors must be {inv.shape[0]} positive numbers")
        inv = inv / factors
    return inv.astype(np.float32)
