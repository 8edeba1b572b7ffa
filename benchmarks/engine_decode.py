"""Single-stream decode through the engine against an earlier checkout's stream_generate, side by side in one run.

Each measurement runs in a child process (two versions of the package cannot share one), alternating old and new
(A B A B ...) so that the machine's noise falls on both; greedy, the same prompt, the same token count. The figure
is decode tokens per second from the first token to the last, timed the same way in both; the ratio is new / old
of the medians. Usage:

  git worktree add /tmp/old <commit>       # the version to compare against
  python benchmarks/engine_decode.py --old /tmp/old [--model PATH.gguf] [--backends numpy,mlx] [-n 128] [-r 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CHILD = r"""
import json, sys, time
import mlxllama

model_path, backend, weights, n = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
model, tok = mlxllama.load(model_path, backend=backend, numpy_weights=weights)
prompt = "Once upon a time, in a small village by the sea, there lived"
for r in mlxllama.stream_generate(model, tok, prompt, max_tokens=8, chat=False):  # warm up
    pass
times = []
for r in mlxllama.stream_generate(model, tok, prompt, max_tokens=n, chat=False):
    times.append(time.perf_counter())
print(json.dumps({"tps": (len(times) - 1) / (times[-1] - times[0]), "tokens": len(times),
                  "file": mlxllama.__file__}))
"""


def measure(root: Path, model: str, backend: str, weights: str, n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", CHILD, model, backend, weights, str(n)], env=env, cwd=str(root),
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{root}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out["file"].startswith(str(root)):
        raise SystemExit(f"{root}: imported {out['file']} instead")
    return out


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import smollm2_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="a checkout of the version to compare against")
    ap.add_argument("--model", default=None)
    ap.add_argument("--backends", default="numpy,mlx")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5, help="pairs of runs")
    a = ap.parse_args()
    model = a.model or str(smollm2_path())
    new_root = HERE.parent.resolve()
    print(f"{Path(model).name}: greedy decode of {a.n} tokens, {a.r} pairs (old, new) alternating")
    print("| backend | old tok/s (median) | new tok/s (median) | new / old |")
    print("|---|---:|---:|---:|")
    for backend in a.backends.split(","):
        weights = "fused" if backend == "numpy" else ""
        old, new = [], []
        for _ in range(a.r):
            old.append(measure(Path(a.old).resolve(), model, backend, weights, a.n)["tps"])
            new.append(measure(new_root, model, backend, weights, a.n)["tps"])
        mo, mn = statistics.median(old), statistics.median(new)
        label = f"{backend}{' fused' if weights else ''}"
        print(f"| {label} | {mo:.1f} | {mn:.1f} | {mn / mo:.3f} |", flush=True)


if __name__ == "__main__":
    main()
