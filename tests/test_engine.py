"""The continuous-batching engine, batch_generate, the prefix cache and the batched numpy product."""

from __future__ import annotations

import numpy as np
import pytest

import mlxllama
from mlxllama.engine import Engine, RequestParams
from mlxllama.generate import batch_generate, stream_generate
from mlxllama.errors import UsageError
from mlxllama.prefix_cache import PrefixCache
from mlxllama.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "Memory bandwidth decides", "Hello world! How are", "def main():",
           "Numbers: 0 1 2", "Apple Silicon has"]


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    return mlxllama.load(tiny_hf, backend="numpy")


def test_batch_generate_greedy_equals_solo(tiny):
    m, tok = tiny
    solo = [mlxllama.generate(m, tok, p, max_tokens=12) for p in PROMPTS]
    batched = batch_generate(m, tok, PROMPTS, max_tokens=12, max_batch=4, prefill_chunk=3)
    assert batched.texts == solo
    assert all(n >= 1 for n in batched.generation_tokens)
    assert set(batched.finish_reasons) <= {"stop", "length"}


def test_seeded_sampling_is_independent_of_the_batch(tiny):
    m, tok = tiny
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    alone = batch_generate(m, tok, [PROMPTS[0]], max_tokens=10, sampling=sp).texts[0]
    mixed = batch_generate(m, tok, PROMPTS[:4], max_tokens=10,
                           sampling=[sp] + [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]).texts
    assert mixed[0] == alone
    assert alone == mlxllama.generate(m, tok, PROMPTS[0], max_tokens=10, sampling=sp)


def test_prefill_is_chunked_and_bounded_while_others_decode(tiny):
    m, tok = tiny
    engine = Engine(m, tok, max_batch=4, prefill_chunk=5, prefill_step=512)
    rows = []
    forward = engine._forward

    def spy(batch, chunks, out_rows):  # every forward pass of the step, lone or batched
        rows.append([len(c) for c in chunks])
        return forward(batch, chunks, out_rows)

    engine._forward = spy
    try:
        first = engine.submit(tok.encode("Hello"), RequestParams(max_tokens=30))
        engine.step()  # "Hello" prefilled whole: nothing else is running
        long_prompt = tok.encode(" ".join(PROMPTS * 2))
        second = engine.submit(long_prompt, RequestParams(max_tokens=3))
        while engine.step():
            pass
    finally:
        del engine._forward
    assert rows[0] == [len(tok.encode("Hello"))]
    joined = [r for r in rows[1:] if len(r) == 2]
    assert joined and all(r[0] == 1 and r[1] <= 5 for r in joined)  # the decoding stream keeps going
    assert sum(r[1] for r in joined) >= len(long_prompt) - 5
    assert [e.finish_reason for e in first][-1] in ("stop", "length")
    assert [e.finish_reason for e in second][-1] in ("stop", "length")


def test_prefix_cache_reuses_a_previous_turn(tiny):
    m, tok = tiny
    engine = Engine(m, tok, max_batch=2, prefix_cache=PrefixCache(64 << 20))
    ids = tok.encode(PROMPTS[1])
    first = list(engine.submit(ids, RequestParams(max_tokens=6)))
    follow = ids + [e.token for e in first] + tok.encode(" and more")
    events = list(engine.submit(follow, RequestParams(max_tokens=6)))
    assert events[-1].cached_tokens >= len(ids)
    fresh = Engine(m, tok, max_batch=1)  # no prefix cache: the same tokens
    assert [e.token for e in fresh.submit(follow, RequestParams(max_tokens=6))] == [e.token for e in events]


def test_engine_stream_generate_for_chat_turns(tiny):
    m, tok = tiny
    engine = Engine(m, tok, max_batch=1, prefix_cache=PrefixCache(16 << 20))
    a = "".join(r.text for r in stream_generate(m, tok, PROMPTS[2], max_tokens=5, engine=engine))
    assert a == mlxllama.generate(m, tok, PROMPTS[2], max_tokens=5)
    b = list(stream_generate(m, tok, PROMPTS[2] + a + " more", max_tokens=5, engine=engine))
    assert engine.stats.cached_tokens > 0
    assert b[-1].finish_reason in ("stop", "length")


def test_cancel_frees_the_sequence_at_the_next_step(tiny):
    m, tok = tiny
    engine = Engine(m, tok, max_batch=2)
    h = engine.submit(tok.encode(PROMPTS[0]), RequestParams(max_tokens=100))
    other = engine.submit(tok.encode(PROMPTS[1]), RequestParams(max_tokens=100))
    for _ in range(3):
        engine.step()
    assert engine.active == 2
    h.cancel()
    engine.step()
    assert engine.active == 1
    other.cancel()
    engine.step()
    assert engine.active == 0 and engine.stats.requests["cancelled"] == 2


def test_a_failing_request_does_not_stop_the_engine(tiny):
    m, tok = tiny
    calls = []

    def make_cache(n):
        calls.append(n)
        if len(calls) == 1:
            raise MemoryError("no room")
        return m.make_cache(1, max_len=n)

    engine = Engine(m, tok, make_cache=make_cache).start()
    try:
        bad = list(engine.submit(tok.encode(PROMPTS[0]), RequestParams(max_tokens=4)))
        good = list(engine.submit(tok.encode(PROMPTS[0]), RequestParams(max_tokens=4)))
    finally:
        engine.shutdown(5)
    assert bad[-1].finish_reason == "error" and "no room" in bad[-1].error
    assert good[-1].finish_reason in ("stop", "length") and engine.stats.requests["error"] == 1


def test_a_library_error_keeps_its_type_through_the_engine(tiny, monkeypatch):
    """generate_step and batch_generate re-raise the library's own exception from a failed step (a lost rank stays
    a DistributedError, its message unprefixed), so callers can catch it by type."""
    from mlxllama.distributed import DistributedError
    from mlxllama.generate import generate_step

    m, tok = tiny

    def lost(*args, **kwargs):
        raise DistributedError("rank 0: lost another rank while testing")

    monkeypatch.setattr(m, "make_cache", lost)
    with pytest.raises(DistributedError, match="^rank 0: lost another rank while testing$"):
        list(generate_step(m, tok.encode(PROMPTS[0]), 4))
    with pytest.raises(DistributedError, match="^rank 0: lost another rank while testing$"):
        batch_generate(m, tok, PROMPTS[:2], max_tokens=4)


def test_bad_requests_are_usage_errors(tiny):
    m, tok = tiny
    engine = Engine(m, tok)
    with pytest.raises(UsageError):
        engine.submit([], RequestParams())
    with pytest.raises(UsageError):
        engine.submit([1] * m.args.max_position_embeddings, RequestParams())
    with pytest.raises(UsageError):
        engine.submit([1, 2], RequestParams(max_tokens=0))
    with pytest.raises(UsageError):
        engine.submit([1, 2], RequestParams(sampling=SamplingParams(top_p=0.0)))
    with pytest.raises(UsageError):
        engine.submit([1, 2], RequestParams(frequency_penalty=3.0))


def test_penalties_and_logprobs(tiny):
    m, tok = tiny
    engine = Engine(m, tok)
    ids = tok.encode(PROMPTS[3])
    plain = list(engine.submit(ids, RequestParams(max_tokens=8, logprobs=True, top_logprobs=3)))
    for e in plain:
        if e.token is not None:
            assert e.top_logprobs[0][0] == e.token and abs(e.top_logprobs[0][1] - e.logprob) < 1e-12
            assert e.logprob <= 0 and [lp for _, lp in e.top_logprobs] == sorted(
                [lp for _, lp in e.top_logprobs], reverse=True)
    penalized = list(engine.submit(ids, RequestParams(max_tokens=8, frequency_penalty=2.0, presence_penalty=2.0)))
    toks = [e.token for e in penalized if e.token is not None]
    assert len(set(toks)) >= len({e.token for e in plain if e.token is not None})


# -- prefix cache ---------------------------------------------------------------------------------------------

def _kv(n, layers=2, fill=0.0):
    return [(np.full((1, 2, n, 4), fill + i, np.float32), np.full((1, 2, n, 4), -fill - i, np.float32))
            for i in range(layers)]


def test_prefix_cache_longest_prefix_and_mid_edge_matches():
    pc = PrefixCache(1 << 20)
    pc.store([1, 2, 3, 4, 5], _kv(5, fill=1))
    pc.store([1, 2, 9], _kv(3, fill=2))
    m, kv = pc.lookup([1, 2, 3, 4, 5, 6])
    assert m == 5 and kv[0][0].shape[2] == 5 and kv[0][0][0, 0, 0, 0] == 1
    m, kv = pc.lookup([1, 2, 3, 7])  # ends inside the first entry's edge
    assert m == 3 and kv[1][0].shape[2] == 3
    m, kv = pc.lookup([1, 2, 9, 9])
    assert m == 3 and kv[0][0][0, 0, 0, 0] == 2
    assert pc.lookup([8, 1]) == (0, None)


def test_prefix_cache_byte_budget_and_lru():
    one = sum(k.nbytes + v.nbytes for k, v in _kv(10))
    pc = PrefixCache(2 * one + one // 2)
    pc.store(list(range(10)), _kv(10))
    pc.store(list(range(100, 110)), _kv(10))
    pc.lookup(list(range(10)))  # touch the first: the second is now the least recently used
    pc.store(list(range(200, 210)), _kv(10))
    assert len(pc) == 2 and pc.nbytes <= pc.max_bytes
    assert pc.lookup(list(range(100, 110)))[0] == 0
    assert pc.lookup(list(range(10)))[0] == 10
    assert not pc.store(list(range(50)), _kv(50))  # larger than the whole budget


def test_prefix_cache_extension_replaces_the_shorter_entry():
    pc = PrefixCache(1 << 20)
    pc.store([1, 2, 3], _kv(3))
    pc.store([1, 2, 3, 4, 5], _kv(5))
    assert len(pc) == 1 and pc.lookup([1, 2, 3, 4, 5, 6])[0] == 5


# -- the batched numpy product ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [2, 5, 8, 15])
def test_numpy_few_row_product_matches_matmul(rows):
    from mlxllama.backends.numpy_ops import NumpyOps

    rng = np.random.default_rng(rows)
    w = rng.standard_normal((300, 2000)).astype(np.float32)
    x = rng.standard_normal((rows, 300)).astype(np.float32)
    for threads in (1, 2):
        y = NumpyOps(threads=threads).linear(x, w)
        np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)


def test_forward_batch_on_mlx_matches_solo(tiny_hf):
    pytest.importorskip("mlx.core")
    m, tok = mlxllama.load(tiny_hf, backend="mlx")
    prompts = PROMPTS[:3]
    solo = [mlxllama.generate(m, tok, p, max_tokens=6) for p in prompts]
    assert batch_generate(m, tok, prompts, max_tokens=6, prefill_chunk=4).texts == solo


def test_speculating_engine_keeps_seeds_and_samples(tiny):
    """With speculate on, a seeded sampled request decodes plainly (its tokens do not depend on what else runs);
    unseeded sampled requests speculate and finish; greedy ones equal plain greedy."""
    from mlxllama.generate import prompt_tokens
    from mlxllama.speculative import SpeculativeConfig

    m, tok = tiny
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    engine = Engine(m, tok, max_batch=4, speculate=SpeculativeConfig("lookup", 4, adaptive=False))
    params = [RequestParams(max_tokens=10, sampling=seeded), RequestParams(max_tokens=20),
              RequestParams(max_tokens=20, sampling=SamplingParams(temperature=1.0))]
    handles = [engine.submit(prompt_tokens(tok, PROMPTS[i], chat=False), p) for i, p in enumerate(params)]
    events = [list(h) for h in handles]
    texts = ["".join(e.text for e in evs) for evs in events]
    assert texts[0] == mlxllama.generate(m, tok, PROMPTS[0], max_tokens=10, sampling=seeded)
    assert texts[1] == mlxllama.generate(m, tok, PROMPTS[1], max_tokens=20)
    assert events[2][-1].finish_reason in ("stop", "length") and events[2][-1].error is None
    assert engine.spec_stats.forwards > 0 and engine.active == 0


class EvenTokens:
    """A constraint (logits.Constraint) allowing only even token ids, done after `limit` tokens; it records how the
    engine drives it."""

    def __init__(self, vocab: int, limit: int):
        self.mask = np.arange(vocab) % 2 == 0
        self.limit, self.accepted, self.calls = limit, [], []

    def allowed(self):
        return self.mask

    def accept(self, tokens):
        self.accepted += list(tokens)

    def rollback(self, n):
        self.calls.append(("rollback", n))
        del self.accepted[len(self.accepted) - n:]

    def check_draft(self, tokens):
        self.calls.append(("check_draft", list(tokens)))
        n = 0
        while n < len(tokens) and tokens[n] % 2 == 0:
            n += 1
        return n

    @property
    def done(self):
        return len(self.accepted) >= self.limit


def test_a_constraint_masks_each_step_and_ends_with_stop(tiny):
    """The constraint hook: only allowed tokens come out, each accepted once in order, and `done` ends the request
    with "stop"; with speculation, drafts are cut by check_draft and the tokens are the same."""
    from mlxllama.speculative import SpeculativeConfig

    m, tok = tiny
    ids = tok.encode(PROMPTS[0]) * 2
    outs = []
    for speculate in (None, SpeculativeConfig("lookup", 4, adaptive=False)):
        c = EvenTokens(m.args.vocab_size, 12)
        engine = Engine(m, None, max_batch=1, speculate=speculate)
        evs = list(engine.submit(ids, RequestParams(max_tokens=50, ignore_eos=True, constraint=c)))
        tokens = [ev.token for ev in evs if ev.token is not None]
        assert all(t % 2 == 0 for t in tokens) and tokens == c.accepted and len(tokens) == 12
        assert evs[-1].finish_reason == "stop"
        outs.append(tokens)
        if speculate is not None:
            assert any(name == "check_draft" for name, _ in c.calls)
    assert outs[0] == outs[1]
    plain = list(Engine(m, None).submit(ids, RequestParams(max_tokens=12, ignore_eos=True)))
    assert [ev.token for ev in plain if ev.token is not None] != outs[0]  # the mask did change the output


def test_logit_bias_and_a_constraint_factory_reach_every_surface(tiny):
    m, tok = tiny
    forced = [r.token for r in stream_generate(m, tok, PROMPTS[1], max_tokens=4, logit_bias={42: 100.0})]
    assert forced == [42] * 4
    out = batch_generate(m, tok, PROMPTS[:2], max_tokens=5, constraint=lambda: EvenTokens(m.args.vocab_size, 3))
    assert out.finish_reasons == ["stop", "stop"] and out.generation_tokens == [3, 3]


@pytest.mark.parametrize("speculate", [None, "lookup"])
def test_warm_up_runs_one_then_two_sequences_and_leaves_no_trace(tiny, monkeypatch, speculate):
    """Engine.warm_up (serve's, before the first request) decodes one sequence, then two side by side, on a
    throwaway engine: this engine's stats, speculative counters and prefix cache stay empty, and a request after
    it is answered as without it."""
    from mlxllama.speculative import SpeculativeConfig

    m, tok = tiny
    engine = Engine(m, tok, max_batch=4, prefix_cache=PrefixCache(1 << 20),
                    speculate=SpeculativeConfig(speculate, 4) if speculate else None)
    passes = []
    forward = Engine._forward

    def spy(self, batch, chunks, out_rows):
        passes.append((self is engine, len(chunks)))
        return forward(self, batch, chunks, out_rows)

    monkeypatch.setattr(Engine, "_forward", spy)
    assert engine.warm_up(tokens=3) > 0
    assert passes and not any(mine for mine, _ in passes)
    sizes = [n for _, n in passes]
    assert set(sizes) == {1, 2} and sizes == sorted(sizes)  # the lone sequence's passes, then the pair's
    assert engine.stats.steps == 0 and engine.stats.prompt_tokens == 0 and engine.stats.completion_tokens == 0
    assert sum(engine.stats.requests.values()) == 0 and len(engine.prefix_cache) == 0
    assert engine.spec_stats.forwards == 0 and engine.spec_stats.drafted == 0
    monkeypatch.setattr(Engine, "_forward", forward)
    h = engine.submit(tok.encode(PROMPTS[0]), RequestParams(max_tokens=8))
    while engine.step():
        pass
    assert "".join(ev.text for ev in h.poll()) == mlxllama.generate(m, tok, PROMPTS[0], max_tokens=8)


THREAD_EXIT = """
import threading
import mlx.core as mx
from mlxllama.backends.mlx_ops import MLXOps, nn_silu
step = MLXOps().compile(lambda h, w: h * w + nn_silu(h))
def work():
    for i in range(3):
        mx.eval(step(mx.ones((1, 1, 8)) * i, mx.ones((8,))))
t = threading.Thread(target=work)
t.start()
t.join()
"""


def test_a_thread_that_ran_compiled_mlx_steps_ends_as_the_process_exits():
    """The engine's thread runs the model's mx.compile'd pieces, made on the loading thread; it ends on shutdown just
    before the interpreter finalizes. With one compiled function shared by the threads, MLX's thread-exit
    destructor of that thread's traces aborted the process about 1 exit in 15 (ops.compile keeps one per thread
    now). 48 exits: a shared function would pass all of them about 1 time in 30."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("mlx.core")

    def run(_):
        return subprocess.run([sys.executable, "-c", THREAD_EXIT], capture_output=True, text=True, timeout=60)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(run, range(48)))
    failed = [(r.returncode, r.stderr[-300:]) for r in runs if r.returncode != 0]
    assert not failed, failed
