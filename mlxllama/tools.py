"""Tool calls and reasoning in each model family's own format: OpenAI messages into the chat template, the model's
output back into tool_calls, the grammar that forces a call, and <think> blocks split off as reasoning.

Families (told apart by the chat template's text):
    hermes   Qwen2.5, Qwen3, Hermes: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one block per call
    llama3   Llama 3.1/3.2/3.3: {"name": ..., "parameters": {...}} (after an optional <|python_tag|>), ';'-separated
    mistral  Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from dataclasses import dataclass

from .errors import UsageError

logger = logging.getLogger(__name__)

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def family(chat_template: str | None) -> str | None:
    t = chat_template or ""
    if "<tool_call>" in t:
        return HERMES
    if "[TOOL_CALLS]" in t:
        return MISTRAL
    if "<|python_tag|>" in t or '"parameters": ' in t:
        return LLAMA3
    return None


def new_id(fam: str | None) -> str:
    if fam == MISTRAL:  # its template checks for 9 alphanumeric characters
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def _arguments(value) -> object:
    """OpenAI sends arguments as JSON text; chat templates expect the object (they tojson it)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as chat templates read them (transformers' convention): tool call arguments as objects,
    content never None."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "developer":
            m["role"] = "system"
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {"id": c.get("id"), "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}}
                for c in m["tool_calls"]]
        else:
            m.pop("tool_calls", None)
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _one_call_per_message(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if len(calls) > 1:
            out.extend(dict(m, tool_calls=[c], content=m["content"] if i == 0 else "") for i, c in enumerate(calls))
        else:
            out.append(m)
    return out


def render(tokenizer, messages: list[dict], tools: list | None = None, **kw) -> str:
    """The chat template over OpenAI messages (with tool calls and tool results) and the tools. Templates that take
    one call per assistant turn (Llama 3.1) get parallel calls as consecutive assistant turns."""
    msgs = template_messages(messages)
    if tools:  # templates read these without checking (Hermes' reads the description)
        tools = [dict(t, function={"description": "", "parameters": {"type": "object", "properties": {}},
                                   **t["function"]}) if isinstance(t.get("function"), dict) else t for t in tools]
    try:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tools=tools or None, **kw)
    except UsageError:
        if not any(len(m.get("tool_calls") or []) > 1 for m in msgs):
            raise
        logger.debug("the template refused parallel calls in one turn; one call per turn", exc_info=True)
        return tokenizer.apply_chat_template(_one_call_per_message(msgs), add_generation_prompt=True,
                                             tools=tools or None, **kw)


# -- parsing the model's output --------------------------------------------------------------------------------------

def _call_from(obj, fam: str | None) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), new_id(fam))


def _json_values(text: str) -> list | None:
    """The JSON values that make up all of text (separated by whitespace, ';' or ','), or None."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)


def parse_tool_calls(text: str, fam: str | None) -> tuple[str, list[ToolCall]] | None:
    """(content left over, calls) when the output holds tool calls in the family's format, else None."""
    if fam in (HERMES, None) and "<tool_call>" in text:
        blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
        calls = [_call_from(v, fam) for b in blocks for v in (_json_values(b) or [None])]
        if blocks and all(calls):
            return re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S).strip(), calls
        return None
    body = text.strip()
    if fam == MISTRAL or body.startswith("[TOOL_CALLS]"):
        if not body.startswith("[TOOL_CALLS]"):
            return None
        body = body[len("[TOOL_CALLS]"):]
    elif fam == LLAMA3 or fam is None:
        body = body.removeprefix("<|python_tag|>")
        if not body.lstrip().startswith("{"):
            return None
    values = _json_values(body)
    if not values:
        return None
    if len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    calls = [_call_from(v, fam) for v in values]
    return ("", calls) if calls and all(calls) else None


def tool_markers(fam: str | None) -> tuple[str, ...]:
    """What a tool-call answer starts with, in this family (streaming holds such text back until the end)."""
    return {HERMES: ("<tool_call>",), MISTRAL: ("[TOOL_CALLS]",)}.get(fam, ("<|python_tag|>", "{", "<tool_call>",
                                                                              "[TOOL_CALLS]"))


# -- reasoning ---------------------------------------------------------------------------------------------------------

def split_reasoning(text: str, open_in_prompt: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of an answer that thinks first (<think>...</think>); (None, text) otherwise.
    open_in_prompt: the template's generation prompt already opened the <think> block (DeepSeek-R1 distills)."""
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN):]
    elif not (open_in_prompt and THINK_CLOSE in text):
        return None, text
    reasoning, sep, content = body.partition(THINK_CLOSE)
    if not sep:  # cut short while thinking
        return reasoning.strip(), ""
    return reasoning.strip(), content.lstrip()


# -- forcing a call: the grammar ---------------------------------------------------------------------------------------

def _tool_functions(tools: list) -> list[dict]:
    out = []
    for t in tools:
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise UsageError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}")
        out.append(f)
    return out


def chosen_functions(tools: list, tool_choice) -> list[dict]:
    """The functions tool_choice allows: all of them ("required"), or the one it names."""
    funcs = _tool_functions(tools)
    if tool_choice == "required":
        return funcs
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        picked = [f for f in funcs if f["name"] == name]
        if not picked:
            raise UsageError(f"tool_choice names the function {name!r}, which is not among the tools")
        return picked
    raise UsageError(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {tool_choice!r}")


def _call_schema(funcs: list[dict], args_key: str) -> dict:
    options = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                 args_key: f.get("parameters") or {"type": "object"}},
                "required": ["name", args_key], "additionalProperties": False} for f in funcs]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return dict(schema, **{"x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                           "key_separator": ": ", "lenient": True}})


def _literal(tokenizer, text: str, is_special) -> str:
    """A Lark literal for text; a special token of the vocabulary is matched as that token."""
    i = tokenizer.token_to_id(text)
    if i is not None and is_special(i):
        return f"<[{i}]>"
    return json.dumps(text)


def call_grammar(tokenizer, tools: list, tool_choice, parallel: bool = True, is_special=lambda i: False) -> str:
    """The llguidance grammar of an answer that is one or more calls (parallel) of the allowed functions.
    is_special(token id): whether the matcher's tokenizer holds that token as a special one."""
    import llguidance

    funcs = chosen_functions(tools, tool_choice)
    fam = family(tokenizer.chat_template)
    sep = "\"; \"" if fam == LLAMA3 else "\"\\n\""
    start = f"start: call ({sep} call)*\n" if parallel else "start: call\n"
    if fam == MISTRAL:
        schema = {"type": "array", "items": _call_schema(funcs, "arguments"), "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
        lark = f"start: {_literal(tokenizer, '[TOOL_CALLS]', is_special)} body\nbody: %json {json.dumps(schema)}\n"
    elif fam == LLAMA3:
        lark = start + f"call: %json {json.dumps(_call_schema(funcs, 'parameters'))}\n"
    else:
        open_, close = _literal(tokenizer, "<tool_call>", is_special), _literal(tokenizer, "</tool_call>", is_special)
        lark = (start + f"call: {open_} \"\\n\" body \"\\n\" {close}\n"
                f"body: %json {json.dumps(_call_schema(funcs, 'arguments'))}\n")
    return llguidance.LLMatcher.grammar_from_lark(lark)
