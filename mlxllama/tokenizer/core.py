"""The Tokenizer: encode/decode, BOS/EOS conventions, the chat template, saving in a form transformers loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

from ..errors import UsageError, first_line
from .backends import HFTokenizers, SentencePiece
from .chat_template import compile_template
from .detokenizer import StreamingDetokenizer


class Tokenizer:
    """encode/decode/chat template over one backend. Build it with load_tokenizer or tokenizer_from_gguf."""

    def __init__(
        self,
        backend: SentencePiece | HFTokenizers,
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
                self._template = compile_template(self.chat_template)
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
            raise UsageError(f"chat template failed: {first_line(e)}") from None

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
