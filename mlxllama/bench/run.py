"""The timed benchmark: pp (prompt processing) and tg (decode, batch 1..B), llama-bench style.

Tokens are random valid ids (tokenization and sampling stay out of the timed region; decode picks the argmax on the
device, as greedy generation does). Each test runs once to warm up, then `repetitions` timed times.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..api import load_path, resolve
from ..model import Model
from . import hardware, probe, roofline, submissions


def _timed(ops, fn) -> float:
    ops.synchronize()
    t0 = time.perf_counter()
    out = fn()
    ops.eval(out)
    ops.synchronize()
    return time.perf_counter() - t0


def prefill_tps(model: Model, tokens: np.ndarray, step: int = 512) -> float:
    """tokens [1, n]: every position through the blocks, the last through the head, as generation prefills."""
    ops = model.ops

    def run():
        cache = model.make_cache(1, max_len=tokens.shape[1])
        for s in range(0, tokens.shape[1] - 1, step):
            model.hidden(tokens[:, s: min(s + step, tokens.shape[1] - 1)], cache)
            ops.eval(*cache.state())
        return ops.argmax(model(tokens[:, -1:], cache, last_only=True)[:, -1, :])

    return tokens.shape[1] / _timed(ops, run)


def decode_tps(model: Model, first: np.ndarray, n_gen: int) -> float:
    """first [B, 1]: n_gen greedy steps for B sequences from an empty cache (as llama-bench's tg); t/s counts the
    tokens of all of them."""
    ops = model.ops
    batch = first.shape[0]
    cache = model.make_cache(batch, max_len=n_gen + 1)

    def run():
        y = ops.asarray(first)
        for _ in range(n_gen):
            y = ops.argmax(model(y, cache, last_only=True)[:, -1, :]).reshape(batch, 1)
            ops.async_eval(y)
        return y

    return batch * n_gen / _timed(ops, run)


def resident_weights(weights: dict, ops) -> dict:
    """What the backend really reads per token: numpy widens quantized weights to float32 at load, so its
    accounting uses float32 tensors of the same shapes (zero-copy stand-ins, nothing is allocated)."""
    if ops.name != "numpy" or getattr(ops, "weights_mode", "float32") in ("quantized", "fused"):
        return weights
    return {k: np.broadcast_to(np.float32(0), w.shape) for k, w in weights.items()}


def run_bench(*, models: list[str], n_prompt: int, n_gen: int, repetitions: int, batches: list[int], backend: str,
              chip=None, bandwidth_gbps: float | None = None,
              progress: Callable[[str, int, int], None] | None = None, seed: int = 0) -> list[dict]:
    from .. import backends

    progress = progress or (lambda label, done, total: None)
    ops = backends.get_ops(backend)
    machine = hardware.detect()
    device = "gpu" if getattr(ops, "on_gpu", False) else "cpu"
    measured = probe.probe(ops.name)
    rng = np.random.default_rng(seed)
    subs = []
    for ref in models or ["default"]:
        path = resolve(ref)
        args, weights, tokenizer = load_path(path)
        model = Model(args, weights, ops)
        kv_bytes = 4 if str(getattr(ops, "float_dtype", "float32")).endswith("float32") else 2
        acc = roofline.account_weights(args, resident_weights(weights, ops), kv_bytes=kv_bytes)
        specials = set(tokenizer.eos_ids) | ({tokenizer.bos_id} if tokenizer.bos_id is not None else set())
        ordinary = np.array([t for t in range(min(args.vocab_size, 32000)) if t not in specials])
        plan = ([("pp", 1)] if n_prompt else []) + ([("tg", b) for b in batches] if n_gen else [])
        total, done = len(plan) * (repetitions + 1), 0
        tests = []
        for kind, batch in plan:
            label = f"{path.name} {submissions.format_test_name(n_prompt if kind == 'pp' else 0, 0 if kind == 'pp' else n_gen, batch)}"
            samples = []
            for rep in range(repetitions + 1):
                if kind == "pp":
                    tps = prefill_tps(model, rng.choice(ordinary, size=(1, n_prompt)))
                else:
                    tps = decode_tps(model, rng.choice(ordinary, size=(batch, 1)), n_gen)
                if rep:  # the first run warms up
                    samples.append(tps)
                done += 1
                progress(label, done, total)
            if kind == "pp":
                tests.append(submissions.make_test(n_prompt, 0, 1, samples, acc))
            else:
                tests.append(submissions.make_test(0, n_gen, batch, samples, acc))
        subs.append(submissions.make_submission(
            machine=machine, chip=chip or hardware.chip_for_device(machine, device),
            rated_bandwidth_gbps=bandwidth_gbps, measured=measured,
            model_id=ref if ref not in (None, "default") else f"default ({path.name})",
            model_sha256=submissions.model_sha256(path), quant=roofline.quant_label(weights), accounting=acc,
            backend=ops.name, device=device, tests=tests))
        del model, weights
    return subs
