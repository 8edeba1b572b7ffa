"""Measured memory bandwidth of the active backend: copy (read + write) and read, best of several runs.

numpy runs on one CPU thread, so its figure is what one core can pull, usually far below the chip's rating; MLX
runs on its default device (the GPU on Apple silicon and CUDA, else the CPU). Arrays are float32 and meant to be
larger than the caches: 64 MiB, or 256 MiB for MLX on a GPU (GPU L2 and Apple's system cache reach tens of MiB);
the probe stops after about max_seconds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BandwidthProbe:
    backend: str        # "numpy" or "mlx"
    device: str         # "cpu", or MLX's default device, e.g. "Device(gpu, 0)"
    copy_gbps: float    # 2 * nbytes / best copy time (each byte read once and written once)
    read_gbps: float    # nbytes / best reduction time
    nbytes: int         # size of the source array
    runs: int           # timed runs of each kind

    def to_dict(self) -> dict:
        return asdict(self)


def _best(fn, runs: int, deadline: float) -> tuple[float, int]:
    fn()  # warm-up: page faults, kernel compilation
    best, done = float("inf"), 0
    while done < runs and (done == 0 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        done += 1
    return best, done


def probe_numpy(nbytes: int = 64 << 20, runs: int = 5, max_seconds: float = 1.0) -> BandwidthProbe:
    n = max(nbytes // 4, 1)
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    deadline = time.perf_counter() + max_seconds / 2
    t_copy, r1 = _best(lambda: np.copyto(dst, src), runs, deadline)
    deadline = time.perf_counter() + max_seconds / 2
    t_read, r2 = _best(lambda: src.sum(), runs, deadline)
    return BandwidthProbe("numpy", "cpu", 2 * src.nbytes / t_copy / 1e9, src.nbytes / t_read / 1e9,
                          src.nbytes, min(r1, r2))


def probe_mlx(nbytes: int | None = None, runs: int = 5, max_seconds: float = 1.0) -> BandwidthProbe:
    import mlx.core as mx

    if nbytes is None:
        nbytes = (256 << 20) if mx.default_device() == mx.gpu else (64 << 20)
    n = max(nbytes // 4, 1)
    src = mx.ones((n,), dtype=mx.float32)
    mx.eval(src)
    deadline = time.perf_counter() + max_seconds / 2
    t_copy, r1 = _best(lambda: mx.eval(src + 1.0), runs, deadline)
    deadline = time.perf_counter() + max_seconds / 2
    t_read, r2 = _best(lambda: mx.eval(mx.sum(src)), runs, deadline)
    return BandwidthProbe("mlx", str(mx.default_device()), 2 * n * 4 / t_copy / 1e9, n * 4 / t_read / 1e9,
                          n * 4, min(r1, r2))


def probe(backend: str = "numpy", nbytes: int | None = None, runs: int = 5,
          max_seconds: float = 1.0) -> BandwidthProbe:
    """Probe the named backend: anything starting with "mlx" uses MLX (imported only then), else numpy."""
    if backend.startswith("mlx"):
        return probe_mlx(nbytes, runs, max_seconds)
    return probe_numpy(nbytes or 64 << 20, runs, max_seconds)
