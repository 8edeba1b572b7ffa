"""Tokenizers of HF-style folders: tokenizer.json or tokenizer.model with their config files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers

from ..errors import ModelFileError, first_line
from ..jsonio import read_json
from .backends import HFTokenizers, SentencePiece
from .core import Tokenizer


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


def _folder_backend(folder: Path, config: dict) -> SentencePiece | HFTokenizers:
    """tokenizer.json through HF tokenizers, else tokenizer.model through sentencepiece (with the config's special
    added tokens)."""
    json_path, model_path = folder / "tokenizer.json", folder / "tokenizer.model"
    if json_path.is_file():
        try:
            return HFTokenizers(tokenizers.Tokenizer.from_file(str(json_path)))
        except Exception as e:
            raise ModelFileError(f"{json_path}: not a tokenizers file ({first_line(e)})") from None
    if not model_path.is_file():
        raise ModelFileError(f"{folder}: no tokenizer.json or tokenizer.model")
    extra = {}
    added = config.get("added_tokens_decoder")
    if isinstance(added, dict):
        for key, tok in added.items():
            content = _token_text(tok)
            if content and str(key).isdigit() and isinstance(tok, dict) and tok.get("special", False):
                extra[content] = int(key)
    try:
        return SentencePiece(model_path.read_bytes(), extra)
    except Exception as e:
        raise ModelFileError(f"{model_path}: not a sentencepiece model ({first_line(e)})") from None


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

    backend = _folder_backend(folder, config)

    def token_id(name: str, fallback: int | None) -> int | None:
        text = special(name)
        if text is None:
            return fallback
        i = backend.token_to_id(text)
        if i is None:
            raise ModelFileError(f"{config_path}: {name} {text!r} is not in the vocabulary")
        return i

    is_spm = isinstance(backend, SentencePiece)

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
