"""HF folders: config.json + safetensors (fp32, fp16, bf16; single file or sharded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ModelArgs, load_config
from ..errors import ModelFileError, shown
from ..weights import check_weights
from . import safetensors_io

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def internal_name(name: str) -> str:
    """HF and MLX names equal the internal ones without the `.weight` suffix."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for path in safetensors_io.weight_files(folder):
        for name, arr in safetensors_io.load(path).items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name in tensors:
                raise ModelFileError(f"{path}: tensor {shown(name)} appears in two shards")
            tensors[name] = arr
    return tensors


def load_hf(folder: Path) -> tuple[ModelArgs, dict]:
    args = load_config(folder / "config.json")
    if args.quantization is not None:  # an MLX folder that names its section quantization_config
        from .mlx_folder import load_mlx

        return load_mlx(folder)
    weights = {}
    for name, arr in read_tensors(folder).items():
        if arr.dtype not in (np.float16, np.float32):
            raise ModelFileError(f"{folder}: tensor {shown(name)} has dtype {arr.dtype}, expected a float type")
        weights[internal_name(name)] = arr
    if args.tie_word_embeddings:
        weights.pop("lm_head", None)
    elif "lm_head" not in weights and "model.embed_tokens" in weights:
        raise ModelFileError(f"{folder}: lm_head.weight is missing and tie_word_embeddings is false")
    check_weights(weights, args, str(folder))
    return args, weights
