"""The one forward pass, on both backends, against HF transformers (an independent implementation)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import full_kv, make_hf_folder
from mlxllama.backends import get_ops
from mlxllama.loaders import load
from mlxllama.model import Model

BACKENDS = ["numpy", pytest.param("mlx", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlx") is None, reason="mlx not installed"))]

VARIANTS = {
    "gqa": {},
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1),
    "llama3_rope": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "linear_rope": dict(rope_scaling={"type": "linear", "factor": 2.0}),
}


def reference_logits(folder, tokens):
    torch = pytest.importorskip("torch", reason="reference tests need torch (CI installs it)")
    transformers = pytest.importorskip("transformers", reason="reference tests need transformers (CI installs it)")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return ref(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def variant_folders(tmp_path_factory, sp_dir):
    return {name: make_hf_folder(tmp_path_factory.mktemp(name), seed=i, tokenizer_dir=sp_dir, **kw)
            for i, (name, kw) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant_folders, variant, backend):
    folder = variant_folders[variant]
    tokens = np.random.default_rng(1).integers(0, 400, (2, 80))  # batch of 2, beyond llama3's 64-token window
    want = reference_logits(folder, tokens)
    args, weights, _ = load(folder)
    model = Model(args, weights, get_ops(backend))
    cache = model.make_cache(batch_size=2, settings=full_kv(model.ops))
    # prefill in uneven chunks, then single-token decode steps: exercises the cache and the causal offsets
    parts = [model(tokens[:, :33], cache), model(tokens[:, 33:70], cache)]
    parts += [model(tokens[:, i: i + 1], cache) for i in range(70, 80)]
    got = np.concatenate([model.ops.to_numpy(p) for p in parts], axis=1)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files(tmp_path, sp_dir, dtype):
    pytest.importorskip("torch", reason="bf16 files are written with torch")
    folder = make_hf_folder(tmp_path / dtype, dtype=dtype, tokenizer_dir=sp_dir)
    tokens = np.random.default_rng(2).integers(0, 400, (1, 24))
    want = reference_logits(folder, tokens)
    args, weights, _ = load(folder)
    assert args.torch_dtype == dtype
    model = Model(args, weights, get_ops("numpy"))
    got = model.ops.to_numpy(model(tokens, model.make_cache()))
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)


def test_sharded_safetensors(tmp_path, tiny_hf):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_hf, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname))
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    a1, w1, _ = load(tiny_hf)
    a2, w2, _ = load(folder)
    assert set(w1) == set(w2)
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k])


@pytest.mark.skipif(__import__("importlib").util.find_spec("mlx") is None, reason="mlx not installed")
def test_numpy_and_mlx_same_greedy_tokens(tiny_hf):
    import mlxllama

    outs = []
    for backend in ("numpy", "mlx"):
        model, tok = mlxllama.load(str(tiny_hf), backend=backend)
        outs.append([r.token for r in mlxllama.stream_generate(model, tok, "The quick brown", max_tokens=24)])
    assert outs[0] == outs[1]
    assert len(outs[0]) >= 1
