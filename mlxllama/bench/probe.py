"""Measured memory bandwidth: copy (read + write) and read, best of several runs over a buffer larger than the
last-level cache.

On a CPU (numpy, or MLX on its CPU device) the probe is numpy over all cores: one thread per core, each copying or
summing its slice, since the decode kernels (BLAS, MLX's CPU kernels) run on every core too and one core cannot
saturate the memory bus. MLX's own CPU reductions are not used: they are compute-bound on x86 and read low. On a
GPU the probe is MLX on that device. The buffer is 4x the last-level cache and at least 256 MiB (1 GiB on a GPU,
whose L2 and Apple's system cache reach tens of MiB), so caches cannot serve it; the probe keeps the best of
`runs` timed runs after a warm-up and stops early after about max_seconds.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MIN_CPU_BUFFER = 256 << 20
GPU_BUFFER = 1 << 30
MAX_CPU_BUFFER = 1 << 30


@dataclass(frozen=True)
class BandwidthProbe:
    backend: str        # "numpy" or "mlx": what ran the probe
    device: str         # "cpu", or MLX's default device, e.g. "Device(gpu, 0)"
    copy_gbps: float    # 2 * nbytes / best copy time (each byte read once and written once)
    read_gbps: float    # nbytes / best reduction time
    nbytes: int         # size of the source array
    runs: int           # timed runs of each kind
    threads: int = 1    # CPU threads the probe used
    llc_bytes: int | None = None  # the last-level cache it had to outgrow, where known
    load_average: float | None = None  # the 1-minute load average when the probe finished (Unix)

    def to_dict(self) -> dict:
        return asdict(self)


def llc_bytes() -> int | None:
    """Size of the largest CPU cache: Linux sysfs, macOS sysctl (hw.l3cachesize, else hw.l2cachesize)."""
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            sizes.append(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])
    if sizes:
        return max(sizes)
    if platform.system() == "Darwin":
        for key in ("hw.l3cachesize", "hw.l2cachesize"):
            try:
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                return None
            if out.strip().isdigit() and int(out) > 0:
                return int(out)
    return None


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cpu_buffer_bytes(llc: int | None) -> int:
    return min(max(MIN_CPU_BUFFER, 4 * (llc or 0)), MAX_CPU_BUFFER)


def _best(fn, runs: int, deadline: float) -> tuple[float, int]:
    fn()  # warm-up: page faults, kernel compilation
    best, done = float("inf"), 0
    while done < runs and (done < 2 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        done += 1
    return best, done


def probe_numpy(nbytes: int | None = None, runs: int = 7, max_seconds: float = 3.0,
                threads: int | None = None) -> BandwidthProbe:
    llc = llc_bytes()
    nbytes = nbytes or cpu_buffer_bytes(llc)
    threads = max(1, threads or os.cpu_count() or 1)
    src = np.ones(max(nbytes // 4, threads), dtype=np.float32)
    dst = np.empty_like(src)
    pairs = list(zip(np.array_split(src, threads), np.array_split(dst, threads)))
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL in copies and reductions
        def copy():
            list(pool.map(lambda p: np.copyto(p[1], p[0]), pairs))

        def read():
            list(pool.map(lambda p: p[0].sum(), pairs))

        deadline = time.perf_counter() + max_seconds / 2
        t_copy, r1 = _best(copy, runs, deadline)
        deadline = time.perf_counter() + max_seconds / 2
        t_read, r2 = _best(read, runs, deadline)
    return BandwidthProbe("numpy", "cpu", 2 * src.nbytes / t_copy / 1e9, src.nbytes / t_read / 1e9,
                          src.nbytes, min(r1, r2), threads, llc, _load())


def probe_mlx(nbytes: int | None = None, runs: int = 7, max_seconds: float = 3.0) -> BandwidthProbe:
    import mlx.core as mx

    llc = llc_bytes()
    if nbytes is None:
        nbytes = GPU_BUFFER if mx.default_device() == mx.gpu else cpu_buffer_bytes(llc)
    n = max(nbytes // 4, 1)
    src = mx.ones((n,), dtype=mx.float32)
    mx.eval(src)
    deadline = time.perf_counter() + max_seconds / 2
    t_copy, r1 = _best(lambda: mx.eval(src + 1.0), runs, deadline)
    deadline = time.perf_counter() + max_seconds / 2
    t_read, r2 = _best(lambda: mx.eval(mx.sum(src)), runs, deadline)
    return BandwidthProbe("mlx", str(mx.default_device()), 2 * n * 4 / t_copy / 1e9, n * 4 / t_read / 1e9,
                          n * 4, min(r1, r2), 1, llc, _load())


def probe(backend: str = "numpy", nbytes: int | None = None, runs: int = 7, max_seconds: float = 3.0,
          on_gpu: bool = False) -> BandwidthProbe:
    """Probe the memory a run on `backend` reads: MLX on its GPU (on_gpu), else numpy over all CPU cores."""
    if backend.startswith("mlx") and on_gpu:
        return probe_mlx(nbytes, runs, max_seconds)
    return probe_numpy(nbytes, runs, max_seconds)
