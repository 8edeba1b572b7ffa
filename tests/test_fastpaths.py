"""Every fast path gives the plain path's numbers: numpy's quantized-weights mode, worker threads and blocked
attention; MLX's compiled decode step and dequantize-then-matmul prefill; releasing the loader's weights."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import TINY, full_kv, random_weights
from mlxllama.backends import get_ops
from mlxllama.backends import numpy_ops
from mlxllama.config import from_hf_dict
from mlxllama.generate import generate_step
from mlxllama.model import Model
from mlxllama.quant import quantize_weights

needs_mlx = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx not installed")


def tiny(tie: bool = False, bits: int | None = 4, seed: int = 0, **kw):
    cfg = dict(TINY, tie_word_embeddings=tie, **kw)
    args = from_hf_dict(dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu"))
    weights = {k.removesuffix(".weight"): v for k, v in random_weights(cfg, seed).items()}
    if bits:
        weights, args = quantize_weights(weights, args, group_size=32, bits=bits, dtype=np.float16)
    return args, weights


def logits(model, tokens, split: int) -> np.ndarray:
    """Prefill tokens[:, :split] (one chunk), then one token at a time: every logit row."""
    cache = model.make_cache(tokens.shape[0], settings=full_kv(model.ops))
    parts = [model(tokens[:, :split], cache)]
    parts += [model(tokens[:, i: i + 1], cache) for i in range(split, tokens.shape[1])]
    return np.concatenate([model.ops.to_numpy(p) for p in parts], axis=1)


TOKENS = np.random.default_rng(3).integers(0, 400, (1, 40))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_numpy_quantized_mode_matches_float32_mode(tie, bits):
    args, weights = tiny(tie=tie, bits=bits)
    dense = Model(args, weights, numpy_ops.NumpyOps("float32", threads=1))
    quant = Model(args, weights, numpy_ops.NumpyOps("quantized", threads=2))
    assert quant.resident_nbytes < dense.resident_nbytes / 2
    want, got = logits(dense, TOKENS, 30), logits(quant, TOKENS, 30)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # prefill (several rows) dequantizes the very weights float32 mode holds: identical up to BLAS blocking
    np.testing.assert_allclose(got[:, :30], want[:, :30], rtol=1e-6, atol=1e-5)
    ids = TOKENS[0, :12].tolist()
    assert list(generate_step(quant, ids, 12)) == list(generate_step(dense, ids, 12))


def test_numpy_quantized_mode_by_environment(monkeypatch):
    monkeypatch.setenv("MLXLLAMA_NUMPY_WEIGHTS", "quantized")
    assert get_ops("numpy").weights_mode == "quantized"
    assert get_ops("numpy", numpy_weights="float32").weights_mode == "float32"
    monkeypatch.setenv("MLXLLAMA_NUMPY_WEIGHTS", "int3")
    with pytest.raises(Exception, match="weights mode"):
        get_ops("numpy")


def test_numpy_worker_threads_match_one_thread():
    args, weights = tiny(bits=None)
    one = Model(args, weights, numpy_ops.NumpyOps(threads=1))
    two = Model(args, weights, numpy_ops.NumpyOps(threads=2))
    np.testing.assert_allclose(logits(two, TOKENS, 30), logits(one, TOKENS, 30), rtol=1e-6, atol=1e-6)


def test_numpy_elementwise_ops_split_over_workers_give_one_threads_bits(monkeypatch):
    """A long prompt's norms (a [hidden] weight and a [heads, head_dim] one), RoPE, SiLU gate and input rounding
    run in ranges of rows on the workers (Workers.by_rows): the same numbers as on one thread."""
    from mlxllama.backends import numpy_kernels, numpy_threads
    from mlxllama.quant import quantize

    rng = np.random.default_rng(0)
    one, two = numpy_ops.NumpyOps("float32", threads=1), numpy_ops.NumpyOps("float32", threads=2)
    calls = []
    share = numpy_threads.Workers.share
    monkeypatch.setattr(numpy_threads.Workers, "share",
                        lambda self, fn, items, n: calls.append(len(items)) or share(self, fn, items, n))
    x = rng.standard_normal((1, 600, 8, 128)).astype(np.float32)
    gate, up = x[..., :64], x[..., 64:]
    table = one.rope_table(1.0 / 10000 ** (np.arange(0, 128, 2) / 128))
    norm, head_norm = rng.standard_normal(128).astype(np.float32), rng.standard_normal((8, 128)).astype(np.float32)
    for name, run in (("norm", lambda o: o.rms_norm(x, norm, 1e-5)),
                      ("head norm", lambda o: o.rms_norm(x, head_norm, 1e-5)),
                      ("rope", lambda o: o.rope(x.transpose(0, 2, 1, 3), 7, table)),
                      ("swiglu", lambda o: o.swiglu(gate, up))):
        np.testing.assert_array_equal(run(two), run(one), err_msg=name)
    assert len(calls) == 4 and min(calls) >= 2
    if numpy_ops._qmatvec() is None:
        return
    w = numpy_ops._qmatvec().PackedLinear([quantize(rng.standard_normal((96, 256)).astype(np.float32), 32, 4)])
    x2 = rng.standard_normal((2048, 256)).astype(np.float32)
    np.testing.assert_array_equal(numpy_kernels.fused_matmul(two.workers, x2, w, 2), w.matmul(x2))


def naive_attention(q, k, v, scale, window=None):
    B, H, L, D = q.shape
    KV, T = k.shape[1], k.shape[2]
    k = np.repeat(k, H // KV, axis=1).astype(np.float64)
    v = np.repeat(v, H // KV, axis=1).astype(np.float64)
    s = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) * scale
    pos = np.arange(L)[:, None] + (T - L)
    s[..., np.arange(T)[None, :] > pos] = -np.inf
    if window is not None:
        s[..., np.arange(T)[None, :] <= pos - window] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("L,T", [(300, 300), (300, 345), (1, 50), (129, 129)])
def test_numpy_blocked_attention(L, T):
    rng = np.random.default_rng(L + T)
    q = rng.standard_normal((2, 6, L, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 3, T, 16)).astype(np.float32) for _ in range(2))
    for threads in (1, 2):
        got = numpy_ops.NumpyOps(threads=threads).attention(q, k, v, 0.25, causal=True)
        np.testing.assert_allclose(got, naive_attention(q, k, v, 0.25), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("D,window", [(16, None), (64, None), (64, 40)])
def test_numpy_prompt_attention_in_compiled_rows(D, window):
    """One sequence's prompt rows (after 20 cached positions) take numpy_step.causal_rows where numba is there: the
    decode step's per-row attention, a sliding window honoured, on either of its head-size paths."""
    if numpy_ops._qmatvec() is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(D)
    q = rng.standard_normal((1, 6, 130, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, 3, 150, D)).astype(np.float32) for _ in range(2))
    for threads in (1, 2):
        got = numpy_ops.NumpyOps(threads=threads).attention(q, k, v, 0.25, causal=True, window=window)
        np.testing.assert_allclose(got, naive_attention(q, k, v, 0.25, window), rtol=1e-4, atol=1e-5)


def test_numpy_attention_scores_stay_in_the_scratch(monkeypatch):
    """Long contexts take fewer queries per block (numpy_kernels.query_block) so that the scores fit the threads'
    scratch, which does not grow past QUANT_BLOCK floats; the result is unchanged. (Two sequences: one alone takes
    the compiled rows where numba is there.)"""
    from mlxllama.backends import numpy_kernels

    monkeypatch.setattr(numpy_kernels, "QUANT_BLOCK", 2 * 6 * 40 * 300)  # 40 queries a block at 300 keys, 6 heads
    assert numpy_kernels.query_block(12, 300) == 40 and numpy_kernels.query_block(12, 10 ** 6) == 16
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 6, 300, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 3, 300, 16)).astype(np.float32) for _ in range(2))
    ops = numpy_ops.NumpyOps(threads=2)
    np.testing.assert_allclose(ops.attention(q, k, v, 0.25, causal=True), naive_attention(q, k, v, 0.25),
                               rtol=1e-4, atol=1e-5)
    assert max(b.size for b in ops.workers._scratch.values()) <= numpy_kernels.QUANT_BLOCK


def test_numpy_maps_large_arrays_unless_the_user_chose(monkeypatch):
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    assert numpy_ops.map_large_arrays.__wrapped__() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert numpy_ops.map_large_arrays.__wrapped__() is False


def test_numpy_forward_restores_blas_threads():
    if not numpy_ops._blas.available:
        pytest.skip("numpy's BLAS is not an OpenBLAS whose threads can be set")
    before = numpy_ops._blas.get()
    args, weights = tiny(bits=None)
    model = Model(args, weights, numpy_ops.NumpyOps(threads=2))
    model(TOKENS[:, :5], model.make_cache())
    assert numpy_ops._blas.get() == before


def test_release_empties_the_loaders_weights():
    args, weights = tiny()
    want = logits(Model(args, weights, numpy_ops.NumpyOps()), TOKENS, 20)
    model = Model(args, dict(weights), numpy_ops.NumpyOps(), release=False)
    given = dict(weights)
    released = Model(args, given, numpy_ops.NumpyOps(), release=True)
    assert given == {}
    np.testing.assert_array_equal(logits(released, TOKENS, 20), want)
    assert released.weights_nbytes == model.weights_nbytes


def test_generate_step_yields_exactly_max_tokens():
    """No stop tokens at this level (benchmarks rely on it); a shorter run is a prefix of a longer one."""
    args, weights = tiny()
    model = Model(args, weights, numpy_ops.NumpyOps())
    ids = TOKENS[0, :8].tolist()
    out = list(generate_step(model, ids, 20))
    assert len(out) == 20
    assert list(generate_step(model, ids, 5)) == out[:5]


@needs_mlx
@pytest.mark.parametrize("tie", [False, True])
def test_mlx_compiled_decode_matches_eager(tie):
    from mlxllama.backends.mlx_ops import MLXOps

    class EagerOps(MLXOps):
        def compile(self, fn):
            return fn

    args, weights = tiny(tie=tie)
    fast = Model(args, weights, MLXOps())
    plain = Model(args, weights, EagerOps())
    np.testing.assert_allclose(logits(fast, TOKENS, 20), logits(plain, TOKENS, 20), rtol=1e-5, atol=1e-5)
    ids = TOKENS[0, :10].tolist()
    assert list(generate_step(fast, ids, 16)) == list(generate_step(plain, ids, 16))


@needs_mlx
def test_mlx_dequantized_prefill_matches_quantized_matmul(monkeypatch):
    from mlxllama.backends import mlx_ops

    if mlx_ops.gpu_available():
        pytest.skip("the dequantize-then-matmul prefill is the CPU path")
    args, weights = tiny()
    model = Model(args, weights, mlx_ops.MLXOps())
    tokens = np.random.default_rng(4).integers(0, 400, (1, 200))
    # chunks of 30 and 150 rows: dequantized weights, x @ W, blocked attention (3 query blocks, after a past)
    cache = model.make_cache()
    fast = [model.ops.to_numpy(model(tokens[:, :30], cache)), model.ops.to_numpy(model(tokens[:, 30:180], cache))]
    monkeypatch.setattr(mlx_ops, "DEQUANTIZED_MATMUL_ROWS", 10 ** 9)  # quantized_matmul and the fused attention
    cache = model.make_cache()
    plain = [model.ops.to_numpy(model(tokens[:, :30], cache)), model.ops.to_numpy(model(tokens[:, 30:180], cache))]
    for f, p in zip(fast, plain):
        np.testing.assert_allclose(f, p, rtol=1e-5, atol=1e-5)


@needs_mlx
def test_mlx_and_numpy_fast_paths_agree():
    args, weights = tiny()
    mlx_model = Model(args, weights, get_ops("mlx"))
    for mode in ("float32", "quantized"):
        np_model = Model(args, weights, get_ops("numpy", numpy_weights=mode))
        np.testing.assert_allclose(logits(mlx_model, TOKENS, 30), logits(np_model, TOKENS, 30), rtol=1e-4,
                                   atol=1e-4)
        ids = TOKENS[0, :10].tolist()
        assert list(generate_step(mlx_model, ids, 16)) == list(generate_step(np_model, ids, 16))


@pytest.mark.parametrize("fast", [1, 2])
def test_thread_choice_settles_on_the_faster_option(fast):
    choice = numpy_ops._ThreadChoice((1, 2))
    cost = {fast: 1.0, 3 - fast: 20.0}
    picks = []
    for _ in range(2000):
        o = choice.pick()
        picks.append(o)
        choice.record(o, cost[o])
    assert choice.best == fast
    slow_late = picks[1000:].count(3 - fast)
    assert 0 < slow_late <= 4  # still retried, rarely
    cost[fast], cost[3 - fast] = 20.0, 1.0  # the machine changes: the other option becomes faster
    for _ in range(1100):
        o = choice.pick()
        choice.record(o, cost[o])
    assert choice.best == 3 - fast


def test_thread_choice_recovers_at_the_first_retry_after_one_disturbed_step():
    choice = numpy_ops._ThreadChoice((1, 2))
    for _ in range(40):
        o = choice.pick()
        choice.record(o, {1: 14.0, 2: 9.4}[o])
    assert choice.best == 2
    choice.record(2, 300.0)  # another process held the second core for one step
    assert choice.best == 1
    picks = []
    for _ in range(17):  # the first retry comes within 16 steps and wins back
        o = choice.pick()
        picks.append(o)
        choice.record(o, {1: 14.0, 2: 9.4}[o])
    assert 2 in picks and choice.best == 2


def test_a_prompt_scored_for_its_last_row_is_not_timed_as_a_single_row_step():
    """model(prompt, last_only=True) runs every prompt row through the blocks: it must not pick, nor teach, the
    single-row steps' thread count (a 512-token prefill timed as one decode step kept decode off its faster count
    and ran the prefill on it)."""
    args, weights = tiny()
    model = Model(args, weights, get_ops("numpy"))
    cache = model.make_cache(1)
    model(np.arange(3, 19)[None, :], cache, last_only=True)
    assert sum(model.ops._choice.tries.values()) == 0
    model(np.array([[5]]), cache)
    assert sum(model.ops._choice.tries.values()) == 1


def test_thread_choice_retries_every_losing_option_in_turn():
    """Four options (threads x prefetch, NumpyOps.step_options): each loser keeps being retried, so a change of
    machine load that makes any of them the fastest is found."""
    options = ((1, 4096), (1, 0), (2, 4096), (2, 0))
    choice = numpy_ops._ThreadChoice(options)
    cost = dict(zip(options, (3.0, 4.0, 1.0, 2.0)))
    picks = []
    for _ in range(3000):
        o = choice.pick()
        picks.append(o)
        choice.record(o, cost[o])
    assert choice.best == (2, 4096)
    assert all(0 < picks[1000:].count(o) <= 6 for o in options if o != choice.best)
    cost[(1, 4096)] = 0.5  # the option retried least recently becomes the fastest
    for _ in range(1600):
        o = choice.pick()
        choice.record(o, cost[o])
    assert choice.best == (1, 4096)


def test_numpy_steps_time_the_kernels_prefetch_with_their_thread_count():
    """A fused model's single-row steps choose among (threads, prefetch bytes) pairs; each prefetch gives the
    same logits (it only asks the cache for bytes ahead)."""
    pytest.importorskip("numba")
    from mlxllama.backends.numpy_threads import PREFETCH

    args, weights = tiny()
    ops = get_ops("numpy", numpy_weights="fused")
    model = Model(args, weights, ops)
    assert {p for _, p in ops.step_options()} == {PREFETCH, 0}
    outs = {}
    for option in ops.step_options():
        ops._choice = numpy_ops._ThreadChoice((option,))
        cache = model.make_cache(1)
        model.fill(np.arange(3, 11)[None, :], cache)
        outs[option] = np.asarray(model(np.array([[5]]), cache))
    first = next(iter(outs.values()))
    assert all(np.array_equal(o, first) for o in outs.values())
