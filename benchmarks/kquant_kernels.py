"""Per-type speed of the numpy backend's GGUF block products (backends/kquants.py).

    python benchmarks/kquant_kernels.py [--size 2048] [--rows 1,8] [--threads 1] [--types Q5_0,Q8_0,...]

Random blocks (float16 fields kept small), a [rows, size] float32 input; the best of --reps calls of
KQuantLinear.matmul, in milliseconds and billions of weights a second (weights x rows / time)."""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from mlxllama.backends import kquants
from mlxllama.weights import GGMLWeight

HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0],
               "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}


def random_weight(qtype: str, rows: int, cols: int) -> GGMLWeight:
    rng = np.random.default_rng(0)
    block, size = GGML_QUANT_SIZES[QT[qtype]]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        half = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)
        raw[..., at:at + 2] = half.view(np.uint8).reshape(*raw.shape[:2], 2)
    return GGMLWeight(qtype, raw.reshape(rows, -1), (rows, cols))


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K")
    a = ap.parse_args()
    kquants._threads = lambda: a.threads
    print(f"# {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.2f}, threads {a.threads}")
    print("| type | rows | ms | Gweights/s |")
    print("|---|---:|---:|---:|")
    for qtype in a.types.split(","):
        lin = kquants.prepare_numpy([random_weight(qtype, a.size, a.size)])
        for rows in [int(r) for r in a.rows.split(",")]:
            x = np.random.default_rng(1).standard_normal((rows, a.size)).astype(np.float32)
            ms = best_ms(lambda: lin.matmul(x), a.reps)
            print(f"| {qtype} | {rows} | {ms:.2f} | {a.size * a.size * rows / ms / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
