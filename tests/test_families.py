"""Every family through the one forward pass, against transformers: tiny random models built here with
transformers itself (Mistral with a sliding window, Qwen2 with q/k/v biases and tied embeddings, Qwen3 with per-head
q/k norms and a head_dim that is not hidden / heads, LLaMA with attention_bias), read from the HF folder, from a
GGUF written with gguf's writer, and from an MLX folder that mlx-lm loads too."""

from __future__ import annotations

import importlib.util
import json
import shutil

import gguf
import numpy as np
import pytest

from conftest import full_kv
from mlxllama import loaders
from mlxllama.backends import get_ops
from mlxllama.config import from_hf_dict
from mlxllama.errors import ConfigError
from mlxllama.loaders.gguf import load_gguf
from mlxllama.model import Model

torch = pytest.importorskip("torch", reason="family tests build their models with torch (CI installs it)")
transformers = pytest.importorskip("transformers", reason="family tests need transformers (CI installs it)")

HAS_MLX = importlib.util.find_spec("mlx") is not None
BACKENDS = ["numpy", pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx not installed"))]
SHAPE = dict(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, head_dim=16)),
}
GGUF_ARCH = {"mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "llama_bias": "llama"}


def build(folder, family: str, sp_dir, seed: int):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**SHAPE, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # weights far from the tiny default init, so that logits differ visibly between tokens
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / (p.shape[-1] ** 0.5 if "embed" not in name else 1.0))
    model.save_pretrained(folder)
    shutil.copy(sp_dir / "tokenizer.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                              "eos_token": "</s>", "unk_token": "<unk>"}))
    return model


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, sp_dir):
    out = {}
    for i, family in enumerate(FAMILIES):
        folder = tmp_path_factory.mktemp(family)
        out[family] = (folder, build(folder, family, sp_dir, seed=i))
    return out


TOKENS = np.random.default_rng(7).integers(3, 400, (2, 40))


def reference(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def chunked_logits(model: Model) -> np.ndarray:
    """Prefill in uneven chunks, then single-token steps: the cache, the offsets and the window all take part."""
    cache = model.make_cache(batch_size=2, settings=full_kv(model.ops))
    parts = [model(TOKENS[:, :13], cache), model(TOKENS[:, 13:30], cache)]
    parts += [model(TOKENS[:, i: i + 1], cache) for i in range(30, 40)]
    return np.concatenate([model.ops.to_numpy(p) for p in parts], axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_folder_matches_transformers(family_models, family, backend):
    folder, ref = family_models[family]
    args, weights, _ = loaders.load(folder)
    assert args.family == family.split("_")[0]
    model = Model(args, weights, get_ops(backend))
    np.testing.assert_allclose(chunked_logits(model), reference(ref), atol=2e-4, rtol=1e-4)


def test_switches_come_from_the_config(family_models):
    got = {f: loaders.load(family_models[f][0])[0] for f in FAMILIES}
    assert got["mistral"].sliding_window == 8 and not got["mistral"].qkv_bias
    assert got["qwen2"].qkv_bias and not got["qwen2"].o_bias and got["qwen2"].tie_word_embeddings
    assert got["qwen3"].qk_norm and got["qwen3"].head_dim == 24 and not got["qwen3"].qkv_bias
    assert got["llama_bias"].qkv_bias and got["llama_bias"].o_bias and not got["llama_bias"].qk_norm


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row order for LLaMA-style models (interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, family: str, args, weights: dict) -> None:
    """The model as llama.cpp's converter lays it out: its tensor names, its metadata keys, q/k rows permuted
    for LLaMA-style families only."""
    from mlxllama.families import GGUF_TO_INTERNAL

    arch = GGUF_ARCH[family]
    to_gguf = {v: k for k, v in GGUF_TO_INTERNAL.items()}
    w = gguf.GGUFWriter(path, arch)
    for key, value in [("block_count", args.num_hidden_layers), ("context_length", args.max_position_embeddings),
                       ("embedding_length", args.hidden_size), ("feed_forward_length", args.intermediate_size),
                       ("attention.head_count", args.num_attention_heads),
                       ("attention.head_count_kv", args.num_key_value_heads),
                       ("attention.key_length", args.head_dim), ("attention.value_length", args.head_dim)]:
        w.add_uint32(f"{arch}.{key}", value)
    if args.sliding_window:
        w.add_uint32(f"{arch}.attention.sliding_window", args.sliding_window)
    w.add_float32(f"{arch}.rope.freq_base", args.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", args.rms_norm_eps)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(args.vocab_size)])
    for name, t in weights.items():
        parts = name.split(".")
        key = "model.layers.{i}." + ".".join(parts[3:]) if name.startswith("model.layers.") else name
        gname = to_gguf[key].format(i=parts[2] if name.startswith("model.layers.") else "")
        data = np.asarray(t, np.float32)
        if arch == "llama" and ".q_proj" in name:
            data = _permute(data, args.num_attention_heads)
        elif arch == "llama" and ".k_proj" in name:
            data = _permute(data, args.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_gives_the_same_logits(family_models, family, tmp_path):
    folder, ref = family_models[family]
    args, weights, _ = loaders.load(folder)
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, family, args, weights)
    gargs, gweights, _ = load_gguf(path)
    for switch in ("qkv_bias", "o_bias", "qk_norm", "sliding_window", "head_dim", "tie_word_embeddings"):
        assert getattr(gargs, switch) == getattr(args, switch), switch
    model = Model(gargs, gweights, get_ops("numpy"))
    np.testing.assert_allclose(chunked_logits(model), reference(ref), atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm not installed")
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_converted_folder_loads_in_mlx_lm(family_models, family, tmp_path):
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_lm_load

    from mlxllama.convert import convert_model

    folder, ref = family_models[family]
    dst = convert_model(folder, tmp_path / "mlx", dtype="float32")
    theirs, _ = mlx_lm_load(str(dst))
    got = np.array(theirs(mx.array(TOKENS[:, :8])).astype(mx.float32))
    want = reference(ref)[:, :8]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    args, weights, _ = loaders.load(dst)  # and it reads back as the same family
    assert args.family == family


@pytest.mark.parametrize("arch,model_type", [("MixtralForCausalLM", "mixtral"), ("Qwen3MoeForCausalLM", "qwen3_moe"),
                                             (None, "qwen2_moe")])
def test_mixture_of_experts_is_refused_by_name(arch, model_type):
    cfg = dict(SHAPE, model_type=model_type, **({"architectures": [arch]} if arch else {}))
    with pytest.raises(ConfigError, match=f"{arch or model_type}' is a mixture-of-experts model"):
        from_hf_dict(cfg, "config.json")


def test_unknown_architecture_names_what_is_supported():
    with pytest.raises(ConfigError, match="unsupported architecture.*GPT2LMHeadModel.*Qwen3ForCausalLM"):
        from_hf_dict(dict(SHAPE, architectures=["GPT2LMHeadModel"]), "config.json")


def test_partly_sliding_layers_are_refused():
    cfg = dict(SHAPE, architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=16)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        from_hf_dict(cfg, "config.json")
