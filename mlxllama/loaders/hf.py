"""HF folders: config.json + safetensors (fp32, fp16, bf16; single file or sharded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ModelArgs
from ..errors import ModelFileError, plain, shown
from ..weights import check_weights
from .safetensors_io import internal_name, read_tensors


def read_hf_weights(folder: Path, args: ModelArgs, lazy_bf16: bool = False) -> dict:
    weights = {}
    tensors = read_tensors(folder, lazy_bf16)
    scales = next((n for n in tensors if n.endswith(".scales")), None)
    if scales is not None:
        raise ModelFileError(f"{folder}: {plain(scales[:-len('.scales')])} is quantized but config.json has no "
                             "quantization section")
    for name, arr in tensors.items():
        if arr.dtype not in (np.float16, np.float32):
            raise ModelFileError(f"{folder}: tensor {shown(name)} has dtype {arr.dtype}, expected a float type")
        weights[internal_name(name)] = arr
    if args.tie_word_embeddings:
        weights.pop("lm_head", None)
    elif "lm_head" not in weights and "model.embed_tokens" in weights:
        raise ModelFileError(f"{folder}: lm_head.weight is missing and tie_word_embeddings is false")
    check_weights(weights, args, str(folder))
    return weights
