"""Generation: sampling semantics, stop conditions, prompt handling, KV cache growth, mlx-free numpy backend."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import mlxllama
from mlxllama.errors import UsageError
from mlxllama.finish import StopStrings
from mlxllama.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    return mlxllama.load(str(tiny_hf), backend="numpy")


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams())(logits, []) == 1


def test_top_k_one_is_greedy_even_when_hot():
    logits = np.random.default_rng(0).standard_normal(50)
    s = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=1))
    assert {s(logits, []) for _ in range(20)} == {int(np.argmax(logits))}


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {s(logits, []) for _ in range(300)} == {0, 1}


def test_min_p_drops_unlikely_tokens():
    logits = np.log(np.array([0.6, 0.3, 0.07, 0.03]))
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.2, seed=0))
    assert {s(logits, []) for _ in range(300)} == {0, 1}


def test_sampling_follows_the_distribution_and_seed_reproduces():
    probs = np.array([0.5, 0.25, 0.25])
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7))(np.log(probs), []) for _ in range(1)]
    s = Sampler(SamplingParams(temperature=1.0, seed=7))
    seq = [s(np.log(probs), []) for _ in range(4000)]
    freq = np.bincount(seq, minlength=3) / len(seq)
    np.testing.assert_allclose(freq, probs, atol=0.03)
    assert seq[0] == draws[0]


def test_repetition_penalty_discourages_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0])
    s = Sampler(SamplingParams(repetition_penalty=1.5))
    assert s(logits, [0]) == 1  # 2.0 / 1.5 < 1.9


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                dict(min_p=1.0), dict(repetition_penalty=0), dict(temperature=float("nan")),
                                dict(seed=-3)])
def test_out_of_range_sampling_values_are_usage_errors(kw):
    with pytest.raises(UsageError):
        SamplingParams(**kw).validate()


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["END"])
    assert s.feed("hello E") == ("hello ", False)
    assert s.feed("N") == ("", False)
    assert s.feed("Dless") == ("", True)
    s = StopStrings(["END"])
    assert s.feed("hello E") == ("hello ", False)
    assert s.feed("ast") == ("East", False)


def test_max_tokens_and_finish_reason(tiny):
    model, tok = tiny
    rs = list(mlxllama.stream_generate(model, tok, "The quick brown", max_tokens=5))
    assert len(rs) <= 5
    assert rs[-1].finish_reason in ("length", "stop")
    assert all(r.finish_reason is None for r in rs[:-1])
    assert rs[-1].generation_tokens == len(rs)
    assert rs[-1].prompt_tokens == len(tok.encode("The quick brown"))


def test_stop_string_cuts_the_text(tiny):
    model, tok = tiny
    full = mlxllama.generate(model, tok, "The quick brown", max_tokens=30)
    if len(full) < 4:
        pytest.skip("the random model stopped at once")
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = mlxllama.generate(model, tok, "The quick brown", max_tokens=30, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_streamed_text_equals_decoded_tokens(tiny):
    model, tok = tiny
    rs = list(mlxllama.stream_generate(model, tok, "Ünïcödé 🙂", max_tokens=20, temperature=1.0, seed=3))
    tokens = [r.token for r in rs if r.token not in tok.eos_ids]
    assert "".join(r.text for r in rs) == tok.decode(tokens)


def test_token_id_prompt_is_used_as_given(tiny):
    model, tok = tiny
    ids = tok.encode("The quick brown")
    a = [r.token for r in mlxllama.stream_generate(model, tok, ids, max_tokens=6)]
    b = [r.token for r in mlxllama.stream_generate(model, tok, "The quick brown", max_tokens=6)]
    assert a == b


def test_prompt_longer_than_context_is_a_clear_error(tiny):
    model, tok = tiny
    ids = [5] * (model.args.max_position_embeddings + 1)
    with pytest.raises(UsageError, match="context"):
        list(mlxllama.stream_generate(model, tok, ids, max_tokens=4))


@pytest.mark.parametrize("prompt", ["", [], [10**9]])
def test_bad_prompts_are_usage_errors(tiny, prompt):
    model, tok = tiny
    with pytest.raises(UsageError):
        list(mlxllama.stream_generate(model, tok, prompt, max_tokens=4))


def test_generation_stops_at_the_context_limit(tiny):
    model, tok = tiny
    ctx = model.args.max_position_embeddings
    ids = [5] * (ctx - 3)
    rs = list(mlxllama.stream_generate(model, tok, ids, max_tokens=50))
    assert len(rs) <= 3


def test_kv_cache_grows_in_steps_and_chunked_prefill_matches_one_shot(tiny):
    model, tok = tiny
    tokens = np.random.default_rng(4).integers(3, 400, (1, 200))
    one = model.make_cache()
    full = model(tokens, one)
    chunked = model.make_cache()
    chunked.step = 16
    parts = [model(tokens[:, s: s + 37], chunked) for s in range(0, 200, 37)]
    assert chunked.capacity >= 200 and chunked.capacity % 16 == 0
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-4)


def test_numpy_backend_works_without_mlx(tiny_hf):
    """Hide mlx completely (an import hook that refuses it): auto picks numpy, generation works,
    asking for mlx is a clear usage error."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "mlx" or name.startswith("mlx.") or name.startswith("mlx_lm"):
            raise ImportError("mlx hidden by the test")
sys.meta_path.insert(0, Block())
import mlxllama
from mlxllama.errors import UsageError
model, tok = mlxllama.load({str(tiny_hf)!r}, backend="auto")
assert model.ops.name == "numpy", model.ops.name
print(len(mlxllama.generate(model, tok, "The quick", max_tokens=4)) >= 0)
try:
    mlxllama.load({str(tiny_hf)!r}, backend="mlx")
except UsageError as e:
    print("mlx refused:", e)
assert "mlx" not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert "mlx refused" in r.stdout.decode()


def test_logprobs_are_the_models_log_softmax(tiny):
    model, tok = tiny
    rs = list(mlxllama.stream_generate(model, tok, "The quick brown", max_tokens=6, logprobs=5))
    ids = tok.encode("The quick brown")
    cache = model.make_cache()
    logits = model.ops.to_numpy(model(np.asarray([ids]), cache))[0, -1].astype(np.float64)
    want = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = rs[0]
    assert first.logprobs == pytest.approx(want[first.token], abs=1e-5)
    assert [t for t, _ in first.top_logprobs] == list(np.argsort(-want)[:5])
    assert first.top_logprobs[0][0] == first.token  # greedy: the chosen token is the most likely
    for r in rs:
        assert r.logprobs <= 0 and len(r.top_logprobs) == 5
        assert [lp for _, lp in r.top_logprobs] == sorted((lp for _, lp in r.top_logprobs), reverse=True)
    greedy = [r.token for r in mlxllama.stream_generate(model, tok, "The quick brown", max_tokens=6)]
    assert [r.token for r in rs] == greedy  # asking for logprobs changes nothing else
    assert all(r.logprobs is None and r.top_logprobs is None
               for r in mlxllama.stream_generate(model, tok, "The quick brown", max_tokens=2))


def test_logits_processors_and_a_custom_sampler(tiny):
    model, tok = tiny
    greedy = [r.token for r in mlxllama.stream_generate(model, tok, "The quick brown", max_tokens=8)]
    banned = greedy[0]
    seen = []

    def ban(history, logits):
        seen.append(len(history))
        logits = logits.copy()
        logits[banned] = -np.inf
        return logits

    got = [r.token for r in mlxllama.stream_generate(model, tok, "The quick brown", max_tokens=8,
                                                     logits_processors=[ban])]
    assert banned not in got and len(got) == 8
    assert seen == sorted(seen) and seen[1] == seen[0] + 1  # called once a step with the ids so far
    picked = [r.token for r in mlxllama.stream_generate(model, tok, "The quick brown", max_tokens=5,
                                                        sampler=lambda logits: 7)]
    assert picked == [7] * 5


def test_a_full_context_ends_with_length_like_max_tokens(tiny):
    model, tok = tiny
    ctx = model.args.max_position_embeddings
    rs = list(mlxllama.stream_generate(model, tok, [5] * (ctx - 3), max_tokens=50))
    assert rs[-1].finish_reason in ("length", "stop")
    if rs[-1].finish_reason == "length":
        assert len(rs) == 3
    rs = list(mlxllama.stream_generate(model, tok, [5] * 10, max_tokens=3))
    assert rs[-1].finish_reason in ("length", "stop")


def test_sampling_object_and_keywords_are_exclusive(tiny):
    model, tok = tiny
    with pytest.raises(UsageError, match="either as sampling="):
        list(mlxllama.stream_generate(model, tok, "hi", max_tokens=2, temperature=0.5,
                                      sampling=SamplingParams(temperature=0.7)))
    with pytest.raises(UsageError, match="logprobs must be"):
        list(mlxllama.stream_generate(model, tok, "hi", max_tokens=2, logprobs=100))
