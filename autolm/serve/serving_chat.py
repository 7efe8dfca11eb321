"""POST /v1/chat/completions, as vLLM's OpenAIServingChat: messages through the chat template, tools, echo,
and the answer as one response or as chunks."""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import StreamingResponse

from .events import Finished, PromptLogprobs
from .protocol import ChatRequest
from .responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    DeltaToolCall,
    ToolCall,
)
from .serving import Result, Serving, sse
from .tools import parse_tool_calls


class ServingChat(Serving):
    prefix = "chatcmpl-"
    api = "Chat Completions"

    async def create(self, req: ChatRequest, request):
        self.state.sampling.check_model(req)
        state = self.state
        prompt = await state.off_loop(state.prompts.chat, req)
        ids = state.prompts.truncate([prompt.ids], req)[0]
        events, plan = await self.start(
            lambda emit_for: state.sampling.plan(
                req, [ids], [prompt.text], emit_for, prompt.tools, prompt.tool_fmt
            )
        )
        head = dict(id=self.response_id(req), created=int(time.time()), model=state.name)
        echo = _echo(req)
        if req.stream:
            opening = self._opening(req, plan, head, echo, prompt.text)
            render = lambda k, ev, r: self._render(req, plan, head, k, ev, r)  # noqa: E731
            final = lambda usage: sse(ChatCompletionChunk(**head, choices=[], usage=usage))  # noqa: E731
            return StreamingResponse(
                self.stream(req, events, plan, opening, render, final), media_type="text/event-stream"
            )
        results = await self.collect(request, events, plan)
        # Off the event loop: with the whole vocabulary as logprobs, an answer holds millions of entries.
        return await asyncio.to_thread(self._response, req, plan, results, head, echo, ids, prompt.text)

    def _response(
        self, req: ChatRequest, plan, results, head, echo, ids, prompt_text
    ) -> ChatCompletionResponse:
        fmt, choices = self.state.logprobs, []
        for i, (_, r) in enumerate(self.best(plan, results)):
            message, tool_reason = self._message(plan, r.text)
            if echo and message.content is not None:
                message.content = echo + message.content
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=fmt.chat(r.entries, bool(req.return_tokens_as_token_ids))
                    if req.logprobs
                    else None,
                    finish_reason=tool_reason or r.end.reason,
                    stop_reason=r.end.stop_reason,
                    token_ids=r.end.all_token_ids if req.return_token_ids else None,
                )
            )
        first = results[0].prompt_entries
        return ChatCompletionResponse(
            **head,
            choices=choices,
            usage=self.total_usage(plan, results),
            prompt_logprobs=fmt.prompt(first) if first is not None else None,
            prompt_token_ids=ids if req.return_token_ids else None,
            prompt_text=prompt_text if req.return_prompt_text else None,
        )

    def _message(self, plan, text: str) -> tuple[ChatMessage, str | None]:
        """The assistant message for `text`: tool_calls when the output is a call (and reason 'tool_calls')."""
        if plan.tools:
            names = {t["function"]["name"] for t in plan.tools}
            content, calls = parse_tool_calls(text, plan.tool_fmt, names)
            if calls:
                return ChatMessage(content=content, tool_calls=[ToolCall(**c) for c in calls]), "tool_calls"
        return ChatMessage(content=text), None

    def _opening(self, req: ChatRequest, plan, head: dict, echo: str, prompt_text: str) -> list[str]:
        """Per choice the role chunk (the first one with the prompt's ids and text when asked), then any echo."""
        lines = []
        for i in range(plan.n):
            first = i == 0
            lines.append(
                sse(
                    ChatCompletionChunk(
                        **head,
                        choices=[ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
                        prompt_token_ids=plan.prompts[0] if first and req.return_token_ids else None,
                        prompt_text=prompt_text if first and req.return_prompt_text else None,
                    )
                )
            )
            if echo:
                lines.append(
                    sse(ChatCompletionChunk(**head, choices=[_delta(i, DeltaMessage(content=echo))]))
                )
        return lines

    def _render(self, req: ChatRequest, plan, head: dict, k: int, ev, r: Result):
        """Content deltas as they come; with tools, the reply is held until it is known to be a call or not."""
        if isinstance(ev, PromptLogprobs):
            return  # in the response only: not streamed (as vLLM)
        end = ev if isinstance(ev, Finished) else None
        as_ids = bool(req.return_tokens_as_token_ids)
        if plan.tools:
            if end is None:
                return
            message, tool_reason = self._message(plan, end.full_text)
            if tool_reason:
                calls = [DeltaToolCall(index=j, **c.model_dump()) for j, c in enumerate(message.tool_calls)]
                delta = DeltaMessage(tool_calls=calls)
            else:
                delta = DeltaMessage(content=message.content)
            entries, ids, reason = r.entries, r.token_ids, tool_reason or end.reason
        else:
            if not (ev.text or end or (req.logprobs and ev.logprobs)):
                return
            delta = DeltaMessage(content=ev.text or None)
            entries, ids, reason = ev.logprobs, ev.token_ids, end.reason if end else None
        choice = _delta(k, delta, reason, end.stop_reason if end else None)
        if req.logprobs and entries:
            choice.logprobs = self.state.logprobs.chat(entries, as_ids)
        if req.return_token_ids:
            choice.token_ids = ids
        yield sse(ChatCompletionChunk(**head, choices=[choice], usage=self.running_usage(req, plan, k, r)))


def _delta(i: int, delta: DeltaMessage, reason=None, stop_reason=None) -> ChatStreamChoice:
    return ChatStreamChoice(index=i, delta=delta, finish_reason=reason, stop_reason=stop_reason)


def _echo(req: ChatRequest) -> str:
    """vLLM's chat `echo`: the last message's content, when the reply continues that role (the assistant's)."""
    if not req.echo or req.messages[-1].role != "assistant":
        return ""
    content = req.messages[-1].content
    return "".join(p.text or "" for p in content) if isinstance(content, list) else content or ""
