"""The numpy backend's compiled decode step (backends/numpy_step.py) gives the op-by-op fused path's logits, leaves
the cache as that path does, and steps aside where it does not apply."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from conftest import TINY, random_weights
from mlxllama.backends import numpy_ops, numpy_rows
from mlxllama.backends.numpy_rows import MAX_ROWS
from mlxllama.backends.numpy_threads import PREFETCH
from mlxllama.backends.numpy_threads import ThreadChoice
from mlxllama.cache import CacheSettings
from mlxllama.config import from_hf_dict
from mlxllama.generate import generate_step
from mlxllama.model import Model
from mlxllama.quant import quantize_weights

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")

TOKENS = np.random.default_rng(5).integers(0, 400, (1, 40))
SPLIT = 30  # prompt rows; then one token at a time


def tiny_model(bits=4, group=32, tie=False, qkv_bias=False, o_bias=False, qk_norm=False, window=None, kv=2,
               threads=2, head_dim=16):
    cfg = dict(TINY, tie_word_embeddings=tie, num_key_value_heads=kv, intermediate_size=192, head_dim=head_dim,
               max_position_embeddings=1024)
    args = from_hf_dict(dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu"))
    args = dataclasses.replace(args, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm, sliding_window=window)
    w = {k.removesuffix(".weight"): v for k, v in random_weights(cfg, 1).items()}
    rng = np.random.default_rng(2)
    H, KV, D, Dh = args.num_attention_heads, args.num_key_value_heads, args.hidden_size, args.head_dim
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        if qkv_bias:
            for n, rows in (("q", H * Dh), ("k", KV * Dh), ("v", KV * Dh)):
                w[p + f"{n}_proj.bias"] = 0.3 * rng.standard_normal(rows).astype(np.float32)
        if o_bias:
            w[p + "o_proj.bias"] = 0.3 * rng.standard_normal(D).astype(np.float32)
        if qk_norm:
            w[p + "q_norm"] = (1 + 0.2 * rng.standard_normal(Dh)).astype(np.float32)
            w[p + "k_norm"] = (1 + 0.2 * rng.standard_normal(Dh)).astype(np.float32)
    w, args = quantize_weights(w, args, group_size=group, bits=bits, dtype=np.float16)
    return Model(args, w, numpy_ops.NumpyOps("fused", threads=threads))


def step_logits(model, settings=None, tokens=TOKENS, split=SPLIT):
    """Prefill tokens[:, :split], then one token at a time: the decode rows' logits and the cache."""
    cache = model.make_cache(1, settings=settings)
    model(tokens[:, :split], cache)
    rows = [model(tokens[:, i: i + 1], cache) for i in range(split, tokens.shape[1])]
    return np.concatenate(rows, axis=1), cache


def with_and_without(model, settings=None, tokens=TOKENS, split=SPLIT):
    program = model._decode
    got, got_cache = step_logits(model, settings, tokens, split)
    model._decode = None
    try:
        want, want_cache = step_logits(model, settings, tokens, split)
    finally:
        model._decode = program
    return got, want, got_cache, want_cache


def force_threads(model, n: int) -> None:
    model.ops._choice = ThreadChoice(((n, PREFETCH),))


def assert_close(got, want, tol=2e-4):
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def assert_kv_close(a, b):
    """Cache contents of the program's steps and op by op: float32 to 2e-4 of the largest; a float16 cache (the
    numpy backend's default) one float16 step apart at most, where the float32 values fell either side of one."""
    assert a.dtype == b.dtype
    tol = 1e-3 if a.dtype == np.float16 else 2e-4
    a, b = a.astype(np.float32), b.astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (8, 64)])
@pytest.mark.parametrize("tie", [False, True])
def test_program_matches_op_by_op(bits, group, tie, threads):
    model = tiny_model(bits, group, tie)
    assert model._decode is not None
    force_threads(model, threads)
    got, want, got_cache, want_cache = with_and_without(model)
    assert_close(got, want)
    assert got_cache.offset == want_cache.offset == TOKENS.shape[1]
    for layer in range(len(model.layers)):
        for a, b in ((got_cache.keys[layer][0], want_cache.keys[layer][0]),
                     (got_cache.values[layer][0], want_cache.values[layer][0])):
            n = got_cache.offset
            assert_kv_close(a[:, :, :n], b[:, :, :n])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("switches", [dict(qkv_bias=True), dict(qkv_bias=True, o_bias=True),
                                      dict(qk_norm=True), dict(window=8), dict(kv=4), dict(kv=1),
                                      dict(head_dim=32, qk_norm=True), dict(head_dim=64),
                                      dict(head_dim=96, window=8)])
def test_program_matches_op_by_op_per_family_switch(switches, threads):
    model = tiny_model(**switches)
    assert model._decode is not None
    force_threads(model, threads)
    got, want, _, _ = with_and_without(model)
    assert_close(got, want)


def test_program_on_the_generic_kernel_path(monkeypatch):
    monkeypatch.setenv("MLXLLAMA_KERNEL_ISA", "generic")
    model = tiny_model(4, 32, qkv_bias=True)
    assert model.layers[0].qkv.isa == "generic"
    for threads in (1, 2):
        force_threads(model, threads)
        got, want, _, _ = with_and_without(model)
        assert_close(got, want)


def test_program_keeps_greedy_tokens_and_grows_the_cache():
    """A growing cache (chat, server) reallocates its buffers every 256 positions: the step that needs room goes
    op by op, the program takes the next ones on the new buffers."""
    model = tiny_model(4, 32)
    ids = TOKENS[0, :12].tolist()
    program = model._decode
    got = list(generate_step(model, ids, 16))
    model._decode = None
    want = list(generate_step(model, ids, 16))
    model._decode = program
    assert got == want
    tokens = np.random.default_rng(6).integers(0, 400, (1, 262))
    force_threads(model, 2)
    got, want, got_cache, _ = with_and_without(model, tokens=tokens, split=250)
    assert got_cache.capacity == 512
    assert_close(got, want)


@pytest.mark.parametrize("settings", [CacheSettings(kv_bits=8, kv_group_size=32), CacheSettings(max_kv_size=20)])
def test_other_caches_step_op_by_op(settings):
    model = tiny_model(4, 32, head_dim=32)
    got, want, got_cache, _ = with_and_without(model, settings)
    np.testing.assert_array_equal(got, want)
    assert got_cache.offset == TOKENS.shape[1]


def test_no_program_where_it_does_not_apply(monkeypatch):
    cfg = dict(TINY)
    args = from_hf_dict(dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu"))
    weights = {k.removesuffix(".weight"): v for k, v in random_weights(cfg, 0).items()}
    qweights, qargs = quantize_weights(weights, args, group_size=32, bits=4, dtype=np.float16)
    assert Model(qargs, dict(qweights), numpy_ops.NumpyOps("float32"))._decode is None
    assert Model(qargs, dict(qweights), numpy_ops.NumpyOps("quantized"))._decode is None
    assert Model(args, dict(weights), numpy_ops.NumpyOps("fused"))._decode is None  # float weights
    monkeypatch.setenv("MLXLLAMA_DECODE_PROGRAM", "0")
    assert Model(qargs, dict(qweights), numpy_ops.NumpyOps("fused"))._decode is None


class LateHelpers:
    """An executor whose helpers start `delay` seconds late (None: never)."""

    def __init__(self, delay):
        from concurrent.futures import ThreadPoolExecutor

        self.delay, self.pool = delay, ThreadPoolExecutor(1)

    def submit(self, fn, *args):
        from concurrent.futures import Future
        import time

        if self.delay is None:
            f = Future()
            f.set_result(None)
            return f
        return self.pool.submit(lambda: (time.sleep(self.delay), fn(*args)))


@pytest.mark.parametrize("delay", [None, 0.0, 0.02])
def test_two_thread_step_with_a_late_or_absent_helper(delay):
    """Thread 0 never waits for a helper that has claimed nothing: it does the whole step alone, and a helper
    that starts afterwards finds every unit done and changes nothing."""
    model = tiny_model(4, 32, qkv_bias=True)
    force_threads(model, 2)
    model._decode._pool = LateHelpers(delay)
    got, want, _, _ = with_and_without(model)
    assert_close(got, want)


def test_concurrent_steps_on_one_model():
    """Two threads stepping their own sequences on one model: one takes the program, the other (while it is busy)
    steps op by op; both give their sequential logits."""
    import threading

    model = tiny_model(4, 32)
    want = [step_logits(model, tokens=t)[0] for t in (TOKENS, TOKENS[:, ::-1].copy())]
    got = [None, None]

    def run(i, t):
        got[i] = step_logits(model, tokens=t)[0]

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate((TOKENS, TOKENS[:, ::-1].copy()))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert_close(g, w)


# -- multi-row steps (numpy_rows): forward_batch and [1, L] calls in one compiled call --------------------------------

PROMPTS = [np.random.default_rng(7).integers(0, 400, n) for n in (5, 17, 11)]
MORE = np.random.default_rng(8).integers(0, 400, MAX_ROWS + 8)


def batch_steps(model, settings=None):
    """Three sequences prefilled to different offsets, then forward_batch steps mixing decode tokens, speculative rows
    and prompt pieces (rows 0), an all-prompt step and a lone sequence's: each step's logits and the caches."""
    caches = [model.make_cache(1, settings=settings) for _ in PROMPTS]
    for p, c in zip(PROMPTS, caches):
        model(p[None, :], c)
    steps = [((4, 1, 7), (4, 1, 0)), ((1, 9, 3), (1, 9, 1)), ((2, 2, 0), (0, 0, 0)), ((0, 0, 6), (0, 0, 6))]
    out, fed = [], 0
    for lens, rows in steps:
        picked = [(MORE[fed: fed + n], c, r) for n, c, r in zip(lens, caches, rows) if n]
        fed += sum(lens)
        out.append(model.forward_batch([p[0] for p in picked], [p[1] for p in picked], [p[2] for p in picked]))
    return out, caches


def assert_same_caches(got, want):
    for g, w in zip(got, want):
        assert g.offset == w.offset
        n = g.offset
        for layer in range(len(g.keys)):
            for a, b in ((g.keys[layer][0], w.keys[layer][0]), (g.values[layer][0], w.values[layer][0])):
                assert_kv_close(a[:, :, :n], b[:, :, :n])


def batch_with_and_without(model, settings=None):
    program = model._decode
    got, got_caches = batch_steps(model, settings)
    model._decode = None
    try:
        want, want_caches = batch_steps(model, settings)
    finally:
        model._decode = program
    return got, want, got_caches, want_caches


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("switches", [dict(), dict(bits=8, tie=True), dict(window=8),
                                      dict(qkv_bias=True, o_bias=True, qk_norm=True, kv=1), dict(kv=4, group=64),
                                      dict(head_dim=64), dict(head_dim=32, window=8)])
def test_batch_steps_match_op_by_op(switches, threads):
    model = tiny_model(threads=threads, **switches)
    force_threads(model, threads)
    got, want, got_caches, want_caches = batch_with_and_without(model)
    assert model._decode.rows.bufs is not None  # the program took steps
    assert got[2] is None and want[2] is None
    for g, w in zip(got, want):
        if w is not None:
            assert g.shape == w.shape
            assert_close(g, w)
    assert_same_caches(got_caches, want_caches)


def test_batch_step_is_one_program_call():
    model = tiny_model()
    caches = [model.make_cache(1) for _ in PROMPTS]
    for p, c in zip(PROMPTS, caches):
        model(p[None, :], c)
    chunks = [MORE[:3], MORE[3:4], MORE[4:9]]
    logits = model._decode.rows(chunks, caches, [3, 1, 0])
    assert logits.shape == (4, 400)
    assert [c.offset for c in caches] == [8, 18, 16]
    assert model._decode.rows(chunks[:2], caches[:2], [0, 0]).shape == (0, 400)
    assert model._decode.rows([MORE[:MAX_ROWS + 1]], caches[:1], [1]) is None  # a longer prompt chunk: op by op
    n = numpy_rows.MAX_LOGIT_ROWS + 1
    assert model._decode.rows([MORE[:n]], caches[:1], [n]) is None  # every row's logits: op by op
    assert caches[0].offset == 11


@pytest.mark.parametrize("threads", [1, 2])
def test_call_of_several_rows_matches_op_by_op(threads):
    """The lone sequence's speculative verification (model(tokens, cache)) takes the program, last_only too; a chunk
    that needs the cache to grow steps op by op."""
    model = tiny_model(threads=threads, window=12)
    force_threads(model, threads)

    def run():
        cache = model.make_cache(1)
        model(TOKENS[:, :20], cache)
        out = [model(TOKENS[:, 20:29], cache), model(TOKENS[:, 29:33], cache, last_only=True)]
        big = np.random.default_rng(9).integers(0, 400, (1, 260))
        model(big[:, :250], cache)
        out.append(model(big[:, 250:260], cache))
        return out, cache

    program = model._decode
    got, got_cache = run()
    model._decode = None
    want, want_cache = run()
    model._decode = program
    assert [g.shape for g in got] == [(1, 9, 400), (1, 1, 400), (1, 10, 400)]
    for g, w in zip(got, want):
        assert_close(g, w)
    assert_same_caches([got_cache], [want_cache])


@pytest.mark.parametrize("delay", [None, 0.02])
def test_batch_step_with_a_late_or_absent_helper(delay):
    model = tiny_model(qkv_bias=True)
    force_threads(model, 2)
    model._decode._pool = LateHelpers(delay)
    got, want, got_caches, want_caches = batch_with_and_without(model)
    for g, w in zip(got, want):
        if w is not None:
            assert_close(g, w)
    assert_same_caches(got_caches, want_caches)


@pytest.mark.parametrize("settings", [CacheSettings(kv_bits=8, kv_group_size=32), CacheSettings(max_kv_size=20)])
def test_other_caches_batch_op_by_op(settings):
    model = tiny_model(head_dim=32)
    got, want, got_caches, _ = batch_with_and_without(model, settings)
    for g, w in zip(got, want):
        if w is not None:
            np.testing.assert_array_equal(g, w)
    assert not model._decode.rows._addresses


def test_batch_steps_with_the_program_off(monkeypatch):
    want, want_caches = batch_steps(tiny_model())
    monkeypatch.setenv("MLXLLAMA_DECODE_PROGRAM", "0")
    model = tiny_model()
    assert model._decode is None
    got, got_caches = batch_steps(model)
    for g, w in zip(got, want):
        if w is not None:
            assert_close(g, w)
    assert_same_caches(got_caches, want_caches)


def counted_calls(model) -> list:
    """The compiled multi-row step's calls from now on (their row counts)."""
    rows, calls = model._decode.rows, []
    step = rows._step
    rows._step = lambda chunks, seqs, want, kv: (calls.append(int(seqs[:, 1].sum())), step(chunks, seqs, want, kv))
    return calls


@pytest.mark.parametrize("threads", [1, 2])
def test_prompts_of_several_fresh_caches_are_one_program_call(threads):
    """Several sequences' prompt pieces (forward_batch) up to MAX_ROWS rows, more than the steps that time their
    threads, fresh caches too: one compiled call with the op-by-op path's logits and caches; the logits buffer holds
    only the rows asked for. A lone sequence's fresh or long prompt steps op by op (no call)."""
    model = tiny_model(threads=threads)
    force_threads(model, threads)
    prompts = [np.random.default_rng(11 + i).integers(0, 400, n) for i, n in enumerate((70, 45, 30))]

    def run():
        caches = [model.make_cache(1) for _ in range(4)]
        model.fill(prompts[0][None, :-1], caches[0])
        out = [model(prompts[0][None, -1:], caches[0]), model(prompts[1][None, :], caches[1], last_only=True),
               model(prompts[0][None, :], caches[1], last_only=True),
               model.forward_batch([prompts[0], prompts[2], prompts[1]], caches[1:], [0, 2, 1])]
        return out, caches

    calls = counted_calls(model)
    got, got_caches = run()
    assert calls == [145]  # the decode row took the single-row program; the lone prompts op by op
    assert model._decode.rows.bufs[numpy_rows._LOGITS].shape[0] == 8
    assert all(key[0] <= numpy_rows.TIMED_ROWS.bit_length() for key in model._decode.rows._choices)  # not timed
    program, model._decode = model._decode, None
    try:
        want, want_caches = run()
    finally:
        model._decode = program
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w)
    assert_same_caches(got_caches, want_caches)


def test_batch_steps_choose_their_threads_by_timing():
    model = tiny_model(threads=2)
    for _ in range(3):
        batch_steps(model)
    choices = model._decode.rows._choices
    assert choices and all(c.options == (1, 2) for c in choices.values())
    assert any(c.tries[1] and c.tries[2] for c in choices.values())


# -- float16 caches (CacheSettings(kv_dtype="float16")): read and written by the program as their bits ----------------

HALF = CacheSettings(kv_dtype="float16")
FULL = CacheSettings(kv_dtype="float32")


def assert_close_caches(got_cache, want_cache):
    n = got_cache.offset
    for layer in range(len(got_cache.keys)):
        for a, b in ((got_cache.keys[layer][0], want_cache.keys[layer][0]),
                     (got_cache.values[layer][0], want_cache.values[layer][0])):
            assert_kv_close(a[:, :, :n], b[:, :, :n])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("head_dim", [16, 32, 64])  # 16: the plain loops; 32, 64: numpy_attend's IR
@pytest.mark.parametrize("kv", [HALF, FULL], ids=["float16", "float32"])
def test_program_steps_a_float16_or_float32_cache(head_dim, threads, kv):
    model = tiny_model(head_dim=head_dim)
    force_threads(model, threads)
    got, want, got_cache, want_cache = with_and_without(model, kv)
    assert model._decode._kv_src is got_cache.keys[0][0]  # the program took the steps
    assert got_cache.keys[0][0].dtype == (np.float16 if kv is HALF else np.float32)
    assert_close(got, want)
    assert_close_caches(got_cache, want_cache)


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("kv", [HALF, FULL], ids=["float16", "float32"])
def test_batch_steps_with_float16_or_float32_caches(head_dim, kv):
    model = tiny_model(head_dim=head_dim)
    got, want, got_caches, want_caches = batch_with_and_without(model, kv)
    assert model._decode.rows._addresses  # the program took the steps
    for g, w in zip(got, want):
        if w is not None:
            assert_close(g, w)
    for g, w in zip(got_caches, want_caches):
        assert_close_caches(g, w)


def test_float32_and_float16_caches_in_one_batch_step_op_by_op():
    model = tiny_model(head_dim=32)
    program = model._decode

    def run(stepping):
        caches = [model.make_cache(1, settings=s) for s in (FULL, HALF)]
        model._decode = None  # the prompts op by op in both runs
        for p, c in zip(PROMPTS, caches):
            model(p[None, :], c)
        model._decode = stepping
        return model.forward_batch([MORE[:3], MORE[3:4]], caches, [3, 1])

    try:
        got = run(program)
        assert not program.rows._addresses
        want = run(None)
    finally:
        model._decode = program
    np.testing.assert_array_equal(got, want)
