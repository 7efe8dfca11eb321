"""POST /v1/completions, as vLLM's OpenAIServingCompletion: prompts as text or token ids, echo, logprobs in
the completions format, and the answer as one response or as chunks."""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import StreamingResponse

from .events import Finished, PromptLogprobs
from .protocol import CompletionRequest
from .responses import CompletionChoice, CompletionChunk, CompletionResponse, CompletionStreamChoice
from .serving import Result, Serving, sse


class ServingCompletion(Serving):
    prefix = "cmpl-"
    api = "Completions"

    async def create(self, req: CompletionRequest, request):
        self.state.sampling.check_model(req)
        state = self.state
        prompts, texts = await state.off_loop(state.prompts.completion, req)
        if req.truncate_prompt_tokens is not None:
            prompts = state.prompts.truncate(prompts, req)
            if req.echo:
                texts = await state.off_loop(state.tokenizer.batch_decode, prompts)
        events, plan = await self.start(lambda emit_for: state.sampling.plan(req, prompts, texts, emit_for))
        head = dict(id=self.response_id(req), created=int(time.time()), model=state.name)
        if req.stream:
            render = _Stream(self, req, plan, head)
            final = lambda usage: sse(CompletionChunk(**head, choices=[], usage=usage))  # noqa: E731
            return StreamingResponse(
                self.stream(req, events, plan, [], render, final), media_type="text/event-stream"
            )
        results = await self.collect(request, events, plan)
        # Off the event loop: with the whole vocabulary as logprobs, an answer holds millions of entries.
        choices = await asyncio.to_thread(
            lambda: [self._choice(req, plan, i, p, r) for i, (p, r) in enumerate(self.best(plan, results))]
        )
        return CompletionResponse(**head, choices=choices, usage=self.total_usage(plan, results))

    def _choice(self, req: CompletionRequest, plan, i: int, p: int, r: Result) -> CompletionChoice:
        fmt, as_ids = self.state.logprobs, bool(req.return_tokens_as_token_ids)
        prompt = plan.prompts[p]
        logprobs = None
        if req.logprobs is not None:
            entries, tokens = list(r.entries), [e[0] for e in r.entries]
            if req.echo:  # the prompt's tokens first; without computed entries, each without a logprob
                entries = list(r.prompt_entries or [None] * len(prompt)) + entries
                tokens = prompt + tokens
            logprobs = fmt.completion(entries, tokens, as_ids=as_ids)
        return CompletionChoice(
            index=i,
            text=(plan.prompt_texts[p] if req.echo else "") + r.text,
            logprobs=logprobs,
            finish_reason=r.end.reason,
            stop_reason=r.end.stop_reason,
            token_ids=r.end.all_token_ids if req.return_token_ids else None,
            prompt_token_ids=prompt if req.return_token_ids else None,
            prompt_logprobs=fmt.prompt(r.prompt_entries) if r.prompt_entries is not None else None,
        )


class _Stream:
    """Chunks of one streamed completions request. Each choice's first chunk carries what it echoes (the
    prompt's text and logprobs) and, when asked, the prompt's token ids."""

    def __init__(self, serving: ServingCompletion, req: CompletionRequest, plan, head: dict):
        self.serving, self.req, self.plan, self.head = serving, req, plan, head
        self.started: set[int] = set()
        self.offsets: dict[int, int] = {}  # text offset of the next token, per choice

    def __call__(self, k: int, ev, r: Result):
        req, fmt, as_ids = self.req, self.serving.state.logprobs, bool(self.req.return_tokens_as_token_ids)
        p = k // self.plan.best_of
        if k not in self.started:
            self.started.add(k)
            text = self.plan.prompt_texts[p] if req.echo else ""
            self.offsets[k] = len(text)
            entries = ev.entries if isinstance(ev, PromptLogprobs) else None
            if req.echo or req.return_token_ids:
                prompt = self.plan.prompts[p]
                lp = None
                if req.echo and req.logprobs is not None:
                    lp = fmt.completion(entries or [None] * len(prompt), prompt, as_ids=as_ids)
                ids = prompt if req.return_token_ids else None
                yield self._chunk(
                    k, r, text=text, logprobs=lp, prompt_token_ids=ids, token_ids=[] if ids else None
                )
        if isinstance(ev, PromptLogprobs):
            return
        end = ev if isinstance(ev, Finished) else None
        if not (ev.text or end or ev.logprobs):
            return
        lp = None
        if req.logprobs is not None and ev.logprobs:
            lp = fmt.completion(ev.logprobs, [e[0] for e in ev.logprobs], self.offsets[k], as_ids=as_ids)
            self.offsets[k] += sum(len(t) for t in lp.tokens)
        yield self._chunk(
            k,
            r,
            text=ev.text,
            logprobs=lp,
            finish_reason=end.reason if end else None,
            stop_reason=end.stop_reason if end else None,
            token_ids=ev.token_ids if req.return_token_ids else None,
        )

    def _chunk(self, k: int, r: Result, **fields) -> str:
        choice = CompletionStreamChoice(index=k, **fields)
        usage = self.serving.running_usage(self.req, self.plan, k, r)
        return sse(CompletionChunk(**self.head, choices=[choice], usage=usage))
