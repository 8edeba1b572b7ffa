"""Issue 13: quantized and rotating KV caches, the memory fit check and the Metal wired limit (decided with injected
device information, so it is tested off the Mac), and perplexity / KL divergence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import TINY, random_weights
from mlxllama.backends import get_ops
from mlxllama.backends.contract import QuantizedKV
from mlxllama.cache import (CacheSettings, KVCache, QuantizedKVCache, RotatingKVCache, for_backend,
                            kv_element_bytes)
from mlxllama.config import ModelArgs
from mlxllama.errors import UsageError
from mlxllama import memory
from mlxllama.model import Model

CFG = dict(TINY, head_dim=32)  # a head of 32: quantization groups of 32 fit
FIELDS = {f.name for f in dataclasses.fields(ModelArgs)}


def tiny_model(backend="numpy", seed=0, **over):
    cfg = dict(CFG, **over)
    args = ModelArgs(**{k: v for k, v in cfg.items() if k in FIELDS})
    w = {k.removesuffix(".weight"): v for k, v in random_weights(cfg, seed).items()}
    return Model(args, w, get_ops(backend))


TOKENS = np.random.default_rng(0).integers(3, 400, (1, 48))


# -- quantized KV ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_numpy_kv_format_is_mlx_bit_for_bit(bits):
    x = np.random.default_rng(1).standard_normal((2, 2, 7, 64)).astype(np.float32)
    a = get_ops("numpy").quantize_kv(x, 32, bits)
    import mlx.core as mx

    b = get_ops("mlx").quantize_kv(mx.array(x), 32, bits)
    for mine, theirs in zip(a[:3], b[:3]):
        assert np.array_equal(mine, np.array(theirs))


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_attention_equals_attention_over_the_dequantized_cache(backend, bits):
    from mlxllama.backends.numpy_ops import _dequantize_kv

    ops = get_ops(backend)
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 4, 5, 32)).astype(np.float32)
    k = rng.standard_normal((1, 2, 9, 32)).astype(np.float32)
    v = rng.standard_normal((1, 2, 9, 32)).astype(np.float32)
    kq, vq = get_ops("numpy").quantize_kv(k, 32, bits), get_ops("numpy").quantize_kv(v, 32, bits)
    want = get_ops("numpy").attention(q, _dequantize_kv(kq), _dequantize_kv(vq), 0.2, causal=True)
    import mlx.core as mx

    conv = (lambda a: a) if backend == "numpy" else mx.array
    got = ops.attention(conv(q), QuantizedKV(*map(conv, kq[:3]), 32, bits), QuantizedKV(*map(conv, vq[:3]), 32, bits),
                        0.2, causal=True)
    np.testing.assert_allclose(ops.to_numpy(got), want, atol=2e-5)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_decodes_like_one_pass_and_is_smaller(backend, bits):
    m = tiny_model(backend)
    s = CacheSettings(kv_bits=bits, kv_group_size=32)
    one = m.ops.to_numpy(m(TOKENS, m.make_cache(1, max_len=48, settings=s)))
    c = m.make_cache(1, max_len=48, settings=s)
    assert isinstance(c, QuantizedKVCache)
    parts = [m.ops.to_numpy(m(TOKENS[:, :30], c))] + [m.ops.to_numpy(m(TOKENS[:, i:i + 1], c)) for i in range(30, 48)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), one, atol=1e-4)
    full = m.make_cache(1, max_len=48)  # the backend's default float cache (numpy: float16)
    m(TOKENS, full)
    assert c.nbytes / full.nbytes == pytest.approx(kv_element_bytes(m.ops.float_bytes, bits, 32) / m.ops.kv_bytes)
    assert c.trim(5) == 5 and c.offset == 43  # speculative rollback works as on KVCache
    float_logits = m.ops.to_numpy(m(TOKENS, m.make_cache()))
    assert np.abs(one - float_logits).max() < (0.1 if bits == 8 else 1.0)  # close, not equal: it is quantized


# -- rotating KV -------------------------------------------------------------------------------------------------

class _Selecting(KVCache):
    """Reference: keeps every position, attends to the first `keep` and the latest max_size - keep."""

    def __init__(self, *a, max_size, keep):
        super().__init__(*a, 1000, grow=True, dtype=for_backend(None, a[0]).kv_dtype)  # the cache it stands beside
        self.max_size, self.keep = max_size, keep

    def update(self, layer, k, v):
        ks, vs = super().update(layer, k, v)
        T = ks.shape[2]
        if k.shape[2] == 1 and T > self.max_size:
            start = T - (self.max_size - self.keep)
            return tuple(self.ops.concatenate([a[:, :, :self.keep], a[:, :, start:]], axis=2) for a in (ks, vs))
        return ks, vs


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize("prompt", [10, 40])  # the prompt fits in the window / overflows it in one chunk
def test_rotating_cache_keeps_sinks_and_the_latest(backend, prompt):
    m = tiny_model(backend)
    a = m.args
    shape = (m.ops, a.num_hidden_layers, 1, a.num_key_value_heads, a.head_dim)
    toks = np.random.default_rng(3).integers(3, 400, (1, 90))
    rot = m.make_cache(1, settings=CacheSettings(max_kv_size=24, keep=4))
    assert isinstance(rot, RotatingKVCache)
    ref = _Selecting(*shape, max_size=24, keep=4)
    got = [m.ops.to_numpy(m(toks[:, :prompt], rot))]
    want = [m.ops.to_numpy(m(toks[:, :prompt], ref))]
    for i in range(prompt, 90):
        got.append(m.ops.to_numpy(m(toks[:, i:i + 1], rot)))
        want.append(m.ops.to_numpy(m(toks[:, i:i + 1], ref)))
    np.testing.assert_allclose(np.concatenate(got, 1), np.concatenate(want, 1), atol=1e-4)
    assert rot.offset == 90 and rot.nbytes <= 2 * 2 * 24 * 2 * 32 * m.ops.kv_bytes


def test_rotating_cache_trims_until_it_wraps():
    m = tiny_model()
    c = m.make_cache(1, settings=CacheSettings(max_kv_size=16))
    m(TOKENS[:, :10], c)
    assert c.trim(3) == 3 and c.offset == 7
    m(TOKENS[:, :20], c)
    with pytest.raises(UsageError, match="cannot roll back"):
        c.trim(1)


def test_cache_settings_refuse_bad_values():
    for bad in (CacheSettings(kv_bits=3), CacheSettings(kv_group_size=48), CacheSettings(max_kv_size=4)):
        with pytest.raises(UsageError):
            bad.validate(64)
    CacheSettings(kv_bits=8, max_kv_size=64).validate(64)  # quantized and rotating combine


def test_quantized_rotating_cache_equals_a_quantized_cache_until_it_wraps_then_keeps_the_window():
    m = tiny_model()
    both = m.make_cache(1, settings=CacheSettings(kv_bits=8, kv_group_size=32, max_kv_size=16))
    quant = m.make_cache(1, settings=CacheSettings(kv_bits=8, kv_group_size=32))
    np.testing.assert_array_equal(m(TOKENS[:, :10], both), m(TOKENS[:, :10], quant))
    m(TOKENS[:, 10:30], both)
    assert both.offset == 30 and both.stored == 16 and both.nbytes < quant.nbytes * 30 / 10
    assert both.prefix_length(30) == 0 and quant.prefix_length(10) == 10


# -- memory: fit check and wired limit ----------------------------------------------------------------------------

METAL = {"max_recommended_working_set_size": 10 * 2**30, "memory_size": 16 * 2**30, "device_name": "Apple M2"}


def test_wired_limit_is_weights_plus_kv_never_the_whole_working_set():
    plan = memory.plan_wired(3 * 2**30, 2**30, METAL)
    assert plan.limit == 4 * 2**30 and plan.warning is None
    big = memory.plan_wired(12 * 2**30, 2**30, METAL)
    assert big.limit == METAL["max_recommended_working_set_size"]
    assert "12.88 GB" in big.warning and "10.74 GB" in big.warning and "iogpu.wired_limit_mb=" in big.warning
    assert memory.plan_wired(3 * 2**30, 2**30, {"device_name": "AMD EPYC"}).limit is None  # not Metal: untouched


def test_wired_limit_is_set_around_generation_and_restored(capsys):
    m = tiny_model()
    calls = []

    def set_limit(n):
        calls.append(n)
        return 123

    with memory.wired_limit(m, 1000, info=METAL, set_limit=set_limit, synchronize=lambda: calls.append("sync")):
        assert calls == [m.resident_nbytes + 1000]
    assert calls[1:] == ["sync", 123]
    huge = dict(METAL, max_recommended_working_set_size=1000)
    for _ in range(2):
        with memory.wired_limit(m, 0, info=huge, set_limit=lambda n: 0):
            pass
    assert capsys.readouterr().err.count("warning: the model's weights") == 1  # once


def test_device_memory_from_injected_information():
    d = memory.device_memory(info=METAL)
    assert d.metal and d.usable == METAL["max_recommended_working_set_size"]
    d = memory.device_memory(meminfo="MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert d.usable == 2048 * 1024 and d.what == "MemAvailable"


def test_fit_line_refuses_with_the_numbers_and_the_ways_out():
    m = tiny_model()
    need = memory.memory_need(m.args, m.resident_nbytes, 200_000, 1, 2, CacheSettings())
    room = need.weights + need.activations + need.kv // 2  # 8-bit KV (0.53x) does not fit; 4-bit (0.28x) does
    dev = memory.DeviceMemory(usable=room, what="test", metal=True, total=int(need.total * 2))
    line = memory.fit_line(need, dev, m.args)
    assert "does not fit" in line and "--ctx " in line and "--kv-bits 4" in line
    assert "sudo sysctl iogpu.wired_limit_mb=" in line and "\n" not in line
    with pytest.raises(memory.DoesNotFit):
        memory.ensure_fits(need, dev, m.args)
    ctx = int(line.split("--ctx ")[1].split(",")[0])
    assert memory.fits(memory.memory_need(m.args, m.resident_nbytes, ctx, 1, 2, CacheSettings()), dev)


def test_generate_refuses_before_allocating(monkeypatch):
    from mlxllama.generate import generate_step, stream_generate

    m = tiny_model()
    monkeypatch.setattr(memory, "device_memory", lambda ops=None, **k: memory.DeviceMemory(1000, "test"))

    class Tok:
        eos_ids, vocab_size = [2], 400

    with pytest.raises(memory.DoesNotFit, match="does not fit"):
        next(stream_generate(m, Tok(), [5, 6, 7], max_tokens=4))
    assert len(list(generate_step(m, [5, 6, 7], 4))) == 4  # the step function itself does not check


def test_prepared_nbytes_predicts_the_layout(smollm2):
    from mlxllama import api

    for backend, mode in (("numpy", "quantized"), ("numpy", "fused"), ("mlx", None)):
        ops = get_ops(backend, numpy_weights=mode)
        args, weights, _ = api.load_weights(str(smollm2))
        predicted = memory.weights_resident(weights, ops)
        assert Model(args, weights, ops, release=True).resident_nbytes == predicted


def test_fit_command_refuses_with_exit_2(tiny_hf):
    from typer.testing import CliRunner

    from mlxllama_cli.app import app

    r = CliRunner().invoke(app, ["fit", "-m", str(tiny_hf), "--ctx", "100000000", "--chip", "M1"])
    assert r.exit_code == 2 and r.output.count("does not fit") == 2 and "M1 16 GB" in r.output
    r = CliRunner().invoke(app, ["fit", "-m", str(tiny_hf), "--ctx", "256", "--batch", "2"])
    assert r.exit_code == 0 and r.output.startswith("memory: weights") and "ctx 256 x batch 2" in r.output
    assert r.output.rstrip().endswith(": fits")


def test_chip_memory_sizes():
    from mlxllama.bench.chips import lookup, memory_sizes_gb

    assert memory_sizes_gb(lookup("M2 Max")) == (32, 64, 96)
    assert memory_sizes_gb(lookup("H200")) == (141,)
    small, *_ = memory.chip_memories(lookup("M1"), memory_sizes_gb(lookup("M1")))
    assert small.usable == int(8 * 2**30 * 2 / 3) and small.metal


# -- perplexity and KL -------------------------------------------------------------------------------------------

def test_perplexity_scores_the_second_half_of_each_window():
    from mlxllama.perplexity import log_softmax, make_windows, perplexity

    m = tiny_model()
    toks = np.random.default_rng(4).integers(3, 400, 70)
    r = perplexity(m, toks, ctx=16, batch=2, bos_id=1)
    w = make_windows(toks, 16, bos_id=1)
    assert w.shape == (4, 16) and (w[:, 0] == 1).all()
    nll = []
    for win in w:
        lp = log_softmax(m.ops.to_numpy(m(win[None], m.make_cache()))[0])
        nll += [-lp[i, win[i + 1]] for i in range(8, 15)]
    assert r.tokens == len(nll) == 28
    assert r.ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)
    assert r.ppl_err == pytest.approx(r.ppl * np.std(nll) / np.sqrt(len(nll) - 1), rel=1e-4)


def test_kl_against_itself_and_saved_logits(tmp_path):
    from mlxllama.perplexity import perplexity

    m, other = tiny_model(), tiny_model(seed=1)
    toks = np.random.default_rng(5).integers(3, 400, 64)
    same = perplexity(m, toks, ctx=16, base=m)
    assert same.kl.mean < 1e-6 and same.kl.top1 == 1.0
    saved = tmp_path / "base.npz"
    direct = perplexity(m, toks, ctx=16, base=other, save_logits=saved)
    assert not list(tmp_path.glob("*.tmp"))
    via_file = perplexity(m, toks, ctx=16, base=saved)
    assert via_file.kl.mean == pytest.approx(perplexity(m, toks, ctx=16, base=saved).kl.mean)
    assert direct.kl.mean > 0.01 and via_file.kl.mean < 1e-3  # the file holds m's own log-probs (float16)
    with pytest.raises(UsageError, match="other windows"):
        perplexity(m, toks, ctx=32, base=saved)


def test_trim_turns_drops_the_oldest_turns():
    from mlxllama.context import trim_turns

    class Tok:
        def apply_chat_template(self, msgs, add_generation_prompt=True):
            return " ".join(m["content"] for m in msgs)

        def encode(self, text):
            return [7] * len(text.split())

    msgs = [{"role": "user", "content": "a " * 10}, {"role": "assistant", "content": "b " * 10},
            {"role": "user", "content": "c " * 10}, {"role": "assistant", "content": "d " * 10},
            {"role": "user", "content": "e " * 5}]
    kept, dropped = trim_turns(Tok(), msgs, ctx=40, reply_tokens=10)
    assert dropped == 2 and kept == msgs[2:]
    assert trim_turns(Tok(), msgs, ctx=1000, reply_tokens=10) == (msgs, 0)


@pytest.mark.slow
def test_perplexity_agrees_with_llama_cpp(smollm2, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))  # restored after the test
    from perplexity_llamacpp import compare

    text = Path(__file__).parent.parent / "benchmarks" / "data" / "alice-ch1-2.txt"
    short = tmp_path / "short.txt"
    short.write_text(text.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    r = compare(smollm2, short, ctx=256)
    assert abs(r["ratio"] - 1) < 0.01
