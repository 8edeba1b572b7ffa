"""Threads of the numpy backend: its worker pool, the timed choice of a decode step's thread count (and of the
fused kernel's prefetch), and BLAS's own thread count (through threadpoolctl), which is one setting for the whole
process."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading

import numpy as np

logger = logging.getLogger(__name__)

# bytes past each block's codes that the fused kernel (qmatvec) asks the cache for. A batch-1 step streams every
# weight from memory once; on one Zen 4 core the hardware's prefetchers alone left SmolLM2's products at 22 G
# multiply-adds/s against 31 with 4096 (2048: 28-29, 8192: 24-26), while on Zen 2 an earlier kernel lost to it.
# Steps time both with their thread count (NumpyOps.step_options) and keep the faster.
PREFETCH = 4096


PARALLEL_ELEMENTS = 1 << 18  # elementwise work below this stays on the calling thread (Workers.by_rows)


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def column_blocks(n: int, workers: int) -> list[slice]:
    """About four blocks per worker (so a worker slowed by another process leaves its share to the others),
    each a multiple of 64 columns and at least 256."""
    step = max(256, -(-n // (4 * workers) // 64) * 64)
    return [slice(c, min(c + step, n)) for c in range(0, n, step)]


def spans(n: int, parts: int) -> list[slice]:
    """About `parts` column ranges covering n, multiples of 64 columns."""
    step = max(64, -(-n // parts // 64) * 64)
    return [slice(c, min(c + step, n)) for c in range(0, n, step)]


class Workers:
    """A lazily started pool of `threads` threads (numpy's BLAS, ufunc loops and the numba kernels release the
    GIL), and one float32 scratch buffer per thread."""

    def __init__(self, threads: int):
        self.threads = threads
        self._pool = None
        self._scratch: dict[int, np.ndarray] = {}

    def _executor(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mlxllama-numpy")
        return self._pool

    def run(self, fn, items: list) -> None:
        """fn(item) for every item, on the pool."""
        if self.threads == 1 or len(items) == 1:
            for it in items:
                fn(it)
            return
        for f in [self._executor().submit(fn, it) for it in items]:
            f.result()

    def share(self, fn, items: list, workers: int) -> None:
        """fn(item) for every item, claimed one at a time by this thread and workers - 1 pool threads: a thread
        slowed by another process leaves its share to the others, and this thread never waits for a pool thread
        that has not started (one that starts late finds nothing left)."""
        if workers == 1 or len(items) == 1:
            for it in items:
                fn(it)
            return
        claim, left, lock, finished = itertools.count(), [len(items)], threading.Lock(), threading.Event()
        errors: list[BaseException] = []

        def work():
            for i in iter(claim.__next__, None):
                if i >= len(items):
                    return
                try:
                    fn(items[i])
                except BaseException as e:  # raised again by the calling thread
                    errors.append(e)
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        finished.set()

        for _ in range(workers - 1):
            self._executor().submit(work)
        work()
        finished.wait()
        if errors:
            raise errors[0]

    def by_rows(self, fn, rows: int, size: int) -> None:
        """fn(slice) over ranges of rows covering [0, rows), shared with the pool where the work (size elements) is
        large enough to pay for the handoff (a long prompt's norms, RoPE, SiLU gate and input rounding)."""
        if self.threads == 1 or rows < 2 or size < PARALLEL_ELEMENTS:
            fn(slice(0, rows))
            return
        step = -(-rows // (2 * self.threads))
        self.share(fn, [slice(r, min(r + step, rows)) for r in range(0, rows, step)], self.threads)

    def scratch(self, size: int) -> np.ndarray:
        """This thread's float32 buffer of at least `size` elements (grown, never shrunk)."""
        key = threading.get_ident()
        buf = self._scratch.get(key)
        if buf is None or buf.size < size:
            buf = self._scratch[key] = np.empty(size, np.float32)
        return buf


class ThreadChoice:
    """The faster of a few options, by timing: each option's step time is a moving average; after trying each
    twice, the best is used and the others are retried in turn now and then, less often each time they lose again
    (every 16 steps, then 32, ... up to 512: a retry that is 20x slower then costs 4%). A retry's time replaces the
    option's average, so one disturbed step does not keep an option out for hundreds of steps."""

    def __init__(self, options: tuple):
        self.options = options
        self.avg: dict = {}  # option -> mean seconds
        self.tries = {o: 0 for o in options}
        self.best = options[0]
        self.interval, self.countdown = 16, 16
        self.retries = 0

    def pick(self):
        for o in self.options:
            if self.tries[o] < 2:
                return o
        self.countdown -= 1
        if self.countdown <= 0:
            self.countdown = self.interval
            others = [o for o in self.options if o != self.best]
            self.retries += 1
            return others[self.retries % len(others)] if others else self.best
        return self.best

    def record(self, option, seconds: float) -> None:
        self.tries[option] += 1
        prev = self.avg.get(option)
        # a retried loser's average is stale (it may hold a step another process slowed): the retry replaces it
        fresh = prev is None or option != self.best
        self.avg[option] = seconds if fresh else 0.7 * prev + 0.3 * seconds
        if len(self.avg) < len(self.options):
            return
        best = min(self.avg, key=self.avg.get)
        if best != self.best:
            self.best, self.interval = best, 16
            self.countdown = min(self.countdown, 16)
        elif option != self.best:
            self.interval = min(2 * self.interval, 512)


class Blas:
    """get/set the thread count of numpy's BLAS through threadpoolctl; where it finds no BLAS it can set (or
    threadpoolctl is missing), `available` is False and nothing is changed."""

    def __init__(self):
        self._lib = None
        try:
            from threadpoolctl import ThreadpoolController

            libs = ThreadpoolController().select(user_api="blas")
        except Exception:  # threadpoolctl missing or unable to inspect this process: leave BLAS alone
            logger.debug("threadpoolctl cannot reach numpy's BLAS", exc_info=True)
            return
        if libs.lib_controllers:
            self._lib = libs.lib_controllers[0]

    @property
    def available(self) -> bool:
        return self._lib is not None

    def get(self) -> int:
        return int(self._lib.get_num_threads())

    def set(self, n: int) -> None:
        self._lib.set_num_threads(int(n))


class BlasThreads:
    """BLAS's thread count is one setting for the whole process. While forward passes run (from any thread), it is
    the count the latest one asked for; when the last one ends, the count from before the first returns."""

    def __init__(self, blas: Blas):
        self.blas = blas
        self._lock = threading.Lock()
        self._active = 0
        self._before: int | None = None

    @contextlib.contextmanager
    def held(self, want: int):
        if not self.blas.available:
            yield
            return
        with self._lock:
            if self._active == 0:
                self._before = self.blas.get()
            self._active += 1
            if self.blas.get() != want:
                self.blas.set(want)
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0 and self.blas.get() != self._before:
                    self.blas.set(self._before)
