"""GPU decode at the memory roofline: mlxllama's MLX backend against mlx-lm on the same random weights, one run.

What one run does, all on MLX's default device (the GPU under mlx[cuda13] or Metal, else the CPU):
  1. measures copy (read + write) and read bandwidth (mlxllama.bench.probe.probe_mlx; 1 GiB buffer on a GPU);
  2. for each format (q4 = 4-bit group 64, q8 = 8-bit group 64, f16) generates random weights of the chosen shape
     on the device (mx.random, mx.quantize; embedding and head are quantized too, as mlx-lm's convert does),
     hands them to mlxllama's Model as numpy arrays / QuantizedWeight, and loads the very same arrays into
     mlx-lm's llama Model (nn.quantize + load_weights);
  3. checks that the two engines agree (greedy tokens and first-step logits) and times, alternating the engines
     rep by rep, one warm-up then the median of --reps:
       pp<N>        a fresh N-token prompt: N-1 tokens through the blocks (cache evaluated), the last through the
                    head, argmax: as mlx-lm's generate_step prefills
       tg<N>        N greedy decode steps at batch 1 after a --prompt-token prompt (the prompt is not timed)
       tg<n> b<B>   n greedy steps for B sequences at once (tok/s counts all B), for B in --batches
     The decode loop is the same plain loop for both engines (mlx-lm's generate_step is not used): each step is
     model(y, cache) -> last position's logits -> mx.argmax on the device -> mx.async_eval(y); no host sync
     until the last token. mlx-lm runs with its own KV cache (mlx_lm.models.cache.make_prompt_cache).
  4. prints a table and writes JSON (--json PATH, rewritten after every format so a cut-off run keeps its part).

Bytes per token are exact from the tensors as resident (mlxllama.bench.roofline.account_weights): every weight
incl. scales and biases, one embedding row, the full head, and the KV cache at the test's mean context (for batch
B, the step's bytes over B; for pp, one pass over the weights plus the prompt's KV, over N). GB/s = bytes per token
* tok/s; "of copy" divides by the measured copy bandwidth. Compute runs in MLXOps' float dtype (float16 on a GPU,
float32 on the CPU, where MLX emulates float16 slowly); mlx-lm's parameters are cast to the same dtype.

On a machine with an NVIDIA GPU:
    pip install -e ".[cuda]" gguf mlx-lm==0.32.2 && python benchmarks/gpu_decode.py --json gpu.json
Expect a few minutes for all three formats at the 7B shape; `--formats q4` (or --quick) shortens it. Without
mlx-lm the script times mlxllama alone and says so; without transformers (which mlx_lm/__init__ imports) it loads
mlx_lm.models.* alone (the model code needs only mlx) and says so in its header.

Smoke run on the CPU:  python benchmarks/gpu_decode.py --shape tiny --quick --device cpu
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    import mlx.core as mx
    import mlx.nn as nn
except ImportError:
    sys.exit("gpu_decode.py needs MLX: pip install -e '.[cuda]' on Linux with an NVIDIA GPU (mlx on macOS)")
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxllama.backends.mlx_ops import MLXOps  # noqa: E402
from mlxllama.bench import roofline  # noqa: E402
from mlxllama.bench.probe import probe_mlx  # noqa: E402
from mlxllama.bench.timing import timed  # noqa: E402
from mlxllama.config import ModelArgs  # noqa: E402
from mlxllama.model import Model  # noqa: E402
from mlxllama.weights import QuantizedWeight, expected_shapes  # noqa: E402

SHAPES = {
    "7b": ModelArgs(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096),
    "tiny": ModelArgs(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096),
}
FORMATS = {"q4": (4, 64), "q8": (8, 64), "f16": None}  # (bits, group_size), None: float16 as stored
ENGINES = ("mlxllama", "mlx-lm")
LOOP = ("plain loop, same for both engines: model(y, cache) -> argmax on device -> mx.async_eval, "
        "no per-token host sync; mlx-lm with make_prompt_cache (generate_step not used)")


# -- mlx-lm ------------------------------------------------------------------------------------------------------

def import_mlx_lm():
    """(llama module, cache module, version, how it was imported), or None when mlx-lm is not installed.

    mlx_lm/__init__ imports transformers; where that is missing the package is registered without running its
    __init__ so that mlx_lm.models.* (plain mlx code) still import.
    """
    if importlib.util.find_spec("mlx_lm") is None:
        return None
    how = "import mlx_lm"
    try:
        importlib.import_module("mlx_lm")
    except ImportError:
        spec = importlib.util.find_spec("mlx_lm")
        if spec is None:
            raise
        sys.modules["mlx_lm"] = importlib.util.module_from_spec(spec)
        how = "mlx_lm.models only (mlx_lm/__init__ needs transformers, absent here)"
    llama = importlib.import_module("mlx_lm.models.llama")
    cache = importlib.import_module("mlx_lm.models.cache")
    try:
        from importlib import metadata
        version = metadata.version("mlx-lm")
    except Exception:
        version = "unknown"
    return llama, cache, version, how


# -- weights -----------------------------------------------------------------------------------------------------

def make_weights(args: ModelArgs, fmt: str, seed: int = 0) -> dict:
    """Random weights in mlxllama's layout, generated tensor by tensor on the device and handed over as numpy.

    Tensor i draws from key seed*1_000_003 + i, so every format quantizes the same float16 values. Linears
    (embedding and head included) are N(0, 1/in_features); norms are 1 + N(0, 0.05^2).
    """
    quant = FORMATS[fmt]
    out = {}
    for i, (name, shape) in enumerate(expected_shapes(args).items()):
        key = mx.random.key(seed * 1_000_003 + i)
        if len(shape) == 1:
            w = (1.0 + 0.05 * mx.random.normal(shape, key=key)).astype(mx.float16)
            out[name] = np.array(w)
        else:
            w = (mx.random.normal(shape, key=key) * shape[1] ** -0.5).astype(mx.float16)
            if quant is None:
                out[name] = np.array(w)
            else:
                bits, group = quant
                q, s, b = mx.quantize(w, group_size=group, bits=bits)
                out[name] = QuantizedWeight(np.array(q), np.array(s), np.array(b), group, bits)
                del q, s, b
        del w
    mx.clear_cache()
    return out


def resident(weights: dict, float_dtype) -> dict:
    """The weights as the engines hold them: float tensors (scales and biases too) in the compute dtype.

    Zero-copy stand-ins where that dtype is wider than the stored one, for byte accounting only.
    """
    size = np.dtype(np.float32 if float_dtype == mx.float32 else np.float16).itemsize

    def widen(a):
        return a if a.dtype.itemsize >= size else np.broadcast_to(np.zeros((), f"f{size}"), a.shape)

    return {k: QuantizedWeight(w.weight, widen(w.scales), widen(w.biases), w.group_size, w.bits)
            if isinstance(w, QuantizedWeight) else widen(w) for k, w in weights.items()}


# -- engines -----------------------------------------------------------------------------------------------------

@dataclass
class Engine:
    name: str
    model: object         # kept so that it can be freed before the next format
    make_cache: Callable  # (batch, max_len) -> cache
    fill: Callable        # (tokens [B, L], cache) -> arrays to evaluate so that the cache holds the L positions
    logits: Callable      # (tokens [B, L], cache) -> logits [B, vocab] of the last position


def mlxllama_engine(args: ModelArgs, weights: dict, ops) -> Engine:
    model = Model(args, weights, ops)

    def fill(tokens, cache):
        model.hidden(tokens, cache)
        return cache.state()

    return Engine("mlxllama", model, lambda b, n: model.make_cache(b, n), fill,
                  lambda tokens, cache: model(tokens, cache, last_only=True)[:, -1, :])


def mlx_lm_engine(args: ModelArgs, weights: dict, float_dtype, mlx_lm) -> Engine:
    llama, cache_mod, _, _ = mlx_lm
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        intermediate_size=args.intermediate_size, num_attention_heads=args.num_attention_heads,
        rms_norm_eps=args.rms_norm_eps, vocab_size=args.vocab_size, head_dim=args.head_dim,
        max_position_embeddings=args.max_position_embeddings, num_key_value_heads=args.num_key_value_heads,
        rope_theta=args.rope_theta, tie_word_embeddings=args.tie_word_embeddings))
    quants = {(w.bits, w.group_size) for w in weights.values() if isinstance(w, QuantizedWeight)}
    if quants:
        (bits, group), = quants
        nn.quantize(model, group_size=group, bits=bits)  # lazy: the random init is never evaluated
    pairs = []
    for name, w in weights.items():
        if isinstance(w, QuantizedWeight):
            pairs += [(f"{name}.weight", mx.array(w.weight)), (f"{name}.scales", mx.array(w.scales)),
                      (f"{name}.biases", mx.array(w.biases))]
        else:
            pairs.append((f"{name}.weight", mx.array(w)))
    model.load_weights(pairs, strict=True)
    del pairs
    model.set_dtype(float_dtype)
    mx.eval(model.parameters())

    def fill(tokens, cache):
        model.model(tokens, cache)
        return [c.state for c in cache]

    return Engine("mlx-lm", model, lambda b, n: cache_mod.make_prompt_cache(model), fill,
                  lambda tokens, cache: model(tokens, cache)[:, -1, :])


# -- timed runs --------------------------------------------------------------------------------------------------

def run_prefill(engine: Engine, tokens: mx.array) -> float:
    """Seconds for a fresh prompt to its first greedy token."""
    cache = engine.make_cache(tokens.shape[0], tokens.shape[1])

    def run():
        mx.eval(engine.fill(tokens[:, :-1], cache))
        mx.eval(mx.argmax(engine.logits(tokens[:, -1:], cache), axis=-1))

    return timed(run, mx.synchronize)[0]


def run_decode(engine: Engine, prompt: mx.array, first: mx.array, n_gen: int) -> float:
    """Seconds for n_gen greedy steps of all B sequences after the (untimed) prompt [B, P]."""
    batch = first.shape[0]
    cache = engine.make_cache(batch, prompt.shape[1] + n_gen + 1)
    mx.eval(engine.fill(prompt, cache))

    def run():
        y = first
        for _ in range(n_gen):
            y = mx.argmax(engine.logits(y, cache), axis=-1).reshape(batch, 1)
            mx.async_eval(y)
        mx.eval(y)

    return timed(run, mx.synchronize)[0]


def greedy(engine: Engine, prompt: mx.array, n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens after prompt [1, P] and the first step's logits (float32 numpy)."""
    cache = engine.make_cache(1, prompt.shape[1] + n)
    logits = engine.logits(prompt, cache)
    first = np.array(logits.astype(mx.float32))[0]
    tokens = []
    for _ in range(n):
        y = mx.argmax(logits, axis=-1).reshape(1, 1)
        tokens.append(int(y.item()))
        logits = engine.logits(y, cache)
    return tokens, first


def agreement(engines: list[Engine], prompt: mx.array, n: int) -> dict:
    (ta, la), (tb, lb) = (greedy(e, prompt, n) for e in engines)
    same = next((i for i, (a, b) in enumerate(zip(ta, tb)) if a != b), n)
    return {"tokens": {engines[0].name: ta, engines[1].name: tb}, "same_prefix": same, "n": n,
            "max_abs_logit_diff": float(np.max(np.abs(la - lb))), "logit_std": float(np.std(lb))}


def measure(engines: list[Engine], run: Callable[[Engine], float], reps: int) -> dict[str, list[float]]:
    """One warm-up, then reps timed runs per engine, alternating engines run by run."""
    seconds = {e.name: [] for e in engines}
    for rep in range(reps + 1):
        for e in engines:
            t = run(e)
            if rep:
                seconds[e.name].append(t)
    return seconds


# -- one format --------------------------------------------------------------------------------------------------

def bench_format(fmt: str, args: ModelArgs, opt, ops, mlx_lm, probe, log) -> dict:
    t0 = time.perf_counter()
    weights = make_weights(args, fmt, opt.seed)
    t_gen = time.perf_counter() - t0
    float_dtype = ops.float_dtype
    kv_bytes = 4 if float_dtype == mx.float32 else 2
    acc = roofline.account_weights(args, resident(weights, float_dtype), kv_bytes=kv_bytes)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    engines = [mlxllama_engine(args, weights, ops)]
    if mlx_lm is not None:
        engines.append(mlx_lm_engine(args, weights, float_dtype, mlx_lm))
    del weights
    gc.collect()
    mx.clear_cache()
    t_build = time.perf_counter() - t0
    log(f"[{fmt}] weights generated in {t_gen:.1f} s, both engines built in {t_build:.1f} s, "
        f"{acc.weight_bytes / 1e9:.3f} GB resident per engine")

    rng = np.random.default_rng(opt.seed)

    def ids(*shape):
        return mx.array(rng.integers(0, args.vocab_size, size=shape, dtype=np.int32))

    agree = agreement(engines, ids(1, opt.prompt), opt.check_tokens) if len(engines) == 2 else None
    if agree is not None:
        log(f"[{fmt}] greedy agreement: {agree['same_prefix']}/{agree['n']} tokens, first-step logits differ by "
            f"<= {agree['max_abs_logit_diff']:.3g} (logit std {agree['logit_std']:.3g})")

    tests = [("pp", opt.pp, 1)] + [("tg", opt.tg, 1)] + [("tgb", opt.batch_gen, b) for b in opt.batches]
    rows = []
    for kind, n, batch in tests:
        if kind == "pp":
            name = f"pp{n}"
            tokens = ids(1, n)
            secs = measure(engines, lambda e: run_prefill(e, tokens), opt.reps)
            bytes_per_token = (acc.weight_bytes_per_token + acc.kv_bytes(n)) / n
            flops_per_token = acc.flops_per_token(roofline.mean_context(n, 0))
        else:
            name = f"tg{n}" if kind == "tg" else f"tg{n} b{batch}"
            prompt, first = ids(batch, opt.prompt), ids(batch, 1)
            secs = measure(engines, lambda e: run_decode(e, prompt, first, n), opt.reps)
            ctx = roofline.mean_context(opt.prompt, n)
            bytes_per_token = acc.bytes_per_step(ctx, batch) / batch
            flops_per_token = acc.flops_per_token(ctx)
        tokens_counted = n if kind == "pp" else n * batch
        by_engine = {}
        for e in engines:
            samples = [tokens_counted / s for s in secs[e.name]]
            tps = statistics.median(samples)
            gbps = roofline.achieved_gbps(bytes_per_token, tps)
            by_engine[e.name] = {
                "format": fmt, "engine": e.name, "test": name, "kind": "pp" if kind == "pp" else "tg",
                "batch": batch, "n_prompt": n if kind == "pp" else opt.prompt, "n_gen": 0 if kind == "pp" else n,
                "tok_s": tps, "samples_tok_s": samples, "bytes_per_token": bytes_per_token, "gbps": gbps,
                "frac_copy": gbps / probe.copy_gbps, "frac_read": gbps / probe.read_gbps,
                "tflops": roofline.achieved_tflops(flops_per_token, tps)}
        for r in by_engine.values():
            r["ratio_to_mlx_lm"] = r["tok_s"] / by_engine["mlx-lm"]["tok_s"] if "mlx-lm" in by_engine else None
            rows.append(r)
        log(f"[{fmt}] {name}: " + ", ".join(f"{r['engine']} {r['tok_s']:.1f} tok/s" for r in by_engine.values()))
    peak = int(mx.get_peak_memory())
    return {"format": fmt, "accounting": acc.to_dict(), "generate_s": t_gen, "build_s": t_build,
            "peak_memory_bytes": peak, "agreement": agree, "rows": rows}


# -- output ------------------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ("format", "engine", "test", "tok/s", "MB/token", "GB/s", "of copy", "vs mlx-lm")
    body = [(r["format"], r["engine"], r["test"], f"{r['tok_s']:.1f}", f"{r['bytes_per_token'] / 1e6:.3f}",
             f"{r['gbps']:.1f}", f"{100 * r['frac_copy']:.1f}%",
             f"{r['ratio_to_mlx_lm']:.2f}x" if r["ratio_to_mlx_lm"] is not None else "-") for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    left = 3  # text columns, then numbers

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def parse_list(text: str, allowed=None, kind=str) -> list:
    items = [kind(x) for x in text.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    if not items:
        raise SystemExit("empty list")
    return items


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--formats", default="q4,q8,f16", help="comma list of q4, q8, f16")
    p.add_argument("--batches", default="1,4,16,64", help="decode batch sizes")
    p.add_argument("--quick", action="store_true", help="fewer reps and tokens: a fast check")
    p.add_argument("--reps", type=int, help="timed runs per test after one warm-up (default 3, quick 1)")
    p.add_argument("--pp", type=int, help="prompt length of the pp test (default 512, quick 64)")
    p.add_argument("--tg", type=int, help="decode steps of the tg test (default 128, quick 16)")
    p.add_argument("--batch-gen", type=int, help="decode steps per batched test (default 32, quick 8)")
    p.add_argument("--prompt", type=int, default=16, help="untimed prompt before decoding")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared between engines")
    p.add_argument("--device", choices=("default", "cpu", "gpu"), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    opt = p.parse_args(argv)
    quick = opt.quick
    opt.reps = opt.reps if opt.reps is not None else (1 if quick else 3)
    opt.pp = opt.pp or (64 if quick else 512)
    opt.tg = opt.tg or (16 if quick else 128)
    opt.batch_gen = opt.batch_gen or (8 if quick else 32)
    formats = parse_list(opt.formats, FORMATS)
    opt.batches = parse_list(opt.batches, kind=int)
    if min(opt.batches) < 1 or opt.pp < 2 or opt.tg < 1 or opt.batch_gen < 1 or opt.reps < 1 or opt.prompt < 1:
        raise SystemExit("batches, --tg, --batch-gen, --reps and --prompt must be >= 1, --pp >= 2")
    if opt.device != "default":
        mx.set_default_device(mx.cpu if opt.device == "cpu" else mx.gpu)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    args = SHAPES[opt.shape].validate(opt.shape)
    mlx_lm = import_mlx_lm()
    if mlx_lm is None:
        print("mlx-lm: skipped (not installed; pip install mlx-lm): timing mlxllama alone", flush=True)
    ops = MLXOps()
    on_gpu = mx.default_device() == mx.gpu
    probe = probe_mlx(nbytes=(1 << 30) if on_gpu else ((16 << 20) if quick else (64 << 20)),
                      runs=3 if quick else 10, max_seconds=0.5 if quick else 5.0)
    header = {
        "device": str(mx.default_device()), "backend_device": ops.device(), "platform": platform.platform(),
        "python": platform.python_version(), "mlx": mx.__version__,
        "mlx_lm": mlx_lm[2] if mlx_lm else None, "mlx_lm_import": mlx_lm[3] if mlx_lm else "not installed",
        "shape": opt.shape, "args": args.to_hf_dict(), "compute_dtype": str(ops.float_dtype).split(".")[-1],
        "loop": LOOP, "reps": opt.reps, "warmup": 1, "pp": opt.pp, "tg": opt.tg, "batch_gen": opt.batch_gen,
        "prompt": opt.prompt, "batches": opt.batches, "seed": opt.seed,
        "probe": probe.to_dict(),
    }
    print(f"device {header['device']} ({header['backend_device']}), mlx {mx.__version__}, "
          f"mlx-lm {header['mlx_lm'] or '-'} [{header['mlx_lm_import']}], compute {header['compute_dtype']}, "
          f"shape {opt.shape}")
    print(f"measured bandwidth: copy {probe.copy_gbps:.1f} GB/s, read {probe.read_gbps:.1f} GB/s "
          f"({probe.nbytes >> 20} MiB buffer)")
    print(f"loop: {LOOP}; median of {opt.reps} after 1 warm-up, engines alternating", flush=True)

    result = {**header, "formats": []}
    if opt.json:
        opt.json.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        result["formats"].append(bench_format(fmt, args, opt, ops, mlx_lm, probe, log))
        gc.collect()  # both models of this format are unreachable now: give their memory back
        mx.clear_cache()
        if opt.json:
            opt.json.write_text(json.dumps(result, indent=1))
    rows = [r for f in result["formats"] for r in f["rows"]]
    result["rows"] = rows
    print(table(rows))
    for f in result["formats"]:
        a = f["agreement"]
        agree = (f"greedy tokens agree {a['same_prefix']}/{a['n']}, first-step logits max |diff| "
                 f"{a['max_abs_logit_diff']:.3g}" if a else "no peer to agree with")
        print(f"{f['format']}: {agree}; weights {f['accounting']['weight_bytes'] / 1e9:.3f} GB; "
              f"peak device memory {f['peak_memory_bytes'] / 1e9:.2f} GB")
    if opt.json:
        opt.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {opt.json}")
    return result


if __name__ == "__main__":
    main()
