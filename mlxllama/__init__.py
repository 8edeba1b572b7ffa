"""mlxllama: LLaMA inference with MLX (Metal, CUDA, CPU) and a pure-numpy backend."""

__version__ = "0.1.0"

from .api import GenerationResponse, generate, load, load_weights, stream_generate  # noqa: E402

__all__ = ["load", "load_weights", "generate", "stream_generate", "GenerationResponse", "__version__"]
