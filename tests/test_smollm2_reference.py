"""The real SmolLM2-135M-Instruct Q4_1 GGUF: greedy tokens identical to HF transformers (which dequantizes the
GGUF to float32 with the gguf package), on both backends, for raw and chat prompts."""

from __future__ import annotations

import importlib.util

import pytest

import mlxllama

pytestmark = pytest.mark.slow

N_TOKENS = 16
RAW = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT = [[{"role": "user", "content": "What is 12 times 7?"}],
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Name three colours of the rainbow."}]]


@pytest.fixture(scope="module")
def reference(smollm2):
    torch = pytest.importorskip("torch", reason="the reference needs torch (CI installs it)")
    transformers = pytest.importorskip("transformers", reason="the reference needs transformers (CI installs it)")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF (CI installs it)")
    folder, name = str(smollm2.parent), smollm2.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cases = []
    prompts = [tok(p).input_ids for p in RAW]
    prompts += [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
                for m in CHAT]
    for ids in prompts:
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        new = out[0, len(ids):].tolist()
        cases.append((ids, new))
    return tok, cases


def _ours(model, tok, ids):
    return [r.token for r in mlxllama.stream_generate(model, tok, ids, max_tokens=N_TOKENS)]


def _truncate_at_eos(tokens, eos):
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


BACKENDS = ["numpy", pytest.param("mlx", marks=pytest.mark.skipif(importlib.util.find_spec("mlx") is None,
                                                                  reason="mlx not installed"))]


@pytest.fixture(scope="module")
def numpy_default():
    return mlxllama.load("default", backend="numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_tokens_match_transformers(reference, backend, request):
    ref_tok, cases = reference
    model, tok = request.getfixturevalue("numpy_default") if backend == "numpy" else mlxllama.load("default",
                                                                                                  backend=backend)
    eos = set(tok.eos_ids)
    if backend == "mlx":
        cases = cases[::3]  # MLX on a CPU is slow: a raw prompt and a chat one there
    for ids, want in cases:
        got = _ours(model, tok, ids)
        assert got == _truncate_at_eos(want, eos), ref_tok.decode(ids)


def test_our_prompt_tokens_match_transformers(reference):
    """The same ids come out of our tokenizer and chat template as out of transformers'."""
    from mlxllama.generate import prompt_tokens

    ref_tok, cases = reference
    _, _, tok = mlxllama.load_weights("default")
    for text, (ids, _) in zip(RAW, cases):
        assert prompt_tokens(tok, text) == ids
    for messages, (ids, _) in zip(CHAT, cases[len(RAW):]):
        assert prompt_tokens(tok, messages) == ids


def test_api_generate_text_matches_transformers_decode(reference, numpy_default):
    ref_tok, cases = reference
    model, tok = numpy_default
    ids, want = cases[0]
    text = mlxllama.generate(model, tok, RAW[0], max_tokens=N_TOKENS)
    assert text == ref_tok.decode(_truncate_at_eos(want, set(tok.eos_ids)), skip_special_tokens=True)
