"""MLX folders: what mlx-lm writes, mlxllama reads (and the other way round), with the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from mlxllama.backends import get_ops
from mlxllama.convert import convert_model
from mlxllama.loaders import load
from mlxllama.model import Model
from mlxllama.weights import QuantizedWeight

mx = pytest.importorskip("mlx.core", reason="mlx not installed")

SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=32)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, sp_dir):
    from conftest import make_hf_folder

    return make_hf_folder(tmp_path_factory.mktemp("tiny128"), tokenizer_dir=sp_dir, **SHAPE)


def mlx_lm_logits(folder, tokens):
    mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is the peer that defines the MLX folder layout")
    model, _ = mlx_lm.load(str(folder))
    return np.array(model(mx.array(tokens)).astype(mx.float32))


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32), (4, 128)])
def test_reads_folders_written_by_mlx_lm(tmp_path, tiny_hf, bits, group):
    mlx_lm = pytest.importorskip("mlx_lm")
    dst = tmp_path / f"q{bits}g{group}"
    mlx_lm.convert(str(tiny_hf), str(dst), quantize=True, q_group_size=group, q_bits=bits, dtype="float32")
    tokens = np.random.default_rng(0).integers(0, 400, (1, 20))
    want = mlx_lm_logits(dst, tokens)
    args, weights, _ = load(dst)
    assert args.quantization["bits"] == bits
    q = weights["model.layers.0.mlp.down_proj"]
    assert isinstance(q, QuantizedWeight) and (q.bits, q.group_size) == (bits, group)
    for backend in ("numpy", "mlx"):
        model = Model(args, weights, get_ops(backend))
        got = model.ops.to_numpy(model(tokens, model.make_cache()))
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)


def test_mlx_lm_reads_our_quantized_folder(tmp_path, tiny_hf):
    dst = convert_model(str(tiny_hf), tmp_path / "ours", quantize=True, bits=4, group_size=64, dtype="float32")
    tokens = np.random.default_rng(1).integers(0, 400, (1, 20))
    want = mlx_lm_logits(dst, tokens)
    args, weights, _ = load(dst)
    model = Model(args, weights, get_ops("mlx"))
    got = model.ops.to_numpy(model(tokens, model.make_cache()))
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)


def test_our_quantization_equals_mlx_lm_bit_for_bit(tmp_path, tiny_hf):
    mlx_lm = pytest.importorskip("mlx_lm")
    theirs = tmp_path / "theirs"
    mlx_lm.convert(str(tiny_hf), str(theirs), quantize=True, q_group_size=64, q_bits=4, dtype="float16")
    ours = convert_model(str(tiny_hf), tmp_path / "ours", quantize=True, bits=4, group_size=64, dtype="float16")
    _, w_theirs, _ = load(theirs)
    _, w_ours, _ = load(ours)
    assert set(w_theirs) == set(w_ours)
    for k, a in w_theirs.items():
        b = w_ours[k]
        if isinstance(a, QuantizedWeight):
            np.testing.assert_array_equal(a.weight, b.weight, err_msg=k)
            np.testing.assert_array_equal(a.scales, b.scales, err_msg=k)
            np.testing.assert_array_equal(a.biases, b.biases, err_msg=k)
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
