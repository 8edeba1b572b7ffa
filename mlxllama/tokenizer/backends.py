"""The two libraries that do the work: sentencepiece (tokenizer.model, GGUF "llama" vocabularies rebuilt as
a ModelProto) and HF `tokenizers` (tokenizer.json, GGUF "gpt2" byte-level BPE)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers

# llama.cpp's token types; sentencepiece numbers its piece types the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

class SentencePiece:
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


class HFTokenizers:
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
