"""Side-by-side speed and memory: mlxllama's backends against mlx-lm and llama.cpp, on one model file.

    python benchmarks/compare.py                       # SmolLM2 default, pp512 / tg128, median of 3
    python benchmarks/compare.py --quick               # pp128 / tg32, one repetition: a couple of minutes
    python benchmarks/compare.py --model path/or/ref --engines numpy,llama.cpp --json out.json
    python benchmarks/random_gguf.py /tmp/llama-1b.gguf && python benchmarks/compare.py --model /tmp/llama-1b.gguf

Every engine runs in its own subprocess (so peak RSS is its own) on the same random prompt token ids:
  pp<N>   prompt tokens per second: a fresh N-token prompt through to the first sampled token
  tg<N>   tokens per second of N greedy decode steps after a 16-token prompt (stop tokens ignored, as
          llama-bench does)
  TTFT    time to first token for the pp prompt: "cold" is the first call after loading, "warm" the median
  load    seconds to a ready model (files parsed, weights laid out)
  RSS     peak resident set of the subprocess; "engine" is that minus the RSS after imports, before loading;
          it is also given over the bytes of the file's weights
Each test runs once to warm up, then --reps times; the median is reported. All engines stay loaded and their
repetitions are interleaved (engine order rotating), so that a shared machine's changing load hits each alike;
only their ratios are meaningful on such a machine. mlx-lm runs on the MLX folder that
`mlxllama convert` writes from the model (into a temporary folder); llama.cpp (llama-cpp-python) needs a GGUF.
On a machine without an MLX GPU, mlx-lm's float16 parameters are cast to float32 (exact) before timing: MLX's CPU
kernels emulate float16 arithmetic and run ~30x slower (use --mlx-lm-dtype stored to time the file as stored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("numpy", "numpy-fused", "numpy-fused8", "numpy-q", "mlx", "mlx-lm", "llama.cpp")
LABELS = {"numpy": "mlxllama numpy float32", "numpy-fused": "mlxllama numpy fused",
          "numpy-fused8": "mlxllama numpy fused int8", "numpy-q": "mlxllama numpy (quantized)",
          "mlx": "mlxllama mlx", "mlx-lm": "mlx-lm", "llama.cpp": "llama.cpp"}
NUMPY_WEIGHTS = {"numpy": "float32", "numpy-fused": "fused", "numpy-fused8": "fused", "numpy-q": "quantized"}
# numpy-fused8: the fused kernel on inputs rounded to int8 per block of 32 (llama.cpp's q8 steps), not int16
ENGINE_ENV = {"numpy-fused8": {"MLXLLAMA_KERNEL_ACT": "8"}}
OURS = ("numpy", "numpy-fused", "numpy-fused8", "numpy-q", "mlx")
PEERS = ("mlx-lm", "llama.cpp")


# -- measurements (shared by all workers) ---------------------------------------------------------------------

def _status(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_now() -> int:
    return _status("VmRSS")


def rss_peak() -> int:
    """Peak RSS since the start, or since the last reset_rss_peak()."""
    peak = _status("VmHWM")
    if peak:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_rss_peak() -> bool:
    """Start a new peak-RSS window (Linux: clear_refs 5), so that generation's peak is seen apart from loading's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def prompts(spec: dict, length: int, count: int, salt: int) -> list[list[int]]:
    """Random token ids, a different prompt per run (so no engine can reuse a cached prefix)."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"] * 1000 + salt)
    lo, hi = 100, spec["vocab_size"] - 100
    return [rng.integers(lo, hi, size=length).tolist() for _ in range(count)]


def time_prompt(stream, ids: list[int]) -> tuple[float, float]:
    """Seconds from submitting the prompt to holding the first sampled token (wall, and CPU of this process)."""
    from mlxllama.bench.timing import timed

    it = None

    def first():
        nonlocal it
        it = stream(ids, 1)
        next(it)

    dt, cpu = timed(first)
    it.close()
    return dt, cpu


def time_decode(stream, ids: list[int], n: int) -> tuple[float, float]:
    """Tokens per second of n decode steps after the prompt's first token, and CPU seconds per token."""
    from mlxllama.bench.timing import timed

    it = stream(ids, n + 1)
    next(it)
    got = 0

    def rest():
        nonlocal got
        got = sum(1 for _ in it)

    dt, cpu = timed(rest)
    if got != n:
        raise RuntimeError(f"decode produced {got} tokens, expected {n}")
    return n / dt, cpu / n


def serve(stream, spec: dict, info: dict) -> None:
    """Answer the orchestrator's commands on stdin ("pp i", "tg i", "done") with one JSON line each, so that all
    engines' repetitions can be interleaved (load changes on a shared machine then hit every engine alike)."""
    pp_prompts = prompts(spec, spec["pp"], spec["reps"] + 1, salt=1) if spec["pp"] else []
    tg_prompts = prompts(spec, spec["tg_prompt"], spec["reps"] + 1, salt=2) if spec["tg"] else []
    import gc

    gc.collect()
    info.update(rss_load_peak=rss_peak(), rss_after_load=rss_now(), rss_window=reset_rss_peak())
    reply({"ready": True, **info})
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "pp":
            s, cpu = time_prompt(stream, pp_prompts[int(arg)])
            reply({"s": s, "cpu": cpu})
        elif cmd == "tg":
            tps, cpu = time_decode(stream, tg_prompts[int(arg)], spec["tg"])
            reply({"tps": tps, "cpu": cpu})
        elif cmd == "done":
            reply({"rss_run_peak": rss_peak(), **info.get("final", lambda: {})()})
            return


def reply(obj: dict) -> None:
    print("RESULT " + json.dumps({k: v for k, v in obj.items() if not callable(v)}), flush=True)


# -- workers: one engine each, in its own process ------------------------------------------------------------

def worker_mlxllama(spec: dict, engine: str) -> None:
    from mlxllama import backends
    from mlxllama import loaders
    from mlxllama.api import resolve
    from mlxllama.bench.roofline import quant_label
    from mlxllama.generate import generate_step
    from mlxllama.model import Model

    backend = "mlx" if engine == "mlx" else "numpy"
    ops = backends.get_ops(backend, numpy_weights=NUMPY_WEIGHTS.get(engine))
    import mlxllama.loaders.gguf  # noqa: F401  (code the load would import: not engine memory)
    import mlxllama.tokenizer  # noqa: F401

    if NUMPY_WEIGHTS.get(engine) == "fused":
        import mlxllama.backends.qmatvec  # noqa: F401  (numba and the kernel module: code too)

    if backend == "mlx":
        ops.eval(ops.zeros((1,)) + 1)  # MLX initialized before the baseline
    base = rss_now()
    t0 = time.perf_counter()
    args, weights, _tok = loaders.load(resolve(spec["model"]))
    label = quant_label(weights)
    model = Model(args, weights, ops, release=True)
    weights_file = model.weights_nbytes
    del weights
    load_s = time.perf_counter() - t0
    a = args
    itemsize = ops.kv_bytes
    kv_tokens = max(spec["pp"], spec["tg_prompt"] + spec["tg"] + 1)
    kv = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * kv_tokens * itemsize

    def final():
        if backend != "mlx":
            return {}
        import mlx.core as mx

        return {"mlx_peak_memory": int(mx.get_peak_memory())}

    def stream(ids, n):
        return generate_step(model, ids, n, prefill_step_size=512)

    serve(stream, spec, dict(load_s=load_s, rss_base=base, weights_file_bytes=weights_file,
                             weights_bytes=model.resident_nbytes, kv_bytes=kv, device=model.device,
                             detail=label + ("" if backend == "mlx" else f", {ops.weights_mode} weights")
                             + (f", int{_input_bits()} inputs" if ops.weights_mode == "fused" else ""),
                             final=final))


def worker_mlx_lm(spec: dict) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    base = rss_now()
    t0 = time.perf_counter()
    model, _tok = load(spec["mlx_folder"])
    cast = spec["mlx_lm_dtype"] == "float32" or (spec["mlx_lm_dtype"] == "auto" and not _mlx_gpu())
    if cast:
        model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    a = model.args
    kv_tokens = max(spec["pp"], spec["tg_prompt"] + spec["tg"] + 1)
    kv = 2 * a.num_hidden_layers * a.num_key_value_heads * (a.head_dim or a.hidden_size // a.num_attention_heads) \
        * kv_tokens * (4 if cast else 2)

    def stream(ids, n):
        for y, _ in generate_step(mx.array(ids), model, max_tokens=n, prefill_step_size=512):
            yield y

    serve(stream, spec, dict(load_s=load_s, rss_base=base, weights_bytes=weights,
                             kv_bytes=kv, device=str(mx.default_device()),
                             detail="float32 (cast from the stored float16)" if cast else "as stored",
                             final=lambda: {"mlx_peak_memory": int(mx.get_peak_memory())}))


def worker_llamacpp(spec: dict) -> None:
    import ctypes

    import llama_cpp
    import numpy as np

    base = rss_now()
    t0 = time.perf_counter()
    n_ctx = max(spec["pp"], spec["tg_prompt"] + spec["tg"]) + 16
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False)
    load_s = time.perf_counter() - t0
    ctx = llm.ctx
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))

    def decode(tokens: list[int]) -> int:
        for s in range(0, len(tokens), 512):
            part = tokens[s: s + 512]
            arr = (llama_cpp.llama_token * len(part))(*part)
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(part))) != 0:
                raise RuntimeError("llama_decode failed")
        logits = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), (n_vocab,)).argmax())

    def stream(ids, n):
        """Greedy decoding through llama.cpp's C API (llama_decode, argmax of the last logits): the leanest path
        the Python binding offers, close to what llama-bench times."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        y = decode(list(ids))
        for i in range(n):
            yield y
            if i + 1 < n:
                y = decode([y])

    size = int(llama_cpp.llama_model_size(llm.model))
    serve(stream, spec, dict(load_s=load_s, rss_base=base, weights_bytes=size, weights_file_bytes=size,
                             kv_bytes=spec["kv_per_token"] * 2 * n_ctx,  # its KV cache is float16, n_ctx long
                             device=f"cpu, {spec['threads']} threads",
                             detail=f"llama-cpp-python {llama_cpp.__version__}, n_ctx {n_ctx}"))


def _mlx_gpu() -> bool:
    import mlx.core as mx

    return bool(mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()))


def run_worker(engine: str, spec: dict) -> None:
    if engine in OURS:
        worker_mlxllama(spec, engine)
    elif engine == "mlx-lm":
        worker_mlx_lm(spec)
    else:
        worker_llamacpp(spec)


# -- orchestration --------------------------------------------------------------------------------------------

class Worker:
    """One engine's subprocess, driven line by line."""

    def __init__(self, engine: str, spec: dict):
        self.engine = engine
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""), **ENGINE_ENV.get(engine, {}))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", engine, "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        self.proc.wait()
        err = self.proc.stderr.read().strip().splitlines()
        raise RuntimeError(f"exit {self.proc.returncode}: {err[-1] if err else 'no output'}")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _input_bits() -> int:
    from mlxllama.backends.qmatvec import activation_bits

    return activation_bits()


def available(engine: str, spec: dict) -> str | None:
    """None if the engine can run, else why not."""
    import importlib.util

    if engine == "mlx" and importlib.util.find_spec("mlx") is None:
        return "MLX is not installed (pip install 'mlxllama[cpu]')"
    if NUMPY_WEIGHTS.get(engine) == "fused" and importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install 'mlxllama[fast-cpu]')"
    if engine == "mlx-lm":
        if importlib.util.find_spec("mlx_lm") is None:
            return "mlx-lm is not installed (pip install mlx-lm)"
        if not spec.get("mlx_folder"):
            return spec.get("mlx_folder_error") or "no MLX folder"
    if engine == "llama.cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (bash benchmarks/install_llamacpp.sh)"
        if not spec.get("gguf"):
            return "the model is not a GGUF file"
    return None


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        info["cpu"] = platform.processor()
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = os.getloadavg()
    return info


def fmt(v, spec: str = ".1f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:.0f}"


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    full = [r for r in rows if len(r) == len(head)]
    widths = [max(len(str(x[i])) for x in [head] + full) for i in range(len(head))]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    for r in rows:
        out.append(" | ".join(str(x).ljust(w) for x, w in zip(r, widths)) if len(r) == len(head)
                   else f"{r[0].ljust(widths[0])} | {r[1]}")
    return out


def table(results: dict, spec: dict) -> str:
    pp, tg = spec["pp"], spec["tg"]
    speed, memory = [], []
    for eng, r in results.items():
        if "error" in r or "skipped" in r:
            speed.append([LABELS[eng], r.get("skipped") or "error: " + r["error"]])
            continue
        speed.append([LABELS[eng], fmt(r.get("pp_tps")), fmt(r.get("pp_best_tps")), fmt(r.get("tg_tps")),
                      fmt(r.get("tg_best_tps")), fmt(r.get("ttft_cold_s"), ".2f"), fmt(r.get("ttft_s"), ".2f"),
                      fmt(r["load_s"], ".2f")])
        base = r["rss_base"]
        run = r.get("rss_run_peak") if r.get("rss_window") else None
        wkv = r.get("weights_bytes", 0) + r.get("kv_bytes", 0)
        overall = max(r["rss_load_peak"], run or 0)
        mlx_peak = r.get("mlx_peak_memory")
        wfile = spec.get("file_weights_bytes") or r.get("weights_file_bytes")
        memory.append([LABELS[eng], mb(wfile), mb(r.get("weights_bytes")), mb(r.get("kv_bytes")),
                       mb(r["rss_load_peak"] - base), mb(run - base) if run else "-",
                       f"{(run - base) / wkv:.2f}x" if run and wkv else "-",
                       f"{(overall - base) / wkv:.2f}x" if wkv else "-",
                       f"{(overall - base) / wfile:.2f}x" if wfile else "-",
                       f"{mb(mlx_peak)} ({mlx_peak / wkv:.2f}x)" if mlx_peak and wkv else "-", mb(base), mb(overall)])
    lines = _grid(["engine", f"pp{pp} t/s", "best", f"tg{tg} t/s", "best", "TTFT cold s", "TTFT warm s", "load s"],
                  speed)
    lines += ["", "Memory, MB. file w: the weights' bytes in the file (GGUF: its tensors); held w: as the engine holds them;",
              "load/run peak: peak RSS while loading / while generating, over the RSS after imports;",
              "peak/file w: the larger of the two over the file's weights;",
              "MLX peak: MLX's own peak allocation (mx.get_peak_memory), over weights + KV:"]
    lines += _grid(["engine", "file w", "held w", "KV", "load peak", "run peak", "run/(w+kv)", "peak/(w+kv)",
                    "peak/file w", "MLX peak", "imports", "peak RSS"], memory)
    ratios = []
    for ours in OURS:
        r = results.get(ours, {})
        for peer in PEERS:
            p = results.get(peer, {})
            parts = []
            for key, best, name in (("pp_tps", "pp_best_tps", f"pp{pp}"), ("tg_tps", "tg_best_tps", f"tg{tg}"),
                                    ("ttft_s", None, "TTFT")):
                if r.get(key) and p.get(key):
                    x = r[key] / p[key] if key != "ttft_s" else p[key] / r[key]
                    parts.append(f"{name} {x:.2f}x" + (f" [{r[best] / p[best]:.2f}x]" if best else ""))
            if ours == "mlx" and peer == "mlx-lm":  # both single-threaded: CPU time is robust to a shared machine
                for key, name in (("pp_cpu_s", f"pp{pp}"), ("tg_cpu_s_per_token", f"tg{tg}")):
                    if r.get(key) and p.get(key):
                        parts.append(f"{name} by CPU time {p[key] / r[key]:.2f}x")
            if parts:
                ratios.append(f"{LABELS[ours]} vs {LABELS[peer]}: " + ", ".join(parts))
    if ratios:  # none when every peer was skipped
        lines += ["", "Ratios of medians, [of best runs] (>1: mlxllama faster; TTFT: peer time / ours):"] + ratios
    lines += ["", "Engines:"] + [f"{LABELS[e]}: {r['detail']}, {r.get('device', '')}"
                                 for e, r in results.items() if r.get("detail")]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="default", help="any model reference mlxllama accepts (default: SmolLM2)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    ap.add_argument("--pp", type=int, default=512, help="prompt length for pp and TTFT (0: skip)")
    ap.add_argument("--tg", type=int, default=128, help="decode steps for tg (0: skip)")
    ap.add_argument("--tg-prompt", type=int, default=16, help="prompt length before the tg steps")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (median reported)")
    ap.add_argument("--quick", action="store_true", help="pp128, tg32, one repetition")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--mlx-lm-dtype", choices=("auto", "float32", "stored"), default="auto",
                    help="mlx-lm parameters: auto = float32 where MLX has no GPU, else as stored")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write all measurements here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap


def _spec(a, path: Path) -> dict:
    """What every worker is told: the model, the test sizes and the bytes the memory table divides by."""
    from mlxllama import loaders

    args, _w, _t = loaders.load(path)
    del _w
    spec = dict(model=str(path), vocab_size=args.vocab_size, pp=a.pp, tg=a.tg, tg_prompt=a.tg_prompt, reps=a.reps,
                seed=a.seed, threads=a.threads, mlx_lm_dtype=a.mlx_lm_dtype,
                kv_per_token=2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim,  # k and v values
                gguf=str(path) if path.is_file() and path.suffix.lower() == ".gguf" else None)
    if spec["gguf"]:
        import gguf

        spec["file_weights_bytes"] = int(sum(t.n_bytes for t in gguf.GGUFReader(path).tensors))
    return spec


def _start(engines: list, spec: dict, results: dict, workers: dict) -> None:
    """One worker per available engine into workers, loaded one at a time (a failed load is an error in results;
    the caller closes every worker started, whatever happens)."""
    for eng in engines:
        why = available(eng, spec)
        if why:
            print(f"{LABELS[eng]}: skipped ({why})", flush=True)
            results[eng] = {"skipped": f"skipped: {why}"}
            continue
        w = Worker(eng, spec)
        try:
            results[eng] = w.read()
            workers[eng] = w
            print(f"{LABELS[eng]}: loaded in {results[eng]['load_s']:.2f} s", flush=True)
        except RuntimeError as e:
            results[eng] = {"error": str(e)}
            w.close()


def _measure(a, workers: dict, results: dict) -> None:
    """A warm-up (the first prompt is the cold TTFT), then interleaved repetitions, the engines' order rotating."""
    tests = ([("pp", "pp_runs_s", "s")] if a.pp else []) + ([("tg", "tg_runs_tps", "tps")] if a.tg else [])
    for rep in range(a.reps + 1):
        order = list(workers)
        order = order[rep % len(order):] + order[: rep % len(order)] if order else order
        for cmd, key, field in tests:
            for eng in order:
                if "error" in results[eng]:
                    continue
                t0 = time.perf_counter()
                try:
                    ans = workers[eng].ask(f"{cmd} {rep}")
                except RuntimeError as e:
                    results[eng]["error"] = str(e)
                    continue
                got = ans[field]
                results[eng].setdefault(key, []).append(got)
                results[eng].setdefault(f"{cmd}_cpu_runs", []).append(ans["cpu"])
                print(f"  {'warm-up' if rep == 0 else f'rep {rep}'} {cmd} {LABELS[eng]}: "
                      f"{got:.3f} {'s' if field == 's' else 't/s'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for eng, w in workers.items():
        if "error" not in results[eng]:
            try:
                results[eng].update(w.ask("done"))
            except RuntimeError as e:
                results[eng]["error"] = str(e)


def _summarize(a, results: dict) -> None:
    """Medians of the timed repetitions (the warm-up apart) into each engine's results."""
    for r in results.values():
        if r.get("pp_runs_s"):
            cold, warm = r["pp_runs_s"][0], r["pp_runs_s"][1:]
            r.update(ttft_cold_s=cold, ttft_s=statistics.median(warm), pp_tps=a.pp / statistics.median(warm),
                     pp_best_tps=a.pp / min(warm), pp_cpu_s=statistics.median(r["pp_cpu_runs"][1:]))
        if r.get("tg_runs_tps"):
            r.update(tg_warmup_tps=r["tg_runs_tps"][0], tg_tps=statistics.median(r["tg_runs_tps"][1:]),
                     tg_best_tps=max(r["tg_runs_tps"][1:]), tg_cpu_s_per_token=statistics.median(r["tg_cpu_runs"][1:]))


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.worker:
        run_worker(a.worker, json.loads(a.spec))
        return 0
    if a.quick:
        a.pp, a.tg, a.reps = min(a.pp, 128), min(a.tg, 32), 1
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or a.reps < 1 or a.pp < 0 or a.tg < 0 or a.tg_prompt < 1:
        ap.error(f"unknown engine {bad[0]!r}" if bad else "--reps >= 1, --pp/--tg >= 0, --tg-prompt >= 1")

    from mlxllama.api import resolve

    path = resolve(a.model)
    spec = _spec(a, path)
    info = machine()
    print(f"model: {path}\nmachine: {info.get('cpu')} ({info['cpus']} cpus), load average "
          f"{' '.join(f'{x:.2f}' for x in info.get('loadavg_start', ()))}", flush=True)
    results: dict = {}
    workers: dict = {}
    with tempfile.TemporaryDirectory(prefix="mlxllama-compare-") as tmp:
        if "mlx-lm" in engines and available("mlx", spec) is None:
            try:
                from mlxllama.convert import convert_model

                spec["mlx_folder"] = str(convert_model(str(path), Path(tmp) / "mlx"))
            except Exception as e:  # reported in the table; the other engines still run
                spec["mlx_folder_error"] = f"convert failed: {e}"
        try:
            _start(engines, spec, results, workers)
            _measure(a, workers, results)
        finally:
            for w in workers.values():
                w.close()
    _summarize(a, results)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = os.getloadavg()
    print()
    print(table(results, spec))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in info.get('loadavg_end', ()))}")
    if a.json:
        spec.pop("mlx_folder", None)
        a.json.write_text(json.dumps({"machine": info, "spec": spec, "results": results}, indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
