"""One entry for every model format. `load` decides the format once and reads config.json once:

    *.gguf file                           -> gguf.py        (metadata + tensors + embedded vocabulary)
    folder, config.json with quantization -> mlx_folder.py  (mlx-community layout: .scales/.biases beside weights)
    folder, config.json                   -> hf.py          (float safetensors)

Each format module maps its tensor names into the single internal layout (weights.py) and validates shapes
before reading any tensor data; safetensors_io.py is the reading both folder formats share.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ModelArgs, load_config
from ..errors import ModelFileError
from ..weights import QuantizedWeight, cut
from .safetensors_io import BF16


def load(path: str | Path, shard=None) -> tuple[ModelArgs, dict, object]:
    """(args, weights in the internal layout, Tokenizer) for a local .gguf file or model folder.

    shard(args, name, shape) -> (rows, cols) slices, or None to leave the tensor out: a rank of a distributed run
    (distributed.py) keeps only its part. The files are validated whole; only the kept parts are read."""
    from ..tokenizer import load_tokenizer, tokenizer_from_gguf

    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFileError(f"{path}: not a .gguf file or a model folder")
        from .gguf import load_gguf

        args, weights, meta = load_gguf(path, shard)
        return args, weights, tokenizer_from_gguf(meta, source=str(path))
    if not (path / "config.json").exists():
        raise ModelFileError(f"{path}: no config.json (expected an HF or MLX model folder)")
    args = load_config(path / "config.json")
    if args.quantization is not None:  # `quantization` (mlx-lm) or `quantization_config` with quant_method mlx
        from .mlx_folder import read_mlx_weights as read
    else:
        from .hf import read_hf_weights as read
    # read-only memmaps (and QuantizedWeight views of them): nothing is read yet; a shard widens bf16 once cut
    weights = read(path, args, lazy_bf16=shard is not None)
    if shard is not None:
        weights = cut_weights(weights, lambda name, shape: shard(args, name, shape))
    return args, weights, load_tokenizer(path, args.eos_token_id)


def cut_weights(weights: dict, keep) -> dict:
    """keep(name, shape) -> (rows, cols) or None for each tensor; the kept parts as views (weights.cut)."""
    out = {}
    for name, w in weights.items():
        part = keep(name, tuple(w.shape))
        if part is not None:
            try:
                out[name] = _widened(cut(w, *part))
            except ModelFileError as e:
                raise ModelFileError(f"{name}: {e}") from None
    return out


def _widened(w):
    """bf16 parts (safetensors_io.BF16) as float32 arrays; everything else as it is."""
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(w.weight, _widened(w.scales), _widened(w.biases), w.group_size, w.bits)
    return np.asarray(w) if isinstance(w, BF16) else w
