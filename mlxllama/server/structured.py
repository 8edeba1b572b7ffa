"""The server's structured output: response_format and tools into a prompt and a constraint (constrain.py), and the
model's text back into OpenAI's message (content, tool_calls, reasoning_content), whole or as stream deltas."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .. import tools as T
from ..constrain import constraint_factory

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """What one chat request asks beyond text: the constraint factory and how to read the output."""
    constraint: object = None  # a zero-argument factory of the request's Constraint, or None
    family: str | None = None
    tools: bool = False  # parse tool calls out of the output
    reasoning: bool = False  # split <think>...</think> off as reasoning_content
    think_open: bool = False  # the prompt already opened the <think> block

    @property
    def passthrough(self) -> bool:
        return not (self.tools or self.reasoning)


def prepare_chat(body, tokenizer, vocab_size: int) -> tuple[str, Plan]:
    """(the prompt text, the plan) of a chat request; UsageError (a 400) for a schema, grammar or template that
    fails, with the library's reason."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    choice = choice.model_dump() if hasattr(choice, "model_dump") else choice
    use_tools = bool(tools) and choice != "none"
    prompt = T.render(tokenizer, [m.as_dict() for m in body.messages], tools if use_tools else None)
    fmt = body.response_format.as_dict() if body.response_format is not None else None
    forced = use_tools and choice not in (None, "auto")
    factory = constraint_factory(tokenizer, vocab_size, response_format=None if forced else fmt,
                                 tools=tools if forced else None, tool_choice=choice if forced else None,
                                 parallel_tool_calls=body.parallel_tool_calls)
    template = tokenizer.chat_template or ""
    plan = Plan(constraint=factory, family=T.family(template), tools=use_tools,
                reasoning=T.THINK_CLOSE in template or prompt.rstrip().endswith(T.THINK_OPEN),
                think_open=prompt.rstrip().endswith(T.THINK_OPEN))
    return prompt, plan


def completion_constraint(body, tokenizer, vocab_size: int):
    """The constraint factory of a /v1/completions request (response_format only), or None."""
    fmt = body.response_format.as_dict() if body.response_format is not None else None
    return constraint_factory(tokenizer, vocab_size, response_format=fmt)


def _call_deltas(calls: list[T.ToolCall]) -> list[dict]:
    out = []
    for i, c in enumerate(calls):
        out.append({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]})
    return out


def message(text: str, plan: Plan, finish: str) -> tuple[dict, str]:
    """(the assistant message, the finish reason) of a whole answer."""
    msg: dict = {"role": "assistant", "content": text}
    if plan.passthrough:
        return msg, finish
    content = text
    if plan.reasoning:
        reasoning, content = T.split_reasoning(text, plan.think_open)
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        msg["content"] = content
    if plan.tools:
        parsed = T.parse_tool_calls(content, plan.family)
        if parsed is not None:
            left, calls = parsed
            msg["content"] = left or None
            msg["tool_calls"] = [c.as_openai() for c in calls]
            return msg, "tool_calls" if finish == "stop" else finish
        logger.debug("no tool calls in the %s format in the answer; returned as content", plan.family or "any")
    return msg, finish


def _held(text: str, tags: tuple[str, ...]) -> int:
    """How many trailing characters of text could be the start of one of tags."""
    for n in range(min(max(map(len, tags)) - 1, len(text)), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


@dataclass
class StreamSplitter:
    """A streamed answer cut into OpenAI deltas: reasoning_content while thinking, then content, or tool calls (held
    back from their first marker to the end, then sent as one delta per call name and one per arguments)."""
    plan: Plan
    mode: str = "start"  # start -> [reasoning ->] answer -> content | calls
    buf: str = ""
    out: list = field(default_factory=list)
    thought: bool = False  # a <think> block closed: the whitespace after it is dropped

    def __post_init__(self):
        if self.plan.reasoning and self.plan.think_open:
            self.mode = "reasoning"
        elif not self.plan.reasoning:
            self.mode = "answer"

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        self.out = []
        for _ in range(4):  # each pass moves on at most one mode
            mode = self.mode
            getattr(self, "_" + mode)()
            if self.mode == mode:
                break
        return self.out

    def _emit(self, key: str, text: str) -> None:
        if text:
            self.out.append({key: text})

    def _start(self) -> None:
        s = self.buf.lstrip()
        if s.startswith(T.THINK_OPEN):
            self.buf, self.mode = s[len(T.THINK_OPEN):], "reasoning"
        elif not T.THINK_OPEN.startswith(s):
            self.mode = "answer"

    def _reasoning(self) -> None:
        before, sep, after = self.buf.partition(T.THINK_CLOSE)
        if sep:
            self._emit("reasoning_content", before)
            self.buf, self.mode, self.thought = after.lstrip(), "answer", True
            return
        keep = _held(self.buf, (T.THINK_CLOSE,))
        self._emit("reasoning_content", self.buf[: len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]

    def _answer(self) -> None:
        if not self.plan.tools:
            self.mode = "content"
            return
        s = self.buf.lstrip()
        markers = T.tool_markers(self.plan.family)
        if any(s.startswith(m) for m in markers):
            self.mode = "calls"
        elif s and not any(m.startswith(s) for m in markers):
            self.mode = "content"

    def _content(self) -> None:
        if self.thought:
            self.buf = self.buf.lstrip()
            self.thought = not self.buf
        if self.plan.tools and self.plan.family == T.HERMES:  # text, then <tool_call> blocks
            at = self.buf.find("<tool_call>")
            if at >= 0:
                self._emit("content", self.buf[:at])
                self.buf, self.mode = self.buf[at:], "calls"
                return
            keep = _held(self.buf, ("<tool_call>",))
            self._emit("content", self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return
        self._emit("content", self.buf)
        self.buf = ""

    def _calls(self) -> None:
        pass  # held until close()

    def close(self, finish: str) -> tuple[list[dict], str]:
        """The deltas still held and the finish reason, at the end of the answer."""
        self.out = []
        if self.mode == "reasoning":
            self._emit("reasoning_content", self.buf)
        elif self.mode in ("calls", "answer", "content") and self.plan.tools:
            parsed = T.parse_tool_calls(self.buf, self.plan.family)
            if parsed is not None:
                left, calls = parsed
                self._emit("content", left)
                return self.out + _call_deltas(calls), "tool_calls" if finish == "stop" else finish
            self._emit("content", self.buf)
        else:
            self._emit("content", self.buf)
        self.buf = ""
        return self.out, finish


def chunk(shape, delta: dict, finish: str | None = None) -> dict:
    """One chat.completion.chunk with this delta (the server's _Shape gives the ids)."""
    out = shape.chunk(None, finish)
    out["choices"][0]["delta"] = delta
    return out
