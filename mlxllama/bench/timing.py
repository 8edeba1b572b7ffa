"""The one timing harness of `mlxllama bench` and benchmarks/: wall and CPU seconds of a call, with the device
synchronized on both sides, and the one-warm-up-then-N-runs pattern."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(); `sync` waits for queued device work (before and after,
    so that neither earlier work nor unfinished work is counted)."""
    if sync:
        sync()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0, time.process_time() - c0


def runs(fn: Callable[[], float], repetitions: int, warmup: int = 1) -> list[float]:
    """fn() warmup + repetitions times; the results of the timed ones."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repetitions)]


def median(samples: list[float]) -> float:
    return statistics.median(samples)
