"""Convert any supported model into an MLX folder (what `mlxllama convert` runs)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from .api import load_weights
from .errors import ModelFileError, UsageError
from .loaders.mlx_folder import save_mlx
from .weights import QUANT_BITS, QUANT_GROUP_SIZES, GGMLWeight, QuantizedWeight

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


def requantized(weights: dict, bits: int, group_size: int) -> str | None:
    """The quantized formats that quantizing to (bits, group_size) would dequantize and requantize, e.g. 'q4 g32',
    or None when nothing already quantized would change."""
    kinds = sorted({f"q{w.bits} g{w.group_size}" for w in weights.values()
                    if isinstance(w, QuantizedWeight) and (w.bits, w.group_size) != (bits, group_size)})
    return ", ".join(kinds) or None


def _mlx_layout(weights: dict, dtype, src: str) -> dict:
    """GGUF blocks (weights.GGMLWeight) in what MLX and mlx-lm load: the exact affine form where the type has one
    (quant.ggml_affine; its float32 scales take `dtype`), else requantized to 8 bits in groups of 32. One warning
    line says what changed."""
    from .quant import ggml_affine, quantize

    out, exact, requantized, rounded = {}, Counter(), Counter(), False
    for name, w in weights.items():
        if not isinstance(w, GGMLWeight):
            out[name] = w
            continue
        qw = ggml_affine(w)
        if qw is None:
            requantized[w.qtype] += 1
            out[name] = quantize(w.dequantize().astype(dtype), 32, 8)
            continue
        exact[w.qtype] += 1
        if qw.scales.dtype != dtype:
            cast = (qw.scales.astype(dtype), qw.biases.astype(dtype))
            rounded |= not all(np.array_equal(c.astype(np.float32), v.astype(np.float32))
                               for c, v in zip(cast, (qw.scales, qw.biases)))
            qw = QuantizedWeight(qw.weight, *cast, qw.group_size, qw.bits)
        out[name] = qw
    if requantized or rounded:
        kinds = lambda c: ", ".join(f"{n} {k}" for k, n in sorted(c.items()))  # noqa: E731
        said = []
        if requantized:
            said.append(f"{kinds(requantized)} tensors have no MLX layout and were requantized to 8 bits g32")
        if rounded:
            said.append(f"the float32 block scales of {kinds(exact)} tensors were rounded to {np.dtype(dtype).name} "
                        "(--dtype float32 keeps them exact)")
        warnings.warn(f"{src}: " + "; ".join(said), stacklevel=3)
    return out


def convert_model(src, dst, quantize: bool = False, bits: int = 4, group_size: int = 64, dtype: str = "float16",
                  force: bool = False, revision: str | None = None, progress=None) -> Path:
    """progress(label, done, total), if given, follows the stages (total None where the length is unknown)."""
    progress = progress or (lambda label, done, total: None)
    dst = Path(dst)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize and bits not in QUANT_BITS:
        raise UsageError(f"--bits must be one of {', '.join(map(str, QUANT_BITS))}, got {bits}")
    if quantize and group_size not in QUANT_GROUP_SIZES:
        raise UsageError(f"--group-size must be one of {', '.join(map(str, QUANT_GROUP_SIZES))}, got {group_size}")
    if dst.exists() and not force:
        raise ModelFileError(f"{dst} already exists; pass --force to replace it")
    progress(f"reading {src}", 0, None)
    args, weights, tokenizer = load_weights(src, revision)
    np_dtype = DTYPES[dtype]
    if quantize:
        from .quant import quantize_weights

        lossy = requantized(weights, bits, group_size)
        if lossy:
            warnings.warn(f"{src} is already quantized ({lossy}): requantizing it to q{bits} g{group_size} loses "
                          "quality; convert without -q to keep the exact repack", stacklevel=2)
        weights, args = quantize_weights(weights, args, group_size=group_size, bits=bits, dtype=np_dtype,
                                         progress=lambda done, total: progress("quantizing", done, total))
    else:
        weights = _mlx_layout(weights, np_dtype, str(src))
        weights = {k: w if isinstance(w, QuantizedWeight) else np.asarray(w).astype(np_dtype, copy=False)
                   for k, w in weights.items()}
        args = args.replace(quantization=quantization_section(weights))
    args = args.replace(torch_dtype=dtype)
    progress(f"writing {dst}", 0, None)
    return save_mlx(dst, args, weights, tokenizer, force=force)
