"""Decode at depth: tok/s and bytes read per token with a 16/32-bit, 8-bit and 4-bit KV cache after a prompt of
`--depth` tokens (random ids), per backend. Bytes per token = weights read per step + the KV cache at the depth
(accounting.Accounting with the cache's element size). Decode runs through the engine's step
(bench.run.decode_tps). Usage: python benchmarks/kv_depth.py [MODEL] [--depth 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import smollm2_path

    from mlxllama import backends, loaders
    from mlxllama.accounting import account_weights, kv_element_bytes
    from mlxllama.bench.run import decode_tps, resident_weights
    from mlxllama.cache import CacheSettings, for_backend
    from mlxllama.model import Model

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--depth", type=int, default=2048)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--backends", default="numpy,mlx")
    a = ap.parse_args()
    path = a.model or str(smollm2_path())
    print(f"{Path(path).name}: decode {a.n} tokens after {a.depth}")
    print("| backend | KV | KV MB at depth | bytes/token (MB) | tok/s | vs float KV |")
    print("|---|---|---:|---:|---:|---:|")
    for name in a.backends.split(","):
        ops = backends.get_ops(name, numpy_weights="quantized" if name == "numpy" else None)
        args, weights, _ = loaders.load(Path(path))
        model = Model(args, weights, ops)
        first = None
        for bits in (None, 8, 4):
            s = for_backend(CacheSettings(kv_bits=bits), ops)
            acc = account_weights(args, resident_weights(weights, ops),
                                  kv_bytes=kv_element_bytes(ops.float_bytes, bits, s.kv_group_size, s.kv_dtype))
            rng = np.random.default_rng(0)
            tps = decode_tps(model, rng.integers(10, 30000, (1, 1)), a.n, rng.integers(10, 30000, (1, a.depth)),
                             settings=s)
            first = first or tps
            label = f"{bits}-bit g64" if bits else f"{8 * ops.kv_bytes}-bit"
            print(f"| {name}{' quantized' if name == 'numpy' else ''} | {label} | {acc.kv_bytes(a.depth) / 1e6:.1f} | "
                  f"{acc.bytes_per_token(a.depth) / 1e6:.1f} | {tps:.1f} | {tps / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
