"""mlxllama: LLaMA inference with MLX (Metal, CUDA, CPU) and a pure-numpy backend."""

__version__ = "0.1.0"
