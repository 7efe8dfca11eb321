"""From a request body to a validated request: JSON and pydantic validation (every violation named in one 400),
refused and unknown fields, the rules that span fields, and the per-request limits that need no model."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import pydantic_core
from pydantic import BaseModel, ValidationError

from .errors import bad_request
from .protocol import REFUSED, ChatRequest, CompletionRequest, NamedToolChoice, StructuredOutputs

logger = logging.getLogger("autolm.serve")

# Segments of pydantic's error locations that name a union member or a validator, not a field.
_TAG = re.compile(r"[a-z]+(-[a-z]+)*\[.*\]|[a-z]+(-[a-z]+)+|[A-Z]\w*", re.S)
_TYPES = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}
_TOKEN_KEY = re.compile(r"-?[0-9]{1,12}")
# apply_chat_template's own arguments: as chat_template_kwargs they would change what it returns.
_RESERVED_TEMPLATE_KWARGS = {
    "conversation",
    "messages",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "return_tensors",
    "return_dict",
    "padding",
    "truncation",
    "max_length",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
}
GUIDED = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


@dataclass
class Limits:
    """Bounds on the work one request may ask for (`autolm serve` flags)."""

    max_prompts: int = 256  # prompts in one completions request
    max_prompt_tokens: int = 1 << 17  # prompt tokens in one request, all prompts together
    max_n: int = 16  # n and best_of
    max_logprobs: int = 20  # logprobs, top_logprobs, prompt_logprobs (-1: up to the whole vocabulary)


def _where(loc: tuple) -> str:
    """('logit_bias', '', 'float') -> "logit_bias['']"; union tags and validator names left out."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif out and (x in _TYPES or _TAG.fullmatch(x)):
            continue
        elif out and not x.isidentifier():
            out += f"[{x!r}]"
        else:
            out += ("." if out else "") + x
    return out


def parse(classes: tuple[type[BaseModel], ...], raw: bytes, limits: Limits | None = None) -> BaseModel:
    """Validate a request body as classes[0] (as classes[1] when there is one and the body has "messages"):
    APIError 400 naming every offending field (param: the first)."""
    cls = classes[0]
    try:
        if len(classes) > 1:
            data = pydantic_core.from_json(raw)
            cls = classes[1] if isinstance(data, dict) and "messages" in data else cls
            req = cls.model_validate(data)
        else:
            req = cls.model_validate_json(raw)
    except ValueError as e:
        if not isinstance(e, ValidationError):
            raise bad_request(f"request body is not valid JSON: {e}") from None
        errors = e.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise bad_request(f"request body is not valid JSON: {errors[0]['msg']}") from None
        named = []
        for err in errors[:20]:
            where = _where(err["loc"])
            named.append((where, f"'{where}': {err['msg']}" if where else err["msg"]))
        seen = list(dict.fromkeys(m for _, m in named))
        param = next((w.split(".")[0].split("[")[0] for w, _ in named if w), None)
        raise bad_request("; ".join(seen), param=param) from None
    _extra_fields(req)
    if isinstance(req, (ChatRequest, CompletionRequest)):
        check(req, limits or Limits())
    return req


def _extra_fields(req: BaseModel) -> None:
    extra = dict(req.model_extra or {})
    refused = [k for k in list(extra) if k in REFUSED and extra.pop(k) not in REFUSED[k]]
    if refused:
        raise bad_request(
            f"not supported by this server: {', '.join(repr(k) for k in refused)}",
            param=refused[0],
            code="unsupported_field",
        )
    if extra:
        logger.info("ignoring unknown request fields: %s", ", ".join(sorted(extra)))
    if getattr(req, "guided_decoding_backend", None) is not None:
        logger.info(
            "guided_decoding_backend %r ignored: llguidance decodes every grammar",
            req.guided_decoding_backend,
        )


def check(req: ChatRequest | CompletionRequest, limits: Limits) -> None:
    """Rules that span fields, and the limits that need no tokenizer."""
    chat = isinstance(req, ChatRequest)
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' can only be set when 'stream' is true", "stream_options")
    if req.best_of is not None and req.best_of < req.n:
        raise bad_request(f"'best_of' ({req.best_of}) must be >= 'n' ({req.n})", "best_of")
    if req.best_of not in (None, 1) and req.stream:
        raise bad_request("'best_of' cannot be used with 'stream'", "best_of")
    for name in ("n", "best_of"):
        if (getattr(req, name) or 0) > limits.max_n:
            raise bad_request(f"'{name}' is over this server's limit of {limits.max_n}", name)
    if req.max_tokens == 0 and not (not chat and req.echo):
        raise bad_request("'max_tokens' must be at least 1 (0 only with 'echo')", "max_tokens")
    bad = [k for k in req.logit_bias or {} if not _TOKEN_KEY.fullmatch(k)]
    if bad:
        shown = ", ".join(repr(k[:40]) for k in bad[:20])
        raise bad_request(f"'logit_bias' keys must be token ids; not token ids: {shown}", "logit_bias")
    _check_logprobs(req, limits, chat)
    _check_structured(req)
    if chat:
        _check_chat(req)
    elif (
        not isinstance(req.prompt, str)
        and not isinstance(req.prompt[0], int)
        and len(req.prompt) > limits.max_prompts
    ):
        raise bad_request(
            f"'prompt' has {len(req.prompt)} prompts, over this server's limit of {limits.max_prompts}",
            "prompt",
        )


def _check_logprobs(req, limits: Limits, chat: bool) -> None:
    name = "top_logprobs" if chat else "logprobs"
    asked = req.top_logprobs if chat else req.logprobs
    if chat and asked not in (None, 0) and not req.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    for field, value in ((name, asked), ("prompt_logprobs", req.prompt_logprobs)):
        if value is not None and limits.max_logprobs != -1 and (value == -1 or value > limits.max_logprobs):
            raise bad_request(
                f"'{field}' ({value}) is over this server's limit of {limits.max_logprobs}"
                + (" (-1 asks for the whole vocabulary)" if value == -1 else ""),
                field,
            )
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("'prompt_logprobs' is not available with 'stream'", "prompt_logprobs")


def _check_structured(req) -> None:
    guided = [
        k
        for k in GUIDED
        if getattr(req, k) is not None and not (k == "response_format" and req.response_format.type == "text")
    ]
    if len(guided) > 1:
        raise bad_request(f"use one of {', '.join(guided)}, not several", guided[1])
    rf = req.response_format
    if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
        raise bad_request(
            "'response_format': type json_schema needs a 'json_schema' object", "response_format"
        )
    so: StructuredOutputs | None = req.structured_outputs
    if so is not None:
        kinds = [
            k
            for k in ("json_", "regex", "choice", "grammar", "json_object", "structural_tag")
            if getattr(so, k)
        ]
        if len(kinds) != 1:
            raise bad_request(
                "'structured_outputs' takes exactly one of json, regex, choice, grammar, json_object, "
                f"structural_tag (got {len(kinds)})",
                "structured_outputs",
            )
    if isinstance(req.guided_json, str):
        try:
            req.guided_json = json.loads(req.guided_json)
        except ValueError:
            raise bad_request("'guided_json' is not valid JSON", "guided_json") from None


def _check_chat(req: ChatRequest) -> None:
    if req.tools == []:
        raise bad_request("'tools' must not be empty: give at least one tool or leave it out", "tools")
    if req.tool_choice not in (None, "none", "auto") and not req.tools:
        raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in {
        t.function.name for t in req.tools
    }:
        raise bad_request(
            f"'tool_choice' names {req.tool_choice.function.name!r}, which is not among 'tools'",
            "tool_choice",
        )
    guided = [k for k in GUIDED if getattr(req, k) is not None]
    if req.tools and req.tool_choice not in (None, "none", "auto") and guided:
        raise bad_request(
            "'tools' with a forced tool call cannot be combined with structured output", guided[0]
        )
    explicit = req.model_fields_set
    if req.continue_final_message and req.add_generation_prompt and "add_generation_prompt" in explicit:
        raise bad_request(
            "'continue_final_message' and 'add_generation_prompt' cannot both be true",
            "continue_final_message",
        )
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(req.chat_template_kwargs or {}))
    if reserved:
        raise bad_request(
            f"'chat_template_kwargs' cannot set {', '.join(reserved)}: they are request fields or "
            "the server's own",
            "chat_template_kwargs",
        )
    for i, m in enumerate(req.messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"'messages[{i}].content[{j}]': only text parts are supported (got type {part.type!r})",
                    "messages",
                )
