"""Issue 24: the float16 KV cache (llama.cpp's default cache type) and llama.cpp's activation rounding, emulated
bit for bit (kquants.q8_0_values / q8_k_values against gguf's reference quantizers and the C definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY, random_weights  # noqa: F401  (tiny_model's config)
from mlxllama import accounting, memory
from mlxllama.backends import kquants
from mlxllama.cache import CacheSettings, KVCache, RotatingKVCache, for_backend, kv_element_bytes
from mlxllama.errors import UsageError
from test_kquants import tiny_quants  # noqa: F401  (a fixture)
from test_memkv import TOKENS, tiny_model


# -- float16 KV cache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_float16_cache_stores_half_and_reads_back_the_rounded_values(backend):
    m = tiny_model(backend)
    s = CacheSettings(kv_dtype="float16")
    c = m.make_cache(1, max_len=48, settings=s)
    assert type(c) is KVCache and c.dtype == "float16"
    k = m.ops.asarray(np.random.default_rng(0).standard_normal((1, 2, 5, 32)))
    k = k.astype(m.ops.float_dtype)
    ks, _ = c.update(0, k, k)
    back = m.ops.to_numpy(ks)
    # widened to the backend's dtype on reading, unless its attention reads float16 as stored (attends_half)
    assert back.dtype == (np.float16 if m.ops.attends_half else np.float32)
    np.testing.assert_array_equal(back.astype(np.float32), m.ops.to_numpy(k).astype(np.float16).astype(np.float32))
    assert "float16" in str(c.keys[0][0].dtype)


@pytest.mark.parametrize("L", [1, 7, 40])
def test_numpy_attends_to_a_float16_cache_as_stored(L):
    """numpy's attention takes float16 K/V as the cache holds them (attends_half): a prompt's compiled rows read
    their bits, the numpy blocks widen them; either way the result is attention over the widened values, to float32
    rounding. (Bit for bit in a fresh process; once, after the whole suite on a Zen 3, 4 of 42 rows differed in the
    last bit, 6e-8: the float16 and float32 readings are separately compiled code.)"""
    from mlxllama.backends.numpy_ops import NumpyOps

    ops = NumpyOps(threads=2)
    rng = np.random.default_rng(L)
    q = rng.standard_normal((1, 6, L, 64)).astype(np.float32)
    k, v = (rng.standard_normal((1, 3, 50, 64)).astype(np.float16) for _ in range(2))
    for window in (None, 20):
        got = ops.attention(q, k, v, 0.125, causal=True, window=window)
        want = ops.attention(q, k.astype(np.float32), v.astype(np.float32), 0.125, causal=True, window=window)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_an_unset_kv_dtype_is_the_backends_choice_and_counted_as_held(backend):
    """numpy keeps a float cache as float16 unless asked for float32; MLX in its activations' dtype (float32 on the
    CPU). for_backend says so once (its answer comes back unchanged), and the byte counts are the buffers' bytes."""
    m = tiny_model(backend)
    ops, a = m.ops, m.args
    want = {"numpy": "float16", "mlx": None}[backend]
    assert ops.kv_dtype == want and for_backend(None, ops).kv_dtype == want
    for s in (None, CacheSettings(kv_dtype="float32"), CacheSettings(kv_dtype="float16"),
              CacheSettings(kv_bits=8, kv_group_size=32)):
        r = for_backend(s, ops)
        assert for_backend(r, ops) == r
        c = m.make_cache(1, max_len=40, settings=s)
        m(TOKENS[:, :40], c)
        stored = "float16" if r.kv_dtype == "float16" else "float32"
        assert r.kv_bits or stored in str(c.keys[0][0].dtype)
        assert c.bytes_per_position * 40 == c.nbytes
        assert accounting.kv_bytes(a, 40, 1, ops.float_bytes, r) == c.nbytes
    assert ops.kv_bytes == (2 if backend == "numpy" else 4)


def test_a_float32_cache_is_refused_where_the_backend_computes_in_float16():
    mx = pytest.importorskip("mlx.core")
    from mlxllama.backends.mlx_ops import MLXOps

    with pytest.raises(UsageError, match="--kv-dtype float32: the mlx backend computes in 16-bit floats"):
        for_backend(CacheSettings(kv_dtype="float32"), MLXOps(dtype=mx.float16))


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_float16_cache_decodes_like_one_pass_and_counts_two_bytes(backend):
    m = tiny_model(backend)
    s = CacheSettings(kv_dtype="float16")
    one = m.ops.to_numpy(m(TOKENS, m.make_cache(1, max_len=48, settings=s)))
    c = m.make_cache(1, max_len=48, settings=s)
    parts = [m.ops.to_numpy(m(TOKENS[:, :30], c))] + [m.ops.to_numpy(m(TOKENS[:, i:i + 1], c)) for i in range(30, 48)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), one, atol=1e-4)
    full = m.make_cache(1, max_len=48)
    float_logits = m.ops.to_numpy(m(TOKENS, full))
    assert np.abs(one - float_logits).max() < 0.05  # close, not equal: K and V are rounded to float16
    assert c.nbytes / full.nbytes == pytest.approx(2 / m.ops.kv_bytes)
    assert c.bytes_per_position == accounting.kv_bytes_per_position(m.args, m.ops.kv_bytes, s)
    assert kv_element_bytes(4, kv_dtype="float16") == 2.0


def test_float16_rotating_cache_and_prefix_roundtrip():
    m = tiny_model()
    s = CacheSettings(kv_dtype="float16", max_kv_size=20)
    c = m.make_cache(1, max_len=48, settings=s)
    assert isinstance(c, RotatingKVCache) and c.dtype == "float16"
    m(TOKENS[:, :16], c)
    kv = c.prefix(16)
    fresh = m.make_cache(1, max_len=48, settings=CacheSettings(kv_dtype="float16"))
    fresh.load_prefix(kv, 16)
    assert all(a.dtype == np.float16 for a in fresh.state())
    np.testing.assert_array_equal(fresh.keys[-1][0][:, :, :16], c.keys[-1][0][:, :, :16])


def test_float16_settings_validate_and_fit_counts_them():
    with pytest.raises(UsageError, match="--kv-dtype must be float16"):
        CacheSettings(kv_dtype="bfloat16").validate()
    with pytest.raises(UsageError, match="does not combine with --kv-bits"):
        CacheSettings(kv_dtype="float16", kv_bits=8).validate()
    m = tiny_model()
    need32 = memory.memory_need(m.args, 1000, ctx=256, float_bytes=4)
    need16 = memory.memory_need(m.args, 1000, ctx=256, float_bytes=4, settings=CacheSettings(kv_dtype="float16"))
    assert need16.kv * 2 == need32.kv and need16.kv_label == "16-bit"


# -- llama.cpp's activation rounding ---------------------------------------------------------------------------

def _rows(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((3, n)).astype(np.float32)
    x[0, 5] = 300.0  # an outlier, as SmolLM2's residual stream has
    x[1, 40:72] = 0.0  # an all-zero block
    x[2, ::7] *= -20
    return x


def test_q8_0_values_are_ggufs_reference_blocks():
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as T

    x = _rows(512)
    values, q, d = kquants.q8_0_values(x)
    blocks = gq.quantize(x, T.Q8_0).reshape(3, -1, 34)
    ref_d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    ref_q = blocks[..., 2:].view(np.int8).astype(np.float32)
    # gguf rounds x / d half away from zero; llama.cpp's AVX2 path x * (127 / amax) half to even: equal but at ties
    same = ref_q == q
    assert same.mean() > 0.999 and np.abs(ref_q - q).max() <= 1
    np.testing.assert_array_equal(ref_d, d.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(gq.dequantize(blocks.reshape(3, -1), T.Q8_0)[same.reshape(3, -1)],
                                  values[same.reshape(3, -1)])


def test_q8_0_rounds_ties_to_even_like_the_avx2_path():
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [127.0, 2.5, 3.5, -2.5]  # 127 / amax = 1: the products are the ties themselves
    _, q, _ = kquants.q8_0_values(x)
    assert q[0, 0, :4].tolist() == [127, 2, 4, -2]


def _q8_k_reference(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref, element by element (ggml-quants.c), then q * d."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 256):
            blk = x[r, b:b + 256]
            amax, mx = np.float32(0), np.float32(0)
            for v in blk:
                if abs(v) > amax:
                    amax, mx = np.float32(abs(v)), v
            if amax == 0:
                out[r, b:b + 256] = 0
                continue
            iscale = np.float32(-127) / mx
            q = [min(127, int(np.float32(v * iscale) + np.float32(12582912.0)) - 12582912) for v in blk]
            out[r, b:b + 256] = np.array(q, np.float32) * (np.float32(1) / iscale)
    return out


def test_q8_k_values_follow_the_c_reference():
    x = _rows(512, seed=1)
    np.testing.assert_array_equal(kquants.q8_k_values(x), _q8_k_reference(x))


def test_q8_1_sums_are_float16_of_d_times_the_sum():
    x = _rows(64, seed=2)
    _, q, d = kquants.q8_0_values(x)
    s = kquants.q8_1_sums(q, d)
    want = (d[..., 0] * q.sum(-1)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(s, want)
    values, sums = kquants.llamacpp_activations(x, "Q5_1")
    np.testing.assert_array_equal(sums, s)
    assert kquants.llamacpp_activations(x, "Q5_0")[1] is None


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q5_1", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("rows", [2, 40])  # the direct kernels and the BLAS path
def test_llamacpp_rounded_product_is_the_product_of_rounded_inputs(qtype, rows):
    from test_kquants import random_blocks
    from mlxllama.weights import GGMLWeight

    cols = 512
    w = GGMLWeight(qtype, random_blocks(qtype, 24, cols), (24, cols))
    lin = kquants.prepare_numpy([w])
    x = np.random.default_rng(3).standard_normal((rows, cols)).astype(np.float32)
    lin.activations = "llama.cpp"
    got = lin.matmul(x)
    xs, sums = kquants.llamacpp_activations(x, qtype)
    want = xs.astype(np.float64) @ kquants.dequantize(w).T.astype(np.float64)
    if sums is not None:  # Q4_1/Q5_1: the bias term takes llama.cpp's float16 sums
        want += (sums - xs.reshape(rows, -1, 32).sum(-1)) @ kquants._block_mins(w.blocks, 24).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    lin.activations = "float32"
    assert np.abs(lin.matmul(x) - got).max() > 1e-4  # the rounding is really applied


def test_fit_takes_kv_dtype_and_refuses_a_bad_one_in_one_line(tiny_hf):
    import subprocess
    import sys

    cli = [sys.executable, "-m", "mlxllama_cli.app", "fit", "-m", str(tiny_hf), "--ctx", "256", "--backend", "numpy"]
    ok = subprocess.run(cli + ["--kv-dtype", "float16"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "16-bit" in ok.stdout
    bad = subprocess.run(cli + ["--kv-dtype", "bfloat16"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --kv-dtype must be float16 or float32, got bfloat16"
    full = subprocess.run(cli + ["--kv-dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0 and "32-bit" in full.stdout, full.stderr


def test_the_benchmarks_rounding_switch_reaches_every_gguf_product(tiny_quants, monkeypatch):
    from pathlib import Path

    from mlxllama.backends import get_ops
    from mlxllama.cache import make_cache
    from test_kquants import _logits

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))  # restored after the test
    from perplexity_llamacpp import round_like_llamacpp

    plain, model = _logits(tiny_quants["Q4_K_M"], get_ops("numpy"))
    held = [model.embed, model.lm_head] + [w for layer in model.layers for w in layer]
    products = {id(w): w for w in held if isinstance(w, kquants.KQuantLinear)}
    assert round_like_llamacpp(model) == len(products) > 0
    assert all(w.activations == "llama.cpp" for w in products.values())
    tokens = model.ops.asarray(np.array([[1, 5, 9, 3]]))
    rounded = model.ops.to_numpy(model(tokens, make_cache(model.ops, model.args, 1)))
    assert np.isfinite(rounded).all() and rounded.shape[-1] == plain.shape[-1]
