"""Prompts from requests: chat messages rendered by the chat template (with tools), completion prompts as text
or token ids, truncation, and the per-request prompt limits. Runs on the server's tokenizer thread, never on
the event loop. Error messages name the request field and never a path on the server."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from ..errors import TokenizerError
from .errors import bad_request
from .protocol import ChatRequest, CompletionRequest, Message, TokenizeChatRequest
from .tools import tool_format, tool_instructions
from .validation import Limits


@dataclass
class ChatPrompt:
    ids: list[int]
    text: str
    tools: list[dict] | None
    tool_fmt: str


class Prompts:
    """Turns messages and prompts into token ids for one tokenizer and context length."""

    def __init__(self, tokenizer, context: int, vocab: int, limits: Limits, hide: tuple[str, ...] = ()):
        self.tokenizer, self.context, self.vocab, self.limits = tokenizer, context, vocab, limits
        self.hide = tuple(h for h in hide if h)  # paths that must not reach a client

    def scrub(self, message: str) -> str:
        for h in self.hide:
            message = message.replace(h, "<model>")
        return message

    def chat(self, req: ChatRequest | TokenizeChatRequest) -> ChatPrompt:
        messages = message_dicts(req.messages)
        tools = None
        if req.tools and getattr(req, "tool_choice", None) != "none":
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
        if req.chat_template is None and not self.tokenizer.chat_template:
            raise bad_request(
                "this model has no chat template: send one as 'chat_template' (or serve it with --chat-template)",
                "messages",
            )
        try:
            template = self.tokenizer.get_chat_template(req.chat_template, tools)
            if tools and "tools" not in template:  # the template cannot show them: say it ourselves
                text = tool_instructions(tools)
                if messages[0]["role"] == "system":
                    messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + text}
                else:
                    messages.insert(0, {"role": "system", "content": text})
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                documents=req.documents,
                chat_template=req.chat_template,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message,
                tokenize=False,
                **(req.chat_template_kwargs or {}),
            )
        except (TokenizerError, TypeError, ValueError) as e:
            raise bad_request(
                f"the chat template rejected these messages: {self.scrub(str(e))}", "messages"
            ) from None
        ids = self.encode([text], req.add_special_tokens, "messages")[0]
        self.check_total([ids], "messages")
        return ChatPrompt(ids, text, tools, tool_format(template))

    def completion(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt."""
        p = req.prompt
        items = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
        if len(items) > self.limits.max_prompts:
            raise bad_request(
                f"'prompt' has {len(items)} prompts, over this server's limit of {self.limits.max_prompts}",
                "prompt",
            )
        texts = [x for x in items if isinstance(x, str)]
        encoded = iter(self.encode(texts, req.add_special_tokens, "prompt") if texts else [])
        ids_list, text_list = [], []
        for item in items:
            if isinstance(item, str):
                ids = next(encoded)
                if not ids:
                    raise bad_request("'prompt' encodes to no tokens", "prompt")
                ids_list.append(ids)
                text_list.append(item)
            else:
                bad = sorted({t for t in item if t >= self.vocab})
                if bad:
                    raise bad_request(
                        f"'prompt': token ids {bad[:10]} are not in this model's vocabulary [0, {self.vocab})",
                        "prompt",
                    )
                ids_list.append(list(item))
                text_list.append(self.tokenizer.decode(item) if req.echo else "")
        self.check_total(ids_list, "prompt")
        return ids_list, text_list

    def truncate(self, prompts: list[list[int]], req) -> list[list[int]]:
        """vLLM's truncate_prompt_tokens: keep the last k tokens of each prompt (the first k with
        truncation_side "right"); -1 means the model's context length."""
        k = req.truncate_prompt_tokens
        if k is None:
            return prompts
        if k == -1:
            k = self.context
        if k > self.context:
            raise bad_request(
                f"'truncate_prompt_tokens' ({k}) is over this model's context length ({self.context})",
                "truncate_prompt_tokens",
            )
        if k == 0:
            raise bad_request(
                "'truncate_prompt_tokens' must keep at least one token", "truncate_prompt_tokens"
            )
        return [p[:k] if req.truncation_side == "right" else p[-k:] for p in prompts]

    def encode(self, texts: list[str], special: bool, param: str, **kwargs) -> list[list[int]]:
        """The texts' ids (kwargs: the tokenizer's, e.g. text_pair, truncation); a text it refuses names `param`."""
        try:
            return [list(x) for x in self.tokenizer(texts, add_special_tokens=special, **kwargs)["input_ids"]]
        except (TokenizerError, TypeError, ValueError) as e:
            raise bad_request(f"'{param}' cannot be encoded: {self.scrub(str(e))}", param) from None

    def check_total(self, prompts: list[list[int]], param: str) -> None:
        total = sum(len(p) for p in prompts)
        if total > self.limits.max_prompt_tokens:
            raise bad_request(
                f"'{param}' has {total} tokens in all, over this server's limit of {self.limits.max_prompt_tokens}",
                param,
            )


def message_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: text parts joined, tool calls with their arguments as objects."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content)
        d: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": content if content is not None else "",
        }
        for key in ("name", "tool_call_id", "reasoning", "reasoning_content"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
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
