"""Request bodies in OpenAI's shapes, validated by pydantic. Unknown keys are ignored; OpenAI parameters that this
server does not implement are rejected when set (never silently ignored)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    model_validator,
)

MAX_MESSAGES = 4096
MAX_STOP = 16


class FieldError(ValueError):
    """A validator's error about one field: the server answers with this message and `param` set to the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: Optional[str] = None
    schema_: Union[dict, bool] = Field({"type": "object"}, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise FieldError("response_format", "response_format of type json_schema needs a json_schema object")
        return self

    def as_dict(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class FunctionDef(_Body):
    name: str = Field(..., min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[StrictBool] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionCall(_Body):
    name: str
    arguments: Union[str, dict] = "{}"


class ToolCallIn(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class _Generation(_Body):
    model: Optional[str] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    # sampling values left out (or null) take the server's defaults (ServeConfig.sampling)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, lt=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2 ** 63)
    stop: Optional[Union[str, list[str]]] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = Field(1, ge=1, le=1, description="one choice per request")
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    logit_bias: Optional[dict[str, float]] = None  # OpenAI's: token id (as a string) -> bias in [-100, 100]

    @model_validator(mode="after")
    def _limits(self):
        for token, bias in (self.logit_bias or {}).items():
            if not token.strip().isdigit():
                raise FieldError("logit_bias", f"logit_bias keys must be token ids, got {token[:40]!r}")
            if not -100 <= bias <= 100:
                raise FieldError("logit_bias", f"logit_bias values must be in [-100, 100], got {bias!r}")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise FieldError("stop", f"at most {MAX_STOP} stop strings")
        return self

    @property
    def token_bias(self) -> dict[int, float] | None:
        return {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None

    def as_dict(self) -> dict:
        """The message as chat templates take it (content as text, tool calls as dicts)."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        for k in ("name", "tool_call_id"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    tools: Optional[list[Tool]] = Field(None, max_length=128)
    tool_choice: Optional[Union[Literal["auto", "none", "required"], NamedToolChoice]] = None
    parallel_tool_calls: StrictBool = True

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            names = [t.function.name for t in self.tools or []]
            if not names:
                raise FieldError("tool_choice", "tool_choice needs tools")
            if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
                raise FieldError("tool_choice",
                                 f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        return self


class CompletionRequest(_Generation):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: Optional[str] = None
    best_of: Optional[StrictInt] = Field(None, ge=1, le=1)

    @model_validator(mode="after")
    def _one_prompt(self):
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise FieldError("prompt", "one prompt per request (send several requests: they are batched)")
            self.prompt = p[0]
        if self.echo:
            raise FieldError("echo", "echo is not supported by this server")
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported by this server")
        if self.prompt in ("", []):
            raise FieldError("prompt", "the prompt is empty")
        return self
