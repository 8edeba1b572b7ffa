"""Constrained decoding with llguidance: JSON Schema, JSON object, Lark grammars and regexes as a token mask.

make_constraint(...) builds one request's matcher (a fresh object per request). The engine duck-types it:

    class Constraint(Protocol):
        def allowed(self) -> np.ndarray | None: ...          # bool [n]: tokens allowed next (past n: disallowed)
        def accept(self, tokens: list[int]) -> None: ...      # these tokens were emitted, in order
        def rollback(self, n: int) -> None: ...               # forget the last n accepted tokens
        def check_draft(self, tokens: list[int]) -> int: ...  # leading tokens the matcher would accept now
        done: bool                                            # nothing more may follow

The llguidance tokenizer is built once per Tokenizer (cached) from each token's bytes, so that sentencepiece,
`tokenizers` and GGUF vocabularies all work the same way. Why llguidance over xgrammar: benchmarks/README.md.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from typing import Any

import numpy as np

from .errors import UsageError, first_line

logger = logging.getLogger(__name__)

# JSON as models write it: one space after ':' and ',', no free whitespace (a small model could loop on it forever)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_cache: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is spelled with, inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _piece_bytes(piece: str) -> bytes:
    """A sentencepiece-style piece: '▁' is a space, <0xNN> is that byte."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8")


def token_bytes(tokenizer) -> tuple[list[bytes], list[int]]:
    """Each token's bytes as the model writes them, and the ids of special (control) tokens."""
    from .tokenizer.backends import HFTokenizers, SentencePiece

    backend = tokenizer._backend
    n = tokenizer.vocab_size
    specials: set[int] = set()
    out: list[bytes] = []
    if isinstance(backend, SentencePiece):
        sp = backend.sp
        specials = set(backend.special_pieces)
        for i in range(n):
            if i in specials or i >= sp.get_piece_size():
                out.append(backend.id_to_token(i).encode("utf-8") if i in specials else b"")
            else:
                out.append(_piece_bytes(sp.id_to_piece(i)))
                if sp.is_control(i) or sp.is_unknown(i):
                    specials.add(i)
    elif isinstance(backend, HFTokenizers):
        tk = backend.tk
        specials = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        byte_level = "ByteLevel" in json.dumps(json.loads(tk.to_str()).get("decoder") or {})
        table = _byte_decoder()
        for i in range(n):
            t = tk.id_to_token(i) or ""
            if i in specials:
                out.append(t.encode("utf-8"))
            elif byte_level and all(c in table for c in t):
                out.append(bytes(table[c] for c in t))
            else:
                out.append(_piece_bytes(t))
    else:
        raise UsageError(f"constrained decoding does not support the {type(backend).__name__} tokenizer")
    return out, sorted(specials)


class _Wrapper:
    """What llguidance's LLTokenizer reads from a Python tokenizer (its TokenizerWrapper's attributes)."""

    def __init__(self, tokenizer, eos: int):
        self.tokens, self.special_token_ids = token_bytes(tokenizer)
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_id
        self.is_tokenizer_wrapper = True
        self._tok = tokenizer

    def __call__(self, s) -> list[int]:
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        ids = self._tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)
        if b"".join(self.tokens[i] for i in ids) == data:
            return ids
        return self._greedy(data)  # sentencepiece's dummy prefix added a space: spell the bytes as they are

    def _greedy(self, data: bytes) -> list[int]:
        if not hasattr(self, "_by_bytes"):
            specials = set(self.special_token_ids)
            self._by_bytes = {b: i for i, b in reversed(list(enumerate(self.tokens))) if b and i not in specials}
            self._longest = max(map(len, self._by_bytes))
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                t = self._by_bytes.get(data[i:i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                i += 1  # a byte no token spells (no byte fallback): left out
        return out


def ll_tokenizer(tokenizer):
    """The llguidance tokenizer for one of ours (built once, ~1 s for a 50k vocabulary, then cached)."""
    import llguidance

    with _cache_lock:
        hit = _cache.get(tokenizer)
        if hit is None:
            eos = sorted(tokenizer.eos_ids)
            if not eos:
                raise UsageError("constrained decoding needs a tokenizer with an end-of-sequence token")
            hit = llguidance.LLTokenizer(_Wrapper(tokenizer, eos[0]), n_vocab=tokenizer.vocab_size, eos_token=eos)
            _cache[tokenizer] = hit
        return hit


def _schema_of(response_format: dict | None, json_schema) -> tuple[Any, bool] | None:
    """(JSON Schema, strict) from OpenAI's response_format or a bare schema; None for plain text."""
    if json_schema is not None:
        return (json.loads(json_schema) if isinstance(json_schema, str) else json_schema), True
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}, False
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise UsageError("response_format.json_schema must be an object with a 'schema'")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, (dict, bool)):
            raise UsageError("response_format.json_schema.schema must be a JSON Schema object")
        return schema, bool(spec.get("strict"))
    raise UsageError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")


_DATA_KEYS = {"enum", "const", "default", "examples"}  # values there are JSON data, not schemas
MAX_STRING = 256  # characters of a string the schema leaves unbounded (no maxLength, pattern, format, enum)
MAX_ITEMS = 16  # items of an array the schema leaves unbounded


def bounded(schema):
    """The schema made finite where it is open-ended, so that any model's output ends and parses: objects that list
    their properties get `additionalProperties: false` unless they say otherwise (as xgrammar's strict mode and
    OpenAI's strict schemas do), unbounded strings MAX_STRING characters, unbounded arrays MAX_ITEMS items.
    Whatever it allows, the original schema allows; a schema's own limits win."""
    if isinstance(schema, list):
        return [bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYS else bounded(v) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and not {"additionalProperties", "patternProperties",
                                                          "unevaluatedProperties"} & out.keys():
        out["additionalProperties"] = False
    if out.get("type") == "string" and not {"maxLength", "pattern", "format", "enum", "const"} & out.keys():
        out["maxLength"] = max(MAX_STRING, out.get("minLength", 0) if isinstance(out.get("minLength"), int) else 0)
    if out.get("type") == "array" and "maxItems" not in out:
        out["maxItems"] = max(MAX_ITEMS, out.get("minItems", 0) if isinstance(out.get("minItems"), int) else 0)
    return out


def grammar_for(response_format: dict | None = None, json_schema=None, grammar: str | None = None) -> str | None:
    """The llguidance grammar for a request, or None when the output is free."""
    import llguidance

    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise UsageError("the grammar is empty")
        return llguidance.LLMatcher.grammar_from_lark(grammar)
    got = _schema_of(response_format, json_schema)
    if got is None:
        return None
    schema, strict = got
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(bounded(schema),
                                                             overrides=dict(JSON_OPTIONS, lenient=not strict))
    except ValueError as e:
        raise UsageError(f"the JSON schema is invalid: {e}") from None


class Constraint:
    """One request's llguidance matcher, with the mask as a bool array over the model's vocabulary."""

    def __init__(self, matcher, vocab_size: int, n_tokens: int):
        self.m = matcher
        self.vocab_size = vocab_size
        self._words = (n_tokens + 31) // 32
        self._bits = np.empty(self._words, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        self.m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        mask = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(bool)
        if mask.size >= self.vocab_size:
            return mask[: self.vocab_size]
        return np.concatenate([mask, np.zeros(self.vocab_size - mask.size, dtype=bool)])

    def accept(self, tokens: list[int]) -> None:
        if not self.m.consume_tokens([int(t) for t in tokens]):
            logger.debug("the matcher refused tokens %s: %s", tokens, self.m.get_error())

    def rollback(self, n: int) -> None:
        if n:
            self.m.rollback(n)

    def check_draft(self, tokens: list[int]) -> int:
        return self.m.validate_tokens([int(t) for t in tokens])

    @property
    def done(self) -> bool:
        return self.m.is_stopped()

    @property
    def error(self) -> str | None:
        return self.m.get_error() if self.m.is_error() else None


def compile_grammar(tokenizer, grammar: str, what: str = "grammar"):
    """A fresh llguidance matcher for a grammar; UsageError with the library's reason when it does not compile."""
    import llguidance

    tok = ll_tokenizer(tokenizer)
    bad, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    if bad:
        raise UsageError(f"the {what} does not compile: {first_line(Exception(messages[0])) if messages else '?'}")
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    if matcher.is_error():
        raise UsageError(f"the {what} does not compile: {first_line(Exception(matcher.get_error()))}")
    return matcher


def make_constraint(tokenizer, vocab_size: int, *, response_format: dict | None = None, json_schema=None,
                    grammar: str | None = None, tools: list | None = None, tool_choice=None,
                    parallel_tool_calls: bool = True) -> Constraint | None:
    """One request's Constraint, or None when its output is free. tools/tool_choice: a call in the template's
    format is forced when tool_choice is "required" or names a function (tools.py)."""
    forced = bool(tools) and tool_choice not in (None, "auto", "none")
    if forced:
        from .tools import call_grammar

        special = ll_tokenizer(tokenizer).is_special_token
        closed = [dict(t, function=dict(t["function"], parameters=bounded(t["function"].get("parameters"))))
                  if isinstance(t, dict) and isinstance(t.get("function"), dict) else t for t in tools]
        text = call_grammar(tokenizer, closed, tool_choice, parallel_tool_calls, special)
    else:
        text = grammar_for(response_format, json_schema, grammar)
    if text is None:
        return None
    what = "tool call grammar" if forced else "grammar" if grammar is not None else "JSON schema"
    return Constraint(compile_grammar(tokenizer, text, what), vocab_size, ll_tokenizer(tokenizer).vocab_size)


def constraint_factory(tokenizer, vocab_size: int, **kw):
    """make_constraint's arguments checked now (compile errors raise here); returns a zero-argument factory of fresh
    Constraints, or None when the output is free."""
    first = make_constraint(tokenizer, vocab_size, **kw)
    if first is None:
        return None
    grammar_matcher = first.m

    def fresh() -> Constraint:
        return Constraint(grammar_matcher.deep_copy(), vocab_size, first._words * 32)

    return fresh


class MaskProcessor:
    """A Constraint as a logits processor (generate.stream_generate): feeds it the tokens emitted since the last
    call, then masks what it disallows."""

    def __init__(self, constraint: Constraint):
        self.c = constraint
        self.start: int | None = None  # the history's length at the first call (the prompt)

    def __call__(self, history: list, row: np.ndarray) -> np.ndarray:
        if self.start is None:
            self.start = len(history)
        elif len(history) > self.start:
            self.c.accept(history[self.start:])
            self.start = len(history)
        mask = self.c.allowed()
        n = min(mask.size, row.shape[0])
        out = np.full_like(row, -np.inf)
        out[:n] = np.where(mask[:n], row[:n], -np.inf)
        return out
