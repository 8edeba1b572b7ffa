"""mlxllama: LLaMA inference with MLX (Metal, CUDA, CPU) and a pure-numpy backend."""

__version__ = "0.1.0"

from .api import (BatchResponse, GenerationResponse, batch_generate, generate, load, load_weights,  # noqa: E402
                  stream_generate)

__all__ = ["load", "load_weights", "generate", "stream_generate", "batch_generate", "BatchResponse",
           "GenerationResponse", "__version__"]
