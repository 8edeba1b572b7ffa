"""Backend selection. "auto" is MLX where MLX has a GPU (Metal or CUDA), numpy otherwise: on a CPU,
numpy's BLAS products beat MLX's CPU kernels by a wide margin (see README, Backends)."""

from __future__ import annotations

from ..errors import UsageError

BACKENDS = ("auto", "mlx", "numpy")


def mlx_importable() -> bool:
    try:
        import mlx.core  # noqa: F401
    except Exception:
        return False
    return True


def mlx_has_gpu() -> bool:
    if not mlx_importable():
        return False
    from .mlx_ops import gpu_available

    return gpu_available()


def pick(backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "mlx" if mlx_has_gpu() else "numpy"
    if backend == "mlx" and not mlx_importable():
        raise UsageError('backend "mlx" needs MLX: pip install "mlxllama[cpu]" (Linux CPU), '
                         '"mlxllama[cuda]" (Linux CUDA); on macOS it is installed with mlxllama')
    return backend


def get_ops(backend: str, numpy_weights: str | None = None):
    """The ops object of a backend. numpy_weights: "auto", "fused", "float32" or "quantized" (see numpy_ops;
    default: the MLXLLAMA_NUMPY_WEIGHTS environment variable, else "auto")."""
    name = pick(backend)
    if name == "mlx":
        from .mlx_ops import MLXOps

        return MLXOps()
    from .numpy_ops import NumpyOps

    return NumpyOps(weights=numpy_weights)
