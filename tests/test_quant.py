"""mlxllama.quant against MLX: quantize/dequantize bit for bit, packing, matmul, whole-model quantization."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlxllama.config import ModelArgs
from mlxllama.errors import UsageError
from mlxllama.quant import (BITS, dequantize, is_quantizable, pack, quantize, quantize_weights, quantized_matmul,
                            unpack)
from mlxllama.weights import QuantizedWeight, check_weights, expected_shapes

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DISTRIBUTIONS = ("normal", "uniform", "constant", "zeros", "outlier", "negative", "huge", "ties")


def mlx():
    return pytest.importorskip("mlx.core", reason="comparison against MLX needs mlx installed")


def assert_bits_equal(a, b):
    """Same dtype, shape and bit pattern (so -0.0 != 0.0); NaNs must coincide but their payloads may differ."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if a.dtype.kind == "f":
        nan = np.isnan(a)
        np.testing.assert_array_equal(nan, np.isnan(b))
        a, b = np.where(nan, 0, a), np.where(nan, 0, b)
    as_uint = np.dtype(f"u{a.dtype.itemsize}")
    np.testing.assert_array_equal(a.view(as_uint), b.view(as_uint))


def make_weights(rng, rows, cols, dist, exponent, dtype):
    x = rng.standard_normal((rows, cols)) * 10.0 ** exponent
    if dist == "uniform":
        x = rng.uniform(-1, 1, (rows, cols)) * 10.0 ** exponent
    elif dist == "constant":
        x = np.full((rows, cols), rng.standard_normal() * 10.0 ** exponent)
        x[rows // 2:] = rng.standard_normal((rows - rows // 2, 1)) * 10.0 ** exponent  # one constant per row
    elif dist == "zeros":
        x[rng.integers(0, rows)] = 0.0
        x[:, : cols // 2] *= rng.integers(0, 2, cols // 2)  # sprinkle exact zeros (and -0.0 from negatives)
    elif dist == "outlier":
        x[rng.integers(0, rows), rng.integers(0, cols)] = 500.0 * rng.choice([-1, 1])
    elif dist == "negative":
        x = -np.abs(x) - rng.uniform(0, 2)
    elif dist == "huge":
        x = rng.uniform(-65504, 65504, (rows, cols))
        x[0, 0] = 65504.0
    elif dist == "ties":
        x = np.round(rng.standard_normal((rows, cols)) * 8) / 4  # many exact halves after scaling
    return x.astype(dtype)


cases = st.tuples(
    st.integers(0, 2**32 - 1),                 # seed
    st.integers(1, 16),                        # rows
    st.sampled_from([32, 64, 128]),            # group size
    st.integers(1, 4),                         # groups per row: cols up to 512
    st.sampled_from(BITS),
    st.sampled_from([np.float16, np.float32]),
    st.sampled_from(DISTRIBUTIONS),
    st.integers(-8, 3),                        # magnitude exponent
)


def mlx_quantize(mx, w, group_size, bits):
    return [np.array(a) for a in mx.quantize(mx.array(w), group_size=group_size, bits=bits)]


@FAST
@given(cases)
def test_quantize_and_dequantize_match_mlx_bit_for_bit(case):
    mx = mlx()
    seed, rows, group_size, groups, bits, dtype, dist, exponent = case
    cols = group_size * groups
    if (cols * bits) % 32:
        return
    w = make_weights(np.random.default_rng(seed), rows, cols, dist, exponent, dtype)
    qw = quantize(w, group_size, bits)
    mq, ms, mb = mlx_quantize(mx, w, group_size, bits)
    assert_bits_equal(qw.weight, mq)
    assert_bits_equal(qw.scales, ms)
    assert_bits_equal(qw.biases, mb)
    assert qw.shape == w.shape and qw.scales.dtype == w.dtype

    args = (mx.array(mq), mx.array(ms), mx.array(mb), group_size, bits)
    assert_bits_equal(dequantize(qw, dtype), np.array(mx.dequantize(*args)))
    assert_bits_equal(dequantize(qw, np.float32), np.array(mx.dequantize(*args, dtype=mx.float32)))


@FAST
@given(st.data(), st.sampled_from([np.float16, np.float32]), st.sampled_from([32, 64]), st.sampled_from([2, 3, 4, 8]))
def test_quantize_matches_mlx_on_arbitrary_finite_values(data, dtype, group_size, bits):
    """Adversarial element values: subnormals, signed zeros, repeated values, extremes of float16."""
    mx = mlx()
    rows = data.draw(st.integers(1, 4))
    elements = st.floats(width=16, allow_nan=False, allow_infinity=False)
    w = data.draw(hnp.arrays(dtype, (rows, group_size), elements=elements))
    qw = quantize(w, group_size, bits)
    mq, ms, mb = mlx_quantize(mx, w, group_size, bits)
    assert_bits_equal(qw.weight, mq)
    assert_bits_equal(qw.scales, ms)
    assert_bits_equal(qw.biases, mb)


def test_one_bit_bias_keeps_the_sign_of_the_first_minimal_zero():
    mx = mlx()
    w = np.zeros((2, 32), np.float32)
    w[0, 0], w[0, 1] = -0.0, 1.0
    w[1, 0], w[1, 1], w[1, 2] = 0.0, -0.0, 1.0
    qw = quantize(w, 32, 1)
    assert np.signbit(qw.biases[0, 0]) and not np.signbit(qw.biases[1, 0])
    _, _, mb = mlx_quantize(mx, w, 32, 1)
    assert_bits_equal(qw.biases, mb)


@FAST
@given(cases)
def test_quantized_matmul_close_to_mlx(case):
    mx = mlx()
    seed, rows, group_size, groups, bits, dtype, dist, exponent = case
    cols = group_size * groups
    if (cols * bits) % 32 or dist == "huge":
        return
    rng = np.random.default_rng(seed)
    qw = quantize(make_weights(rng, rows, cols, dist, exponent, dtype), group_size, bits)
    x = rng.standard_normal((2, 3, cols)).astype(np.float32)
    y = quantized_matmul(x, qw)
    assert y.shape == (2, 3, rows) and y.dtype == np.float32
    want = np.array(mx.quantized_matmul(mx.array(x), mx.array(qw.weight), mx.array(qw.scales),
                                        mx.array(qw.biases), transpose=True, group_size=group_size, bits=bits))
    w32 = dequantize(QuantizedWeight(qw.weight, qw.scales.astype(np.float32), qw.biases.astype(np.float32),
                                     group_size, bits))
    bound = 1e-5 * (np.abs(x) @ np.abs(w32).T) + 1e-30
    assert np.all(np.abs(y - want) <= bound)


@FAST
@given(st.integers(0, 2**32 - 1), st.sampled_from(BITS), st.integers(1, 3), st.integers(1, 4))
def test_pack_unpack_round_trip(seed, bits, rows, words):
    rng = np.random.default_rng(seed)
    n = 32 * words  # 32 values fill whole words whatever the width
    q = rng.integers(0, 1 << bits, (rows, n), dtype=np.uint8)
    packed = pack(q, bits)
    assert packed.dtype == np.uint32 and packed.shape == (rows, n * bits // 32)
    assert_bits_equal(unpack(packed, bits), q)
    assert_bits_equal(pack(unpack(packed, bits), bits), packed)


def test_pack_is_a_little_endian_bit_stream():
    q = np.array([[1, 2, 3, 4, 5, 6, 7, 0] * 4], np.uint8)
    words = pack(q, 4)
    assert words[0, 0] == 0x07654321
    for bits in (3, 5, 6):
        qb = np.random.default_rng(bits).integers(0, 1 << bits, (1, 32), dtype=np.uint8)
        stream = "".join(format(int(v), f"0{bits}b")[::-1] for v in qb[0])  # LSB first per value
        expect = [int(stream[i:i + 32][::-1], 2) for i in range(0, len(stream), 32)]
        assert pack(qb, bits)[0].tolist() == expect


def test_pack_matches_mlx_layout_for_every_width():
    """With scale 1 and bias 0, mx.dequantize of our packed words gives back the values themselves."""
    mx = mlx()
    rng = np.random.default_rng(0)
    for bits in BITS:
        q = rng.integers(0, 1 << bits, (3, 64), dtype=np.uint8)
        ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
        got = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=32, bits=bits)
        assert_bits_equal(np.array(got), q.astype(np.float32))


@FAST
@given(st.integers(0, 2**32 - 1), st.sampled_from(BITS), st.sampled_from(DISTRIBUTIONS[:-1]), st.integers(-3, 2))
def test_dequantize_round_trip_without_mlx(seed, bits, dist, exponent):
    """Unclipped values land within half a step; the edge of each group and zero are exact."""
    w = make_weights(np.random.default_rng(seed), 4, 128, dist, exponent, np.float32)
    qw = quantize(w, 32, bits)
    back = dequantize(qw).reshape(4, 4, 32)
    g = w.reshape(4, 4, 32)
    scale, bias = qw.scales[..., None], qw.biases[..., None]
    r = np.rint((g - bias) / scale)
    inside = (r >= 0) & (r <= (1 << bits) - 1)
    err = np.abs(back - g)
    assert np.all(err[inside] <= (np.abs(scale) * 0.5 * (1 + 1e-5) + 1e-30 + np.abs(g) * 1e-6)[inside])
    assert np.all(np.isin(bias, g) | (bias == 0))  # the bias is one of the group's values (or zero)
    if bits > 1:  # zero is on the grid, up to the rounding of scale = edge / q0
        zeros = np.broadcast_to(np.abs(bias) * 1e-6 + 1e-30, g.shape)[g == 0]
        assert np.all(np.abs(back[g == 0]) <= zeros)
    if bits == 8:
        assert np.all(err <= np.abs(scale))
def test_dequantize_computes_in_the_scales_dtype():
    q = pack(np.arange(32, dtype=np.uint8).reshape(1, 32) % 16, 4)
    scales = np.array([[0.1]], np.float16)
    biases = np.array([[-0.7]], np.float16)
    w = dequantize(QuantizedWeight(q, scales, biases, 32, 4))
    expect = (np.arange(32) % 16).astype(np.float16) * scales[0, 0] + biases[0, 0]
    assert w.dtype == np.float32
    assert_bits_equal(w[0], expect.astype(np.float32))
    assert dequantize(QuantizedWeight(q, scales, biases, 32, 4), np.float16).dtype == np.float16


def test_quantize_does_not_import_mlx():
    code = ("import sys; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None\n"
            "import numpy as np\nfrom mlxllama.quant import quantize, dequantize\n"
            "qw = quantize(np.ones((2, 64), np.float16), 64, 4); print(dequantize(qw).sum())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 128.0


@pytest.mark.parametrize("call", [
    lambda: quantize(np.zeros((2, 64), np.float32), 48, 4),
    lambda: quantize(np.zeros((2, 64), np.float32), 64, 7),
    lambda: quantize(np.zeros((2, 96), np.float32), 64, 4),
    lambda: quantize(np.zeros((64,), np.float32), 64, 4),
    lambda: quantize(np.zeros((2, 64), np.int32), 64, 4),
    lambda: quantize(np.full((2, 64), np.nan, np.float32), 64, 4),
    lambda: pack(np.full((1, 8), 16, np.uint8), 4),
    lambda: pack(np.zeros((1, 7), np.uint8), 4),
    lambda: unpack(np.zeros((1, 2), np.int32), 4),
    lambda: quantized_matmul(np.zeros((1, 32), np.float32), quantize(np.zeros((2, 64), np.float32), 64, 4)),
])
def test_invalid_arguments_raise_usage_error(call):
    with pytest.raises(UsageError):
        call()


def tiny_model(rng, tied=False):
    args = ModelArgs(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                     torch_dtype="bfloat16")
    weights = {}
    for name, shape in expected_shapes(args).items():
        weights[name] = rng.standard_normal(shape).astype(np.float32) * 0.1
    return weights, args


def test_quantize_weights_matches_mlx_and_keeps_norms_float():
    mx = mlx()
    weights, args = tiny_model(np.random.default_rng(0))
    out, qargs = quantize_weights(weights, args, group_size=32, bits=4, dtype=np.float16)
    assert qargs.quantization == {"group_size": 32, "bits": 4} and qargs.torch_dtype == "float16"
    check_weights(out, qargs, "quantized")
    for name, w in weights.items():
        if name.endswith("norm") or name.endswith("layernorm"):
            assert not is_quantizable(name)
            assert out[name].dtype == np.float16
            assert_bits_equal(out[name], w.astype(np.float16))
            continue
        assert is_quantizable(name), name
        qw = out[name]
        mq, ms, mb = mlx_quantize(mx, w.astype(np.float16), 32, 4)
        assert_bits_equal(qw.weight, mq)
        assert_bits_equal(qw.scales, ms)
        assert_bits_equal(qw.biases, mb)


def test_quantize_weights_requantizes_only_when_parameters_differ():
    weights, args = tiny_model(np.random.default_rng(1), tied=True)
    q8, args8 = quantize_weights(weights, args, group_size=64, bits=8)
    again, _ = quantize_weights(q8, args8, group_size=64, bits=8)
    assert all(again[k] is q8[k] for k in q8 if isinstance(q8[k], QuantizedWeight))
    q4, args4 = quantize_weights(q8, args8, group_size=32, bits=4, dtype=np.float32)
    name = "model.layers.1.mlp.down_proj"
    expect = quantize(dequantize(q8[name], np.float32), 32, 4)
    assert (q4[name].bits, q4[name].group_size) == (4, 32)
    assert_bits_equal(q4[name].weight, expect.weight)
    assert_bits_equal(q4[name].scales, expect.scales)
    assert "lm_head" not in q4 and isinstance(q4["model.embed_tokens"], QuantizedWeight)
    check_weights(q4, args4, "requantized")


def test_quantize_weights_rejects_widths_the_group_does_not_divide():
    weights, args = tiny_model(np.random.default_rng(2))
    with pytest.raises(UsageError, match=r"tensor model\.embed_tokens of shape \(40, 64\) cannot be quantized"):
        quantize_weights(weights, args, group_size=128, bits=4)
