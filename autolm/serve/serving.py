"""What every endpoint shares, as vLLM's OpenAIServing: the server's state (engine, sampling, prompts,
log-probability formats), tokenizer work on its own thread, sequences submitted and their events collected or
streamed as server-sent events that always end with [DONE]."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydantic import BaseModel

from ..generation import GenerationConfig
from .engine import Engine
from .errors import APIError
from .events import Delta, Entry, Failed, Finished, PromptLogprobs
from .logprobs import Logprobs
from .prompts import Prompts
from .responses import ErrorInfo, ErrorResponse, PromptTokensDetails, Usage
from .sampling import Plan, Sampling
from .speculation import Speculation
from .validation import Limits


class State:
    """The engine and the request logic for one model, shared by the serving objects."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        limits: Limits,
        max_batch: int = 8,
        prefix_cache_mb: int = 256,
        engine_thread: bool = True,
        speculation: Speculation | None = None,
        prefill_chunk: int = 512,
        task: str = "generate",
    ):
        self.name, self.limits, self.created = model_name, limits, int(time.time())
        # task "embed" / "classify": the body alone / a sequence classifier (serving_embedding.py), no engine
        self.model, self.task = model, task
        self.engine = (
            Engine(
                model, tokenizer, max_batch, prefix_cache_mb << 20, engine_thread, speculation, prefill_chunk
            )
            if task == "generate"
            else None
        )
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        eos = (base.generation_config or GenerationConfig()).eos_token_id
        self.sampling = Sampling(model, tokenizer, model_name, eos)
        report = getattr(base, "load_report", None)
        hide = (getattr(report, "directory", None) or "", getattr(tokenizer, "name_or_path", "") or "")
        self.prompts = Prompts(tokenizer, self.sampling.context, self.sampling.vocab, limits, hide)
        self.logprobs = Logprobs(tokenizer)
        self.tokenizer = tokenizer
        # One thread for all tokenizer work: off the event loop, and never two encodes at once (the
        # tokenizer's truncation settings are shared state).
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="autolm-tokenizer")
        self.closing = False  # SIGTERM: requests in flight end, new ones are refused
        self.forward_lock = threading.Lock()  # the pooling endpoints' forwards, one at a time

    async def off_loop(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self.worker.shutdown(wait=False, cancel_futures=True)


@dataclass
class Result:
    """One sequence's output so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    prompt_entries: list | None = None
    end: Finished | None = None

    def add(self, ev: Delta | PromptLogprobs) -> None:
        if isinstance(ev, PromptLogprobs):
            self.prompt_entries = ev.entries
            return
        self.text += ev.text
        self.token_ids += ev.token_ids
        self.entries += ev.logprobs
        if isinstance(ev, Finished):
            self.end, self.text = ev, ev.full_text


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def error_body(exc: APIError) -> ErrorResponse:
    info = ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    return ErrorResponse(error=info)


class Serving:
    """The base of the serving objects: start a plan, collect its results or stream them."""

    prefix = "cmpl-"
    api = ""  # the API's name in errors

    def __init__(self, state: State):
        self.state = state

    def response_id(self, req, prefix: str | None = None) -> str:
        return (self.prefix if prefix is None else prefix) + (req.request_id or uuid.uuid4().hex[:24])

    async def start(self, build: Callable) -> tuple[asyncio.Queue, Plan]:
        """build(emit_for) -> Plan, run on the tokenizer thread (grammars compile there); its sequences submitted."""
        if self.state.closing:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        if self.state.engine is None:
            raise APIError(400, f"The model does not support {type(self).api} API: this server runs --task "
                           f"{self.state.task}", param="model")  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        plan = await self.state.off_loop(
            build, lambda k: lambda ev: loop.call_soon_threadsafe(events.put_nowait, (k, ev))
        )
        for s in plan.sequences:
            self.state.engine.submit(s)
        return events, plan

    @staticmethod
    def cancel(plan: Plan) -> None:
        for s in plan.sequences:
            s.cancelled = True

    async def collect(self, request, events: asyncio.Queue, plan: Plan) -> list[Result]:
        """Every sequence's whole result; a client that hangs up frees its rows within half a second."""
        results = [Result() for _ in plan.sequences]
        left, checked = len(plan.sequences), time.monotonic()
        try:
            while left:
                if time.monotonic() - checked > 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise APIError(499, "client disconnected")
                try:
                    k, ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if isinstance(ev, Failed):
                    raise APIError(500, ev.message, type="server_error")
                results[k].add(ev)
                left -= isinstance(ev, Finished)
        finally:
            self.cancel(plan)
        return results

    @staticmethod
    def best(plan: Plan, results: list[Result]) -> list[tuple[int, Result]]:
        """(prompt index, result) for the n answers per prompt: the first n, or the n likeliest of best_of."""
        out = []
        for p in range(len(plan.prompts)):
            group = results[p * plan.best_of : (p + 1) * plan.best_of]
            if plan.best_of > plan.n:
                group = sorted(group, key=lambda r: -r.end.cumulative_logprob)
            out += [(p, r) for r in group[: plan.n]]
        return out

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> Usage:
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def total_usage(self, plan: Plan, results: list[Result]) -> Usage:
        completion = sum(r.end.completion_tokens for r in results if r.end is not None)
        # a prompt counts once (as its tokens do), however many completions of it ran: its first one's reuse
        firsts = results[:: max(plan.best_of, 1)]
        cached = sum(r.end.cached_tokens for r in firsts if r.end is not None)
        return self.usage(sum(len(p) for p in plan.prompts), completion, cached)

    async def stream(
        self, req, events: asyncio.Queue, plan: Plan, opening: list[str], render: Callable, final: Callable
    ) -> AsyncIterator[str]:
        """Server-sent events: the opening chunks, render(k, event, result)'s chunks per engine event,
        final(usage)'s usage chunk, then [DONE]; an engine failure is an error event, and [DONE] still ends it."""
        results = [Result() for _ in plan.sequences]
        done = 0
        try:
            for line in opening:
                yield line
            while done < len(plan.sequences):
                k, ev = await events.get()
                if isinstance(ev, Failed):
                    yield sse(error_body(APIError(500, ev.message, type="server_error")))
                    break
                results[k].add(ev)
                for line in render(k, ev, results[k]):
                    yield line
                done += isinstance(ev, Finished)
            else:
                options = req.stream_options
                if options is not None and options.include_usage:
                    yield final(self.total_usage(plan, results))
            yield "data: [DONE]\n\n"
        finally:
            self.cancel(plan)  # a client that went away frees its rows at the next step

    def running_usage(self, req, plan: Plan, k: int, result: Result) -> Usage | None:
        """vLLM's continuous_usage_stats: every chunk carries its sequence's usage so far."""
        options = req.stream_options
        if options is None or not options.include_usage or not options.continuous_usage_stats:
            return None
        done = result.end.completion_tokens if result.end is not None else len(result.token_ids)
        return self.usage(len(plan.sequences[k].prompt), done)
