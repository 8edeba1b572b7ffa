"""Tokenizers from GGUF metadata: llama.cpp's "llama" (sentencepiece) and "gpt2" (byte-level BPE) vocabularies."""

from __future__ import annotations

import tokenizers
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from ..errors import ModelFileError, first_line
from .backends import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    HFTokenizers,
    SentencePiece,
)
from .core import Tokenizer

# Pre-tokenizer split rules by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp defines them.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"}
_QWEN2 = {"qwen2", "deepseek-r1-qwen", "stablelm2"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gguf_spm_proto(meta: dict, tokens: list[str], types: list[int], source: str) -> bytes:
    """A sentencepiece BPE model from llama.cpp's "llama" vocabulary, with llama's usual normalizer."""
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise ModelFileError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    if UNKNOWN not in types and isinstance(unk_id, int) and 0 <= unk_id < len(tokens):
        types = list(types)
        types[unk_id] = UNKNOWN  # sentencepiece needs exactly one unknown piece
    proto = spm_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece = piece
        p.score = float(score)
        p.type = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = BYTE in types
    trainer.unk_id = types.index(UNKNOWN)
    for field, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        setattr(trainer, field, value if isinstance(value, int) and 0 <= value < len(tokens) else -1)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    norm.escape_whitespaces = True
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        norm.precompiled_charsmap = bytes(charsmap)
    return proto.SerializeToString()


def _gguf_byte_level_bpe(meta: dict, tokens: list[str], types: list[int], add_bos: bool, source: str):
    """A `tokenizers` byte-level BPE from llama.cpp's "gpt2" vocabulary (tokens are already byte-level spelled)."""
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        cut = m.find(" ", 1)  # the first part may itself start with a space
        if cut < 0:
            raise ModelFileError(f"{source}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((m[:cut], m[cut + 1 :]))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)), use_regex=True
    )
    if pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3 or pre in _QWEN2:
        split = _LLAMA3_SPLIT if pre in _LLAMA3 else _QWEN2_SPLIT
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        pre_tokenizer = byte_level  # GPT-2's own split rule, llama.cpp's default
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3))
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos and isinstance(bos_id, int) and 0 <= bos_id < len(tokens):
        # so that transformers, reading the saved tokenizer.json, adds BOS as llama.cpp would
        tk.post_processor = processors.TemplateProcessing(
            single=[tokens[bos_id], "$A"], pair=[tokens[bos_id], "$A", tokens[bos_id], "$B"],
            special_tokens=[(tokens[bos_id], bos_id)],
        )
    return tk


def tokenizer_from_gguf(meta: dict, source: str = "GGUF metadata") -> Tokenizer:
    """meta = {field.name: field.contents() for field in gguf.GGUFReader(path).fields.values()}."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None:
        raise ModelFileError(f"{source}: no tokenizer.ggml.model; the file carries no vocabulary")
    if kind not in ("llama", "gpt2"):
        raise ModelFileError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (only 'llama' and 'gpt2')")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFileError(f"{source}: tokenizer.ggml.tokens is missing or not a list of strings")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFileError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    types = [int(t) for t in types]
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = kind == "llama"  # llama.cpp's default for sentencepiece vocabularies

    try:
        if kind == "llama":
            backend: SentencePiece | HFTokenizers = SentencePiece(_gguf_spm_proto(meta, tokens, types, source))
        else:
            backend = HFTokenizers(_gguf_byte_level_bpe(meta, tokens, types, add_bos, source))
    except ModelFileError:
        raise
    except Exception as e:
        raise ModelFileError(f"{source}: the {kind!r} vocabulary cannot be built ({first_line(e)})") from None

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(tokens):
            raise ModelFileError(f"{source}: tokenizer.ggml.{key} {value!r} is not a token id")
        return value

    eos_ids = {i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(
        backend,
        bos_id=token_id("bos_token_id"),
        eos_id=token_id("eos_token_id"),
        eos_ids=eos_ids,
        add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
        unk_id=token_id("unknown_token_id"),
        pad_id=token_id("padding_token_id"),
    )
