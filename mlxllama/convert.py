"""Convert any supported model into an MLX folder (what `mlxllama convert` runs)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .api import load_weights
from .errors import ModelFileError, UsageError
from .loaders.mlx_folder import save_mlx
from .weights import QUANT_BITS, QUANT_GROUP_SIZES, QuantizedWeight

DTYPES = {"float16": np.float16, "float32": np.float32}


def quantization_section(weights: dict) -> dict | None:
    """The config `quantization` entry for the quantized tensors present: the most common (bits, group) on top,
    per-layer overrides (mlx-lm's convention) for the rest."""
    kinds = {k: (w.bits, w.group_size) for k, w in weights.items() if isinstance(w, QuantizedWeight)}
    if not kinds:
        return None
    (bits, group), _ = Counter(kinds.values()).most_common(1)[0]
    section: dict = {"group_size": group, "bits": bits}
    for name, (b, g) in sorted(kinds.items()):
        if (b, g) != (bits, group):
            section[name] = {"group_size": g, "bits": b}
    return section


def convert_model(src, dst, quantize: bool = False, bits: int = 4, group_size: int = 64, dtype: str = "float16",
                  force: bool = False, revision: str | None = None) -> Path:
    dst = Path(dst)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize and bits not in QUANT_BITS:
        raise UsageError(f"--bits must be one of {', '.join(map(str, QUANT_BITS))}, got {bits}")
    if quantize and group_size not in QUANT_GROUP_SIZES:
        raise UsageError(f"--group-size must be one of {', '.join(map(str, QUANT_GROUP_SIZES))}, got {group_size}")
    if dst.exists() and not force:
        raise ModelFileError(f"{dst} already exists; pass --force to replace it")
    args, weights, tokenizer = load_weights(src, revision)
    np_dtype = DTYPES[dtype]
    if quantize:
        from .quant import quantize_weights

        weights, args = quantize_weights(weights, args, group_size=group_size, bits=bits, dtype=np_dtype)
    else:
        weights = {k: w if isinstance(w, QuantizedWeight) else np.asarray(w).astype(np_dtype, copy=False)
                   for k, w in weights.items()}
        args = args.replace(quantization=quantization_section(weights))
    args = args.replace(torch_dtype=dtype)
    return save_mlx(dst, args, weights, tokenizer, force=force)
