"""The public Python API: load, generate, stream_generate (shaped like mlx-lm's)."""

from __future__ import annotations

from pathlib import Path

from . import backends
from .config import ModelArgs, from_hf_dict, read_json
from .errors import ConfigError, ModelFileError
from .generate import GenerationResponse, generate, stream_generate  # noqa: F401  (re-exported)
from .model import Model


def resolve(ref: str | Path | None = None, revision: str | None = None) -> Path:
    """A local folder or .gguf file for a model reference: path, .gguf, HF repo id ("repo:file.gguf"), "default"."""
    if isinstance(ref, Path):
        ref = str(ref)
    from . import hub

    return hub.resolve(ref, revision=revision)


def load_weights(ref: str | Path | None = None, revision: str | None = None):
    """(ModelArgs, weights in the internal layout, Tokenizer), without choosing a backend."""
    return load_path(resolve(ref, revision))


def load_path(path: Path):
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFileError(f"{path}: not a .gguf file or a model folder")
        from .loaders.gguf import load_gguf
        from .tokenizer import tokenizer_from_gguf

        args, weights, meta = load_gguf(path)
        return args, weights, tokenizer_from_gguf(meta, source=str(path))
    if not (path / "config.json").exists():
        raise ModelFileError(f"{path}: no config.json (expected an HF or MLX model folder)")
    config = read_json(path / "config.json", ConfigError, 1 << 20, "config")
    from_hf_dict(config, str(path / "config.json"))  # validates before routing: an object, supported, consistent
    if "quantization" in config:
        from .loaders.mlx_folder import load_mlx

        args, weights = load_mlx(path)
    else:
        from .loaders.hf import load_hf

        args, weights = load_hf(path)
    from .tokenizer import load_tokenizer

    return args, weights, load_tokenizer(path, args.eos_token_id)


def load(ref: str | Path | None = None, backend: str = "auto", revision: str | None = None,
         numpy_weights: str | None = None):
    """Load a model and its tokenizer. backend: "auto" (MLX on a GPU, else numpy), "mlx" or "numpy".
    numpy_weights: "auto", "fused" (4/8-bit weights kept as stored, the fastest decode; needs numba), "float32"
    or "quantized" (see backends/numpy_ops.py); default from MLXLLAMA_NUMPY_WEIGHTS, else "auto"."""
    ops = backends.get_ops(backend, numpy_weights=numpy_weights)
    args, weights, tokenizer = load_weights(ref, revision)
    return Model(args, weights, ops, release=True), tokenizer


__all__ = ["load", "load_weights", "generate", "stream_generate", "GenerationResponse", "Model", "ModelArgs"]
