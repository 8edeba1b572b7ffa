"""Peak resident memory while loading and while generating, over what the model must hold (weights as the backend
keeps them + the KV cache), for each backend mode. Each mode runs in a fresh process; Linux only (VmHWM, reset
through /proc/self/clear_refs).

    python benchmarks/memory.py [MODEL ...] [--prompt 512] [--gen 64] [--kv-bits 8]

MODEL defaults to the SmolLM2 Q4_1 GGUF and an MLX 4-bit folder converted from it (safetensors). Ratios: load
peak / weights, run peak / (weights + KV); both above the process's footprint before loading (interpreter, numpy,
MLX). Targets (issue 13): load <= 1.15x and run <= 1.3x on MLX and numpy's quantized mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
MODES = (("mlx", None), ("numpy", "quantized"), ("numpy", "float32"))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(model: str, backend: str, numpy_weights: str | None, prompt: int, gen: int, kv_bits: int | None) -> dict:
    import numpy as np

    import mlxllama
    from mlxllama import backends
    from mlxllama.generate import generate_step
    from mlxllama.cache import CacheSettings
    from mlxllama.memory import kv_bytes

    backends.get_ops(backend, numpy_weights=numpy_weights)  # import the backend's libraries first
    base = _status("VmRSS")
    _reset_peak()
    m, tok = mlxllama.load(model, backend=backend, numpy_weights=numpy_weights)
    load_peak = _status("VmHWM") - base
    after_load = _status("VmRSS") - base
    settings = CacheSettings(kv_bits=kv_bits)
    ids = list(np.random.default_rng(0).integers(10, min(m.args.vocab_size, 30000), prompt))
    _reset_peak()
    for _ in generate_step(m, ids, gen, cache_settings=settings):
        pass
    run_peak = _status("VmHWM") - base
    kv = kv_bytes(m.args, prompt + gen, 1, m.ops, settings)
    return {"backend": backend if numpy_weights is None else f"{backend} {numpy_weights}",
            "weights": m.resident_nbytes, "kv": kv, "load_peak": load_peak, "after_load": after_load,
            "run_peak": run_peak, "base": base}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--kv-bits", type=int, default=None)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        model, backend, mode = a.child
        print(json.dumps(child(model, backend, None if mode == "-" else mode, a.prompt, a.gen, a.kv_bits)))
        return
    models = list(a.models)
    tmp = None
    if not models:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import smollm2_path

        from mlxllama.convert import convert_model

        gguf = smollm2_path()
        tmp = tempfile.TemporaryDirectory()
        folder = convert_model(str(gguf), Path(tmp.name) / "smollm2-mlx-q4", quantize=False)
        models = [str(gguf), str(folder)]
    print(f"prompt {a.prompt} + {a.gen} generated tokens; KV {a.kv_bits or 'float'}; MB = 1e6 bytes, above the "
          "footprint before loading")
    print("| model | backend | weights MB | KV MB | load peak MB | load / weights | run peak MB | run / (weights + KV) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model in models:
        for backend, mode in MODES:
            cmd = [sys.executable, __file__, "--child", model, backend, mode or "-", "--prompt", str(a.prompt),
                   "--gen", str(a.gen)] + (["--kv-bits", str(a.kv_bits)] if a.kv_bits else [])
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            if out.returncode:
                print(f"| {Path(model).name} | {backend} {mode or ''} | failed: {out.stderr.strip()[-200:]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            w, kv = r["weights"], r["kv"]
            print(f"| {Path(model).name} | {r['backend']} | {w / 1e6:.1f} | {kv / 1e6:.1f} | {r['load_peak'] / 1e6:.1f} "
                  f"| {r['load_peak'] / w:.2f} | {r['run_peak'] / 1e6:.1f} | {r['run_peak'] / (w + kv):.2f} |",
                  flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
