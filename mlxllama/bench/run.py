"""The timed benchmark: pp (prompt processing) and tg (decode, batch 1..B), llama-bench style.

Tokens are random valid ids (tokenization and sampling stay out of the timed region; decode picks the argmax on the
device, as greedy generation does). Each test runs once to warm up, then `repetitions` timed times.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .. import loaders
from ..api import resolve
from ..generate import prefill
from ..model import Model
from ..weights import QuantizedWeight
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
        return ops.argmax(prefill(model, tokens, model.make_cache(1, max_len=tokens.shape[1]), step)[:, -1, :])

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
    """What the backend really reads per token: dense tensors in its float type, quantized ones packed or, where
    the backend widens them at load, in its float type too (zero-copy stand-ins, nothing is allocated)."""
    held = np.dtype(f"float{8 * ops.float_bytes}")
    return {k: w if isinstance(w, QuantizedWeight) and ops.keeps_quantized else np.broadcast_to(held.type(0), w.shape)
            for k, w in weights.items()}


def run_bench(*, models: list[str], n_prompt: int, n_gen: int, repetitions: int, batches: list[int], backend: str,
              chip=None, bandwidth_gbps: float | None = None,
              progress: Callable[[str, int, int], None] | None = None, seed: int = 0,
              parallel: str | None = None, link: str | None = None) -> list[dict] | None:
    """parallel (under mlx.launch): each model over the ranks (distributed.setup); rank 0 times and returns the
    submissions, which record the node count and `link`; the other ranks serve it and return None."""
    from .. import backends

    progress = progress or (lambda label, done, total: None)
    if parallel is not None:
        backend = "mlx"
    ops = backends.get_ops(backend)
    machine = hardware.detect()
    device = "gpu" if ops.on_gpu else "cpu"
    measured = probe.probe(ops.name)
    rng = np.random.default_rng(seed)
    subs = []
    for ref in models or ["default"]:
        path = resolve(ref)
        cluster = None
        if parallel is not None:
            from .. import distributed

            model, tokenizer = distributed.setup(path, parallel, backend=backend, quiet=True)
            if model is None:
                continue
            args, weights, acc = model.args, None, roofline.Accounting(**model.accounting)
            cluster = {"nodes": model.size, "link": link or "unknown", "parallel": parallel}
        else:
            args, weights, tokenizer = loaders.load(path)
            model = Model(args, weights, ops)
            acc = roofline.account_weights(args, resident_weights(weights, ops), kv_bytes=ops.kv_bytes)
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
            model_sha256=submissions.model_sha256(path),
            quant=roofline.quant_label(weights) if weights is not None else model.quant, accounting=acc,
            backend=ops.name, device=device, tests=tests, cluster=cluster))
        if cluster is not None:
            model.close()
        del model, weights
    return subs if parallel is None or subs else None
