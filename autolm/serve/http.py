"""The OpenAI-compatible HTTP API over the engine: /v1/chat/completions, /v1/completions, /v1/models, /health.

Requests are size-checked before they are read, validated off the event loop (pydantic models), turned
into engine sequences (requests.py) and answered as JSON bodies or server-sent events. A client that
hangs up, streaming or not, frees its batch rows at the next step; shutdown ends every request in
flight within a bounded time.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run time.
import asyncio
import contextlib
import ipaddress
import json
import logging
import sys
import time
import uuid

from ..generation import GenerationConfig
from .engine import Engine
from .protocol import APIError, ChatRequest, CompletionRequest, parse
from .requests import Plan, Requests

MAX_BODY_BYTES = 4 << 20
logger = logging.getLogger("autolm.serve")


class Server:
    """The engine and the request logic for one model."""

    def __init__(self, model, tokenizer, model_name: str, api_key: str | None = None, max_batch: int = 8):
        self.name, self.api_key = model_name, api_key
        self.engine = Engine(model, tokenizer, max_batch)
        self.created = int(time.time())
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.requests = Requests(
            model, tokenizer, model_name, (base.generation_config or GenerationConfig()).eos_token_id
        )


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Watch:
    """Engine events for one request, checking at least twice a second that its client is still there."""

    def __init__(self, events: asyncio.Queue, request):
        self.events, self.request, self.checked = events, request, time.monotonic()

    async def next(self) -> tuple:
        while True:
            if time.monotonic() - self.checked > 0.5:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    raise APIError(499, "client disconnected")
            try:
                return await asyncio.wait_for(self.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                pass


def create_app(
    model,
    tokenizer,
    model_name: str = "autolm",
    api_key: str | None = None,
    max_batch: int = 8,
    max_body: int = MAX_BODY_BYTES,
):
    """The FastAPI application serving `model` under `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    server = Server(model, tokenizer, model_name, api_key, max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.engine.stop()  # requests in flight end with finish_reason "abort"

    app = FastAPI(title="autolm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    reqs = server.requests

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    def authorize(request: Request) -> None:
        """Every /v1 route checks the key itself (an HTTP middleware would hide client disconnects)."""
        if server.api_key and request.headers.get("authorization", "") != f"Bearer {server.api_key}":
            raise APIError(401, "Incorrect or missing API key", code="invalid_api_key")

    async def read_request(request: Request, cls):
        """The body, refused past max_body bytes before it is all read, parsed off the event loop."""
        authorize(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise APIError(
                413, f"request body of {declared} bytes is over this server's {max_body}-byte limit"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise APIError(413, f"request body is over this server's {max_body}-byte limit")
            chunks.append(chunk)
        return await asyncio.to_thread(parse, cls, b"".join(chunks))

    @app.get("/health")
    async def health():
        engine = server.engine
        return {
            "status": "ok" if engine.error is None else f"degraded: {engine.error}",
            "running": len(engine.active),
            "waiting": engine.pending.qsize(),
            "steps": engine.steps,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": server.name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "autolm",
                    "max_model_len": reqs.context,
                }
            ],
        }

    def start(build) -> tuple[asyncio.Queue, Plan]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        plan = build(lambda k: lambda ev: loop.call_soon_threadsafe(events.put_nowait, (k, ev)))
        for s in plan.sequences:
            server.engine.submit(s)
        return events, plan

    def cancel(plan: Plan) -> None:
        for s in plan.sequences:
            s.cancelled = True

    async def collect(request, events: asyncio.Queue, plan: Plan) -> list[dict]:
        """Every sequence's whole result: text, finish reason, token counts, logprob entries."""
        results = [{"text": "", "entries": [], "prompt_entries": None} for _ in plan.sequences]
        left, watch = len(plan.sequences), Watch(events, request)
        while left:
            k, ev = await watch.next()
            if "error" in ev:
                raise APIError(500, ev["error"], type="server_error")
            r = results[k]
            r["text"] += ev["text"]
            r["entries"] += ev.get("logprobs", [])
            if "prompt_logprobs" in ev:
                r["prompt_entries"] = ev["prompt_logprobs"]
            if ev.get("finish_reason"):
                r.update(ev)
                r["text"] = ev["full_text"]
                left -= 1
        return results

    def best(plan: Plan, results: list[dict]) -> list[tuple[int, dict]]:
        """(prompt index, result) for the n answers per prompt: the first n, or the n likeliest of best_of."""
        out = []
        for p in range(len(plan.prompts)):
            group = results[p * plan.best_of : (p + 1) * plan.best_of]
            if plan.best_of > plan.n:
                group = sorted(group, key=lambda r: -r["cumulative_logprob"])
            out += [(p, r) for r in group[: plan.n]]
        return out

    def usage(plan: Plan, results: list[dict]) -> dict:
        prompt = sum(len(p) for p in plan.prompts)
        completion = sum(r.get("completion_tokens", 0) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_request(request, CompletionRequest)
        prompts, texts = reqs.completion_prompts(req)
        events, plan = start(lambda emit_for: reqs.plan(req, prompts, texts, emit_for=emit_for))
        head = {
            "id": "cmpl-" + uuid.uuid4().hex[:24],
            "object": "text_completion",
            "created": int(time.time()),
            "model": server.name,
        }
        if req.stream:
            return StreamingResponse(
                stream_completions(req, events, plan, head), media_type="text/event-stream"
            )
        try:
            results = await collect(request, events, plan)
        finally:
            cancel(plan)
        choices = []
        for i, (p, r) in enumerate(best(plan, results)):
            text = (plan.prompt_texts[p] if req.echo else "") + r["text"]
            logprobs = None
            if req.logprobs is not None:
                entries = r["entries"]
                if req.echo:
                    prompt_entries = r["prompt_entries"] or [None] * len(plan.prompts[p])
                    entries = [(plan.prompts[p][0], None, None)] + list(prompt_entries[1:]) + entries
                logprobs = reqs.completion_logprobs(entries)
            choices.append(
                {"index": i, "text": text, "logprobs": logprobs, "finish_reason": r["finish_reason"]}
            )
        return {**head, "choices": choices, "usage": usage(plan, results)}

    async def stream(req, events: asyncio.Queue, plan: Plan, head: dict, render, opening: list[str]):
        """Server-sent events: the opening chunks, render(k, event)'s chunks per engine event, usage, [DONE]."""
        done, results = 0, [{} for _ in plan.sequences]
        try:
            for line in opening:
                yield line
            while done < len(plan.sequences):
                k, ev = await events.get()
                if "error" in ev:
                    yield _sse({"error": {"message": ev["error"], "type": "server_error"}})
                    return
                for line in render(k, ev):
                    yield line
                if ev.get("finish_reason"):
                    done += 1
                    results[k] = ev
            if req.stream_options is not None and req.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(plan, results)})
            yield "data: [DONE]\n\n"
        finally:
            cancel(plan)  # a client that went away frees its rows at the next step

    def stream_completions(req, events, plan: Plan, head: dict):
        def render(k, ev):
            reason, entries = ev.get("finish_reason"), ev.get("logprobs", [])
            if ev["text"] or reason or entries:
                lp = reqs.completion_logprobs(entries) if req.logprobs is not None and entries else None
                yield _sse(
                    {
                        **head,
                        "choices": [
                            {"index": k, "text": ev["text"], "logprobs": lp, "finish_reason": reason}
                        ],
                    }
                )

        opening = (
            [
                _sse(
                    {
                        **head,
                        "choices": [
                            {
                                "index": p * plan.n + i,
                                "text": plan.prompt_texts[p],
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
                for p in range(len(plan.prompts))
                for i in range(plan.n)
            ]
            if req.echo
            else []
        )
        return stream(req, events, plan, head, render, opening)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_request(request, ChatRequest)
        prompt, tools, fmt = reqs.chat_prompt(req)
        events, plan = start(lambda emit_for: reqs.plan(req, [prompt], [""], tools, fmt, emit_for=emit_for))
        head = {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": server.name,
        }
        if req.stream:
            return StreamingResponse(
                stream_chat(req, events, plan, {**head, "object": "chat.completion.chunk"}),
                media_type="text/event-stream",
            )
        try:
            results = await collect(request, events, plan)
        finally:
            cancel(plan)
        choices = []
        for i, (_, r) in enumerate(best(plan, results)):
            message, tool_reason = reqs.tool_message(plan, r["text"])
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "finish_reason": tool_reason or r["finish_reason"],
                    "logprobs": reqs.chat_logprobs(r["entries"]) if req.logprobs else None,
                }
            )
        return {**head, "choices": choices, "usage": usage(plan, results)}

    def stream_chat(req, events, plan: Plan, head: dict):
        """Content deltas as they come; with tools, the reply is held until it is known to be a call or not."""

        def chunk(i, delta, reason=None, logprobs=None):
            return _sse(
                {
                    **head,
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
                }
            )

        def render(k, ev):
            reason, entries = ev.get("finish_reason"), ev.get("logprobs", [])
            lp = reqs.chat_logprobs(entries) if req.logprobs and entries else None
            if plan.tools:
                if reason:
                    message, tool_reason = reqs.tool_message(plan, ev["full_text"])
                    delta = (
                        {"tool_calls": [{**c, "index": j} for j, c in enumerate(message["tool_calls"])]}
                        if tool_reason
                        else {"content": message["content"]}
                    )
                    yield chunk(k, delta, tool_reason or reason, lp)
            elif ev["text"] or reason or lp:
                yield chunk(k, {"content": ev["text"]} if ev["text"] else {}, reason, lp)

        return stream(
            req,
            events,
            plan,
            head,
            render,
            [chunk(i, {"role": "assistant", "content": ""}) for i in range(plan.n)],
        )

    return app


def serve(
    model,
    tokenizer,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_body: int = MAX_BODY_BYTES,
    shutdown_timeout: float = 5.0,
) -> None:
    """Run the server until interrupted; SIGTERM ends requests in flight within `shutdown_timeout` seconds."""
    import uvicorn

    if not api_key and not _loopback(host):
        message = (
            f"WARNING: serving on {host} without --api-key: anyone who can reach this address can use the "
            "model. Pass --api-key (or AUTOLM_API_KEY) or bind 127.0.0.1."
        )
        logger.warning(message)
        print(message, file=sys.stderr, flush=True)
    print(f"serving {model_name} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(
        create_app(model, tokenizer, model_name, api_key, max_batch, max_body),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=shutdown_timeout,
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
