"""One entry for every model format. `load` decides the format once and reads config.json once:

    *.gguf file                           -> gguf.py        (metadata + tensors + embedded vocabulary)
    folder, config.json with quantization -> mlx_folder.py  (mlx-community layout: .scales/.biases beside weights)
    folder, config.json                   -> hf.py          (float safetensors)

Each format module maps its tensor names into the single internal layout (weights.py) and validates shapes
before reading any tensor data; safetensors_io.py is the reading both folder formats share.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelArgs, load_config
from ..errors import ModelFileError


def load(path: str | Path) -> tuple[ModelArgs, dict, object]:
    """(args, weights in the internal layout, Tokenizer) for a local .gguf file or model folder."""
    from ..tokenizer import load_tokenizer, tokenizer_from_gguf

    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFileError(f"{path}: not a .gguf file or a model folder")
        from .gguf import load_gguf

        args, weights, meta = load_gguf(path)
        return args, weights, tokenizer_from_gguf(meta, source=str(path))
    if not (path / "config.json").exists():
        raise ModelFileError(f"{path}: no config.json (expected an HF or MLX model folder)")
    args = load_config(path / "config.json")
    if args.quantization is not None:  # `quantization` (mlx-lm) or `quantization_config` with quant_method mlx
        from .mlx_folder import read_mlx_weights as read
    else:
        from .hf import read_hf_weights as read
    weights = read(path, args)
    return args, weights, load_tokenizer(path, args.eos_token_id)
