"""The public Python API: load, generate, stream_generate (shaped like mlx-lm's)."""

from __future__ import annotations

from pathlib import Path

from . import backends, loaders
from .config import ModelArgs
from .generate import BatchResponse, GenerationResponse, batch_generate, generate, stream_generate  # noqa: F401
from .model import Model


def resolve(ref: str | Path | None = None, revision: str | None = None) -> Path:
    """A local folder or .gguf file for a model reference: path, .gguf, HF repo id ("repo:file.gguf"), "default"."""
    if isinstance(ref, Path):
        ref = str(ref)
    from . import hub

    return hub.resolve(ref, revision=revision)


def load_weights(ref: str | Path | None = None, revision: str | None = None):
    """(ModelArgs, weights in the internal layout, Tokenizer), without choosing a backend."""
    return loaders.load(resolve(ref, revision))


def load(ref: str | Path | None = None, backend: str = "auto", revision: str | None = None,
         numpy_weights: str | None = None, ctx: int = 0, batch: int = 1, cache_settings=None):
    """Load a model and its tokenizer. backend: "auto" (MLX on a GPU, else numpy), "mlx" or "numpy".
    numpy_weights: "auto", "fused" (4/8-bit weights kept as stored, the fastest decode; needs numba), "float32"
    or "quantized" (see backends/numpy_ops.py); default from MLXLLAMA_NUMPY_WEIGHTS, else "auto".
    Before the weights are laid out (the loader's tensors are memory-mapped), the fit check runs for the weights as
    the backend will hold them + a KV cache of ctx x batch (cache_settings: cache.CacheSettings) + activations,
    and raises memory.DoesNotFit where the device cannot hold them."""
    from . import memory

    ops = backends.get_ops(backend, numpy_weights=numpy_weights)
    args, weights, tokenizer = load_weights(ref, revision)
    need = memory.backend_need(args, memory.weights_resident(weights, ops), ctx, batch, ops, cache_settings)
    memory.ensure_fits(need, memory.device_memory(ops), args)
    return Model(args, weights, ops, release=True), tokenizer


__all__ = ["load", "load_weights", "generate", "stream_generate", "batch_generate", "BatchResponse",
           "GenerationResponse", "Model", "ModelArgs"]
