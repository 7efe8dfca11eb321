"""The OpenAI request bodies as pydantic models: every field checked for type and range; a violation is a
400 with OpenAI's error body naming the field. Unknown fields are logged and ignored, as vLLM does;
fields the server knows but cannot honour are refused by name, never silently dropped."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

logger = logging.getLogger("autolm.serve")

Number = Annotated[float, Field(allow_inf_nan=False)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: StrictStr = "response"
    description: StrictStr | None = None
    schema_: dict[str, Any] | StrictBool = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=0)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0, le=1)
    repetition_penalty: Number | None = Field(None, gt=0, le=10)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    n: StrictInt = Field(1, ge=1, le=16)
    best_of: StrictInt | None = Field(None, ge=1, le=16)
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stop_token_ids: list[StrictInt] | None = None
    min_tokens: StrictInt = Field(0, ge=0)
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    guided_grammar: StrictStr | None = None


# Known to OpenAI's API (or vLLM's) but not something this server can do: a 400 naming the field when set.
REFUSED = (
    "audio",
    "modalities",
    "prediction",
    "functions",
    "function_call",
    "web_search_options",
    "suffix",
    "reasoning_effort",
    "guided_decoding_backend",
    "prompt_logprobs",
    "use_beam_search",
)


class ToolCallFunction(BaseModel):
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = "{}"


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False


def parse(cls: type[_Request], raw: bytes) -> _Request:
    """Validate a request body; APIError 400 naming the first offending field."""
    try:
        req = cls.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, str) or not x[0].isupper()) or None
        if err["type"] == "json_invalid":
            raise APIError(400, f"request body is not valid JSON: {err['msg']}") from None
        raise APIError(
            400, f"'{loc}': {err['msg']}" if loc else err["msg"], param=loc.split(".")[0] if loc else None
        ) from None
    extra = dict(req.model_extra or {})
    for name in REFUSED:
        if extra.pop(name, None) not in (None, False, [], {}, "", ["text"]):
            raise APIError(
                400, f"'{name}' is not supported by this server", param=name, code="unsupported_field"
            )
    if extra:
        logger.info("ignoring unknown request fields: %s", ", ".join(sorted(extra)))
    check(req)
    return req


def check(req: _Request) -> None:
    """Rules that span fields."""

    def fail(message: str, param: str) -> None:
        raise APIError(400, message, param=param)

    if req.best_of is not None and req.best_of < req.n:
        fail(f"'best_of' ({req.best_of}) must be >= 'n' ({req.n})", "best_of")
    if req.best_of not in (None, 1) and req.stream:
        fail("'best_of' cannot be used with 'stream'", "best_of")
    if req.max_tokens == 0 and not getattr(req, "echo", False):
        fail("'max_tokens' must be at least 1 (0 only with 'echo')", "max_tokens")
    for key in req.logit_bias or {}:
        if not key.lstrip("-").isdigit():
            fail(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias")
    guided = [
        k
        for k in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
        if getattr(req, k) is not None and not (k == "response_format" and req.response_format.type == "text")
    ]
    if len(guided) > 1:
        fail(f"use one of {', '.join(guided)}, not several", guided[1])
    rf = req.response_format
    if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
        fail("'response_format': type json_schema needs a 'json_schema' object", "response_format")
    if isinstance(req.guided_json, str):
        try:
            req.guided_json = json.loads(req.guided_json)
        except ValueError:
            fail("'guided_json' is not valid JSON", "guided_json")
    if isinstance(req, ChatRequest):
        if req.tool_choice not in (None, "none", "auto") and not req.tools:
            fail("'tool_choice' needs 'tools'", "tool_choice")
        if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in {
            t.function.name for t in req.tools
        }:
            fail(
                f"'tool_choice' names {req.tool_choice.function.name!r}, which is not among 'tools'",
                "tool_choice",
            )
        if req.tools and req.tool_choice not in (None, "none") and guided:
            fail("'tools' cannot be combined with structured output", guided[0])


def message_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: text parts joined, tool calls with their arguments as objects."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content if p.type == "text")
        d: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": content if content is not None else "",
        }
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                args = c.function.arguments
                if isinstance(args, str):
                    with contextlib.suppress(ValueError):
                        args = json.loads(args)
                calls.append(
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}}
                )
            d["tool_calls"] = calls
        out.append(d)
    return out
