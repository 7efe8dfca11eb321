"""The OpenAI request bodies as pydantic models: every field checked for type and range; a violation is a
400 with OpenAI's error body naming the field. Unknown fields are logged and ignored, as vLLM does."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

logger = logging.getLogger("autolm.serve")

Number = Annotated[float, Field(allow_inf_nan=False)]


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0, le=1)
    repetition_penalty: Number | None = Field(None, gt=0, le=10)
    n: StrictInt = Field(1, ge=1, le=16)
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt]]


def parse(cls: type[_Request], raw: bytes) -> _Request:
    """Validate a request body; APIError 400 naming the first offending field."""
    try:
        req = cls.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, str) or not x[0].isupper()) or None
        if err["type"] == "json_invalid":
            raise APIError(400, f"request body is not valid JSON: {err['msg']}") from None
        raise APIError(400, f"'{loc}': {err['msg']}" if loc else err["msg"],
                       param=loc.split(".")[0] if loc else None) from None
    if req.model_extra:
        logger.info("ignoring unknown request fields: %s", ", ".join(sorted(req.model_extra)))
    return req


def message_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them (text parts joined)."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content if p.type == "text")
        out.append({"role": m.role, "content": content if content is not None else ""})
    return out


