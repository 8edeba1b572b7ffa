"""One tokenizer interface over sentencepiece, HF `tokenizers` and GGUF-embedded vocabularies; chat templates.

Two backends do the actual work:
  * sentencepiece, for `tokenizer.model` and GGUF vocabularies of kind "llama" (rebuilt as a sentencepiece ModelProto);
  * the `tokenizers` library, for `tokenizer.json` and GGUF vocabularies of kind "gpt2" (byte-level BPE).
The Tokenizer on top owns BOS/EOS conventions, the chat template and saving in a form transformers can load.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from .jsonio import read_json
from .errors import ModelFileError, UsageError

# llama.cpp's token types; sentencepiece numbers its piece types the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

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


class _SentencePiece:
    """sentencepiece, plus what it lacks: control tokens written in the text are read as those tokens."""

    def __init__(self, proto: bytes, extra_specials: dict[str, int] | None = None):
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        n = self.sp.get_piece_size()
        self.specials = {
            self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        self.specials.update(extra_specials or {})
        self.special_pieces = {i: s for s, i in self.specials.items()}
        self.vocab_size = max([n, *(i + 1 for i in self.special_pieces)])
        alternatives = "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True))
        self.split = re.compile(f"({alternatives})") if alternatives else None

    def encode(self, text: str) -> list[int]:
        # Each stretch of text between special tokens is encoded on its own (with its own dummy prefix),
        # as llama.cpp and transformers' sentencepiece conversion do.
        parts = self.split.split(text) if self.split else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_pieces:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.special_pieces[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str:
        return self.special_pieces.get(i) or self.sp.id_to_piece(i)

    def save(self, folder: Path) -> dict[str, Any]:
        (folder / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())
        added = {
            str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False}
            for i, s in sorted(self.special_pieces.items())
        }
        return {"added_tokens_decoder": added}


class _HFTokenizers:
    """The `tokenizers` library; it parses added/special tokens in text by itself."""

    def __init__(self, tk: tokenizers.Tokenizer):
        tk.no_truncation()
        tk.no_padding()
        self.tk = tk
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tk.id_to_token(i)

    def adds_bos(self, bos_id: int | None) -> bool:
        """Whether the file's post-processor puts BOS in front (the Llama-3 way of saying add_bos)."""
        if bos_id is None:
            return False
        plain = self.tk.encode("x", add_special_tokens=False).ids
        full = self.tk.encode("x", add_special_tokens=True).ids
        return len(full) > len(plain) and full[0] == bos_id

    def save(self, folder: Path) -> dict[str, Any]:
        self.tk.save(str(folder / "tokenizer.json"))
        return {}  # tokenizer.json lists its added tokens itself


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


TEMPLATE_STEPS = 1_000_000  # range() items a chat template may loop over in one render
TEMPLATE_SIZE = 32_000_000  # bytes (a character 1, a list item 32) its filters and `*` may build in one render


class _BudgetedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox bounds one range() but not nested loops or `'x' * 10**10`: count what a render builds."""

    intercepted_binops = frozenset(["*", "**", "%"])
    MAX_ARG = 100_000  # largest number a filter argument or a format width may be

    def __init__(self, **kw):
        super().__init__(**kw)
        self.spent = 0
        self.steps = 0
        self.globals["range"] = self._range
        self.globals.pop("lipsum", None)
        for name, f in list(self.filters.items()):
            self.filters[name] = self._guard(name, f)

    def _guard(self, name, f):
        @functools.wraps(f)  # keeps jinja's pass_context/pass_environment markers
        def guarded(*args, **kwargs):
            first = 2 if getattr(f, "jinja_pass_arg", None) else 1  # skip the context and the filtered value
            options = list(args[first:]) + list(kwargs.values())
            if any(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > self.MAX_ARG
                   for v in options):
                raise jinja2.sandbox.SecurityError(f"chat template passes a huge number to the {name} filter")
            strings = [v for v in list(args) + list(kwargs.values()) if isinstance(v, str)]
            if name == "replace" and len(strings) >= 3:
                self._spend((len(strings[-3]) + 1) * len(strings[-1]))
            if name == "format" and strings:
                self._check_widths(strings[0])
            out = f(*args, **kwargs)
            if isinstance(out, str):
                self._spend(len(out))
            elif isinstance(out, list):
                self._spend(32 * len(out))
            return out

        return guarded

    def _check_widths(self, fmt: str) -> None:
        for n in re.findall(r"%[-+ #0]*(\d+)|\{[^{}]*:[^{}]*?(\d+)[^{}]*\}", fmt):
            if any(x and int(x) > self.MAX_ARG for x in n):
                raise jinja2.sandbox.SecurityError("chat template formats with a huge width")

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            self._check_widths(value.__self__)
        return wrapped

    def _spend(self, n: int) -> None:
        self.spent += max(int(n), 0)
        if self.spent > TEMPLATE_SIZE:
            raise jinja2.sandbox.SecurityError("chat template exceeds its work budget (a hostile or broken template)")

    def _range(self, *args):
        r = range(*args)
        self.steps += len(r)
        if self.steps > TEMPLATE_STEPS:
            raise jinja2.sandbox.SecurityError("chat template exceeds its work budget (a hostile or broken template)")
        return r

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise jinja2.sandbox.SecurityError("chat template raises to a power beyond 64")
        if operator == "%" and isinstance(left, str):
            self._check_widths(left)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self._spend(len(seq) * n * (1 if isinstance(seq, str) else 32))
        return super().call_binop(context, operator, left, right)


def _compile_template(source: str) -> jinja2.Template:
    env = _BudgetedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """encode/decode/chat template over one backend. Build it with load_tokenizer or tokenizer_from_gguf."""

    def __init__(
        self,
        backend: _SentencePiece | _HFTokenizers,
        *,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: set[int],
        add_bos: bool,
        chat_template: str | None,
        unk_id: int | None = None,
        pad_id: int | None = None,
    ):
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_id: int | None = bos_id
        self._eos_id = eos_id
        self.eos_ids: set[int] = set(eos_ids) | ({eos_id} if eos_id is not None else set())
        self.add_bos: bool = add_bos
        self.chat_template: str | None = chat_template
        self._unk_id = unk_id
        self._pad_id = pad_id
        self._template: jinja2.Template | None = None

    def _token(self, i: int | None) -> str | None:
        return None if i is None else self._backend.id_to_token(i)

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self._eos_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        self._check_ids([int(token_id)])
        return self._backend.id_to_token(int(token_id))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise UsageError(f"encode expects a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]!r} is outside the vocabulary (0..{self.vocab_size - 1})")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._backend.decode(ids, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render the model's chat template (sandboxed jinja2). Extra keyword arguments become template variables."""
        if not self.chat_template:
            raise UsageError("this model has no chat template; give a plain prompt instead")
        try:
            if self._template is None:
                self._template = _compile_template(self.chat_template)
            variables = {
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "unk_token": self._token(self._unk_id),
                "pad_token": self._token(self._pad_id),
                "tools": None,
                "documents": None,
                **kwargs,
            }
            self._template.environment.spent = self._template.environment.steps = 0
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except UsageError:
            raise
        except Exception as e:  # the template is untrusted code: any failure in it is reported, never propagated raw
            raise UsageError(f"chat template failed: {_first_line(e)}") from None

    def detokenizer(self, skip_special_tokens: bool = False) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, skip_special_tokens)

    def save(self, folder: Path) -> None:
        """Write tokenizer.json or tokenizer.model, tokenizer_config.json and special_tokens_map.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        backend_config = self._backend.save(folder)
        special = {
            name: token
            for name, token in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("unk_token", self._token(self._unk_id)),
                ("pad_token", self._token(self._pad_id)),
            )
            if token is not None
        }
        config: dict[str, Any] = {
            # transformers 5 loads tokenizer.json as is, and converts a lone tokenizer.model so that it encodes
            # exactly as sentencepiece does (its LlamaTokenizer would drop the dummy prefix before a leading space).
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            **special,
            **backend_config,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


class StreamingDetokenizer:
    """Text from a stream of token ids, one token at a time.

    Each step decodes a short window of ids that starts at a token already emitted (so sentencepiece's
    leading-space rule applies as in a full decode) and emits the part of its text not emitted yet. Trailing
    U+FFFD is an unfinished UTF-8 character: it is held back until the tokens that complete it arrive.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # the window is ids[_start:]
        self._read = 0  # ids[:_read] ended on a character boundary when last seen
        self._done = 0  # characters of the window's text already emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _emit(self, new: str) -> str:
        self.text += new
        return new

    def add_token(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._decode(self._ids[self._start :])
        complete = window.rstrip("\ufffd")
        new = complete[self._done :]
        self._done = max(self._done, len(complete))
        if len(complete) == len(window):
            # a character boundary: restart the window at the previous boundary, whose text is all emitted
            self._start, self._read = self._read, len(self._ids)
            self._done = len(self._decode(self._ids[self._start : self._read]))
        return self._emit(new)

    def finalize(self) -> str:
        new = self._decode(self._ids[self._start :])[self._done :]
        self._start = self._read = len(self._ids)
        self._done = 0
        return self._emit(new)


def _read_json(path: Path) -> Any:
    return read_json(path, ModelFileError, 256 << 20, "tokenizer file")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def _int_list(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def load_tokenizer(folder: Path, args_eos: list[int] | None = None) -> Tokenizer:
    """Load a HF-style folder: tokenizer.json (preferred) or tokenizer.model, with tokenizer_config.json,
    special_tokens_map.json, chat_template.jinja and generation_config.json when present.
    args_eos are extra end-of-sequence ids (config.json's eos_token_id)."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise ModelFileError(f"{config_path}: expected a JSON object")
    special_map_path = folder / "special_tokens_map.json"
    special_map = _read_json(special_map_path) if special_map_path.is_file() else {}
    if not isinstance(special_map, dict):
        raise ModelFileError(f"{special_map_path}: expected a JSON object")

    def special(name: str) -> str | None:
        return _token_text(config.get(name)) or _token_text(special_map.get(name))

    json_path, model_path = folder / "tokenizer.json", folder / "tokenizer.model"
    if json_path.is_file():
        try:
            backend: _SentencePiece | _HFTokenizers = _HFTokenizers(tokenizers.Tokenizer.from_file(str(json_path)))
        except Exception as e:
            raise ModelFileError(f"{json_path}: not a tokenizers file ({_first_line(e)})") from None
    elif model_path.is_file():
        extra = {}
        added = config.get("added_tokens_decoder")
        if isinstance(added, dict):
            for key, tok in added.items():
                content = _token_text(tok)
                if content and str(key).isdigit() and isinstance(tok, dict) and tok.get("special", False):
                    extra[content] = int(key)
        try:
            backend = _SentencePiece(model_path.read_bytes(), extra)
        except Exception as e:
            raise ModelFileError(f"{model_path}: not a sentencepiece model ({_first_line(e)})") from None
    else:
        raise ModelFileError(f"{folder}: no tokenizer.json or tokenizer.model")

    def token_id(name: str, fallback: int | None) -> int | None:
        text = special(name)
        if text is None:
            return fallback
        i = backend.token_to_id(text)
        if i is None:
            raise ModelFileError(f"{config_path}: {name} {text!r} is not in the vocabulary")
        return i

    is_spm = isinstance(backend, _SentencePiece)

    def spm_id(i: int) -> int | None:
        return i if is_spm and i >= 0 else None

    bos_id = token_id("bos_token", spm_id(backend.sp.bos_id()) if is_spm else None)
    eos_id = token_id("eos_token", spm_id(backend.sp.eos_id()) if is_spm else None)
    unk_id = token_id("unk_token", spm_id(backend.sp.unk_id()) if is_spm else None)
    pad_id = token_id("pad_token", None)

    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = True if is_spm else backend.adds_bos(bos_id)

    eos_ids = set(_int_list(args_eos or []))
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = _read_json(gen_path)
        if isinstance(gen, dict):
            eos_ids |= set(_int_list(gen.get("eos_token_id")))

    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")
    else:
        chat_template = _pick_template(config.get("chat_template"))
        if chat_template is None and (folder / "chat_template.json").is_file():
            wrapped = _read_json(folder / "chat_template.json")
            chat_template = _pick_template(wrapped.get("chat_template") if isinstance(wrapped, dict) else None)

    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        eos_ids=eos_ids,
        add_bos=add_bos,
        chat_template=chat_template,
        unk_id=unk_id,
        pad_id=pad_id,
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
            backend: _SentencePiece | _HFTokenizers = _SentencePiece(_gguf_spm_proto(meta, tokens, types, source))
        else:
            backend = _HFTokenizers(_gguf_byte_level_bpe(meta, tokens, types, add_bos, source))
    except ModelFileError:
        raise
    except Exception as e:
        raise ModelFileError(f"{source}: the {kind!r} vocabulary cannot be built ({_first_line(e)})") from None

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
