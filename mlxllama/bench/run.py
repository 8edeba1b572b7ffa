"""The timed benchmark: pp (prompt processing) and tg (decode, batch 1..B), llama-bench style.

Tokens are random valid ids, run through the engine's step (engine.py) as every generation is: no tokenizer (no
text), greedy (the argmax on the device), end-of-sequence ignored. Each test runs once to warm up, then
`repetitions` timed times. With a depth D (-d), D random tokens go into each sequence's KV cache untimed before the
timed part; a pp+tg test (-pg) times a prompt then generation as one, as llama-bench does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .. import loaders
from ..api import resolve
from ..engine import Engine, RequestParams
from ..model import Model, prefill
from ..weights import GGMLWeight, QuantizedWeight
from . import hardware, probe, roofline, submissions


def _context(model: Model, depth, more: int, step: int = 512, settings=None):
    """A one-sequence cache holding `depth` [D] token ids (untimed: the -d context), with room for `more`."""
    n_depth = 0 if depth is None else len(depth)
    cache = model.make_cache(1, max_len=n_depth + more, settings=settings)
    if n_depth:
        model.ops.eval(prefill(model, np.asarray([depth], dtype=np.int64), cache, step))
    return cache


def _through_engine(model: Model, prompts: list, max_tokens: int, depth: np.ndarray | None, step: int = 512,
                    settings=None) -> float:
    """Wall seconds of the engine's steps (engine.py: the step every generation takes) running each prompt
    [n] after its `depth` row [D] (put in its own cache untimed) until max_tokens greedy tokens each."""
    ops = model.ops
    engine = Engine(model, None, max_batch=len(prompts), max_queue=len(prompts), prefill_step=step,
                    prefill_chunk=step)
    for b, p in enumerate(prompts):
        d = None if depth is None else [int(t) for t in depth[b]]
        cache = _context(model, d, len(p) + max_tokens + 1, step, settings)
        engine.submit((d or []) + [int(t) for t in p], RequestParams(max_tokens=max_tokens, ignore_eos=True),
                      cache=cache)
    ops.synchronize()
    t0 = time.perf_counter()
    while engine.step():
        pass
    ops.synchronize()
    return time.perf_counter() - t0


def prefill_tps(model: Model, tokens: np.ndarray, step: int = 512, depth: np.ndarray | None = None,
                settings=None) -> float:
    """tokens [1, n]: every position through the blocks, the last through the head and the first token chosen,
    as generation prefills; after `depth` [1, D] already in the cache."""
    return tokens.shape[1] / _through_engine(model, [tokens[0]], 1, depth, step, settings)


def decode_tps(model: Model, first: np.ndarray, n_gen: int, depth: np.ndarray | None = None,
               settings=None) -> float:
    """first [B, 1]: B sequences in one engine batch (each its own cache, after its `depth` [B, D] row), n_gen
    greedy steps each (as llama-bench's tg: the first step runs `first`); t/s counts the tokens of all of them."""
    return first.shape[0] * n_gen / _through_engine(model, list(first), n_gen, depth, settings=settings)


def prompt_gen_tps(model: Model, tokens: np.ndarray, n_gen: int, depth: np.ndarray | None = None,
                   step: int = 512, settings=None) -> float:
    """llama-bench's pp+tg: the prompt tokens [1, n] prefilled, then n_gen greedy steps, timed as one."""
    return (tokens.shape[1] + n_gen) / _through_engine(model, [tokens[0]], n_gen + 1, depth, step, settings)


def resident_weights(weights: dict, ops) -> dict:
    """What the backend really reads per token: dense tensors in its float type, quantized ones packed or, where
    the backend widens them at load, in its float type too (zero-copy stand-ins, nothing is allocated)."""
    held = np.dtype(f"float{8 * ops.float_bytes}")
    return {k: _Held(w.shape, ops.prepared_nbytes(w)) if isinstance(w, GGMLWeight)
            else w if isinstance(w, QuantizedWeight) and ops.keeps_quantized
            else np.broadcast_to(held.type(0), w.shape) for k, w in weights.items()}


class _Held(NamedTuple):
    """A stand-in for a GGUF block tensor as the backend holds it (its layout depends on the type and backend)."""

    shape: tuple
    nbytes: int


def run_bench(*, models: list[str], n_prompt: int, n_gen: int, repetitions: int, batches: list[int], backend: str,
              chip=None, bandwidth_gbps: float | None = None,
              progress: Callable[[str, int, int], None] | None = None, seed: int = 0,
              depths: list[int] | None = None, pg: tuple[int, int] | None = None,
              cache_settings=None, parallel: str | None = None, link: str | None = None) -> list[dict] | None:
    """cache_settings (cache.CacheSettings): a quantized KV cache; the accounting counts its bytes.
    parallel (under mlx.launch): each model over the ranks (distributed.setup); rank 0 times and returns the
    submissions, which record the node count and `link`; the other ranks serve it and return None."""
    from .. import backends
    from ..cache import for_backend, kv_element_bytes

    progress = progress or (lambda label, done, total: None)
    if parallel is not None:
        backend = "mlx"
    ops = backends.get_ops(backend)
    machine = hardware.detect()
    device = "gpu" if ops.on_gpu else "cpu"
    progress("measuring memory bandwidth", 0, 0)
    measured = probe.probe(ops.name, on_gpu=ops.on_gpu)
    rng = np.random.default_rng(seed)
    subs = []
    for ref in models or ["default"]:
        progress(f"loading {ref}", 0, 0)
        path = resolve(ref)
        cluster = None
        if parallel is not None:
            from .. import distributed

            model, tokenizer = distributed.setup(path, parallel, backend=backend, quiet=True)
            if model is None:
                continue
            args, weights, acc = model.args, None, roofline.Accounting(**model.accounting)
            cluster = {"nodes": model.size, "link": link or "unknown", "parallel": parallel}
            file_bytes = None
        else:
            args, weights, tokenizer = loaders.load(path)
            model = Model(args, weights, ops)
            kv = for_backend(cache_settings, ops)
            acc = roofline.account_weights(args, resident_weights(weights, ops), kv_bytes=kv_element_bytes(
                ops.float_bytes, kv.kv_bits, kv.kv_group_size, kv.kv_dtype))
            file_bytes = sum(int(w.nbytes) for w in weights.values())  # as stored, before a backend widens them
        specials = set(tokenizer.eos_ids) | ({tokenizer.bos_id} if tokenizer.bos_id is not None else set())
        ordinary = np.array([t for t in range(min(args.vocab_size, 32000)) if t not in specials])
        plan = []  # (n_prompt, n_gen, batch, depth) as llama-bench orders them
        for d in depths or [0]:
            plan += ([(n_prompt, 0, 1, d)] if n_prompt else []) + ([(0, n_gen, b, d) for b in batches] if n_gen else [])
            plan += [(pg[0], pg[1], 1, d)] if pg else []
        total, done = len(plan) * (repetitions + 1), 0
        tests = []
        for p, g, batch, d in plan:
            label = f"{path.name} {submissions.format_test_name(p, g, batch, d)}"
            samples = []
            for rep in range(repetitions + 1):
                depth = rng.choice(ordinary, size=(batch, d)) if d else None
                if p and g:
                    tps = prompt_gen_tps(model, rng.choice(ordinary, size=(1, p)), g, depth,
                                         settings=cache_settings)
                elif p:
                    tps = prefill_tps(model, rng.choice(ordinary, size=(1, p)), depth=depth, settings=cache_settings)
                else:
                    tps = decode_tps(model, rng.choice(ordinary, size=(batch, 1)), g, depth, settings=cache_settings)
                if rep:  # the first run warms up
                    samples.append(tps)
                done += 1
                progress(label, done, total)
            tests.append(submissions.make_test(p, g, batch, samples, acc, n_depth=d))
        subs.append(submissions.make_submission(
            machine=machine,
            chip=hardware.chip_for_claim(machine, chip) or hardware.chip_for_device(machine, device),
            rated_bandwidth_gbps=bandwidth_gbps, measured=measured,
            model_id=f"default ({path.name})" if ref in (None, "default") else (path.name if Path(ref).exists()
                                                                                else ref),
            model_sha256=submissions.model_sha256(path),
            quant=roofline.quant_label(weights) if weights is not None else model.quant, accounting=acc,
            backend=ops.name, device=device, tests=tests, weight_file_bytes=file_bytes, cluster=cluster))
        if cluster is not None:
            model.close()
        del model, weights
    return subs if parallel is None or subs else None
