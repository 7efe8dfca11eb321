"""The OpenAI-compatible HTTP API over the engine: /v1/chat/completions, /v1/completions, /v1/models, /health.

The HTTP side validates requests (pydantic models, off the event loop, after a body-size check),
hands them to the engine and turns its events into JSON bodies or server-sent events.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run time.
import asyncio
import json
import time
import uuid

import torch

from ..generation import GenerationConfig
from .engine import Engine, Sequence
from .protocol import APIError, ChatRequest, CompletionRequest, message_dicts, parse

MAX_BODY_BYTES = 4 << 20


class Server:
    """Request settings and prompts around one Engine."""

    def __init__(self, model, tokenizer, model_name: str, api_key: str | None = None, max_batch: int = 8):
        self.model, self.tokenizer, self.name, self.api_key = model, tokenizer, model_name, api_key
        self.engine = Engine(model, tokenizer, max_batch)
        self.context = model.config.max_position_embeddings
        self.created = int(time.time())
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.eos = (base.generation_config or GenerationConfig()).eos_token_id

    def settings(self, req, prompt_len: int) -> tuple[GenerationConfig, list[str], int, int | None]:
        if req.model not in (None, self.name):
            raise APIError(404, f"The model '{req.model}' does not exist; this server has '{self.name}'",
                           param="model", code="model_not_found")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        room = self.context - prompt_len
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                           f"{prompt_len} and {max_tokens or 1} more were requested",
                           param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        cfg = GenerationConfig(
            max_new_tokens=max_tokens or room, do_sample=temperature > 0, temperature=temperature or 1.0,
            top_k=req.top_k if req.top_k and req.top_k > 0 else None, top_p=req.top_p or 1.0, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty or 1.0, eos_token_id=self.eos)
        return cfg, [s for s in stops if s], req.n, req.seed

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        try:
            return list(self.tokenizer.apply_chat_template(message_dicts(req.messages),
                                                           add_generation_prompt=True)["input_ids"])
        except Exception as e:
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"'prompt': token ids must be in [0, {vocab})", param="prompt")
            return prompt
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (or a list of token ids)", param="prompt")
        try:
            return self.tokenizer.encode(prompt)
        except Exception as e:
            raise APIError(400, f"'prompt' cannot be encoded: {e}", param="prompt") from None

    def start(self, prompt: list[int], cfg: GenerationConfig, stops: list[str], n: int, seed: int | None,
              loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue, list[Sequence]]:
        """Submit n sequences; their events arrive on one asyncio queue as (index, event)."""
        events: asyncio.Queue = asyncio.Queue()
        seqs = []
        for i in range(n):
            gen = torch.Generator(device=self.model.device)
            gen.manual_seed((seed + i) % 2**64 if seed is not None else int(torch.randint(0, 2**62, (1,))))
            emit = (lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))
            seqs.append(Sequence(prompt, cfg, stops, emit, gen))
        for s in seqs:
            self.engine.submit(s)
        return events, seqs


def create_app(model, tokenizer, model_name: str = "autolm", api_key: str | None = None, max_batch: int = 8,
               max_body: int = MAX_BODY_BYTES):
    """The FastAPI application serving `model` under `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    server = Server(model, tokenizer, model_name, api_key, max_batch)
    app = FastAPI(title="autolm", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {server.api_key}":
                err = APIError(401, "Incorrect or missing API key", type="invalid_request_error",
                               code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    async def read_request(request: Request, cls):
        """The body, refused past max_body bytes before it is all read, parsed off the event loop."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise APIError(413, f"request body of {declared} bytes is over this server's {max_body}-byte limit")
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
        return {"status": "ok" if engine.error is None else f"degraded: {engine.error}",
                "running": len(engine.active), "waiting": engine.pending.qsize(), "steps": engine.steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "autolm"}]}

    async def complete(req, prompt: list[int], chat: bool):
        cfg, stops, n, seed = server.settings(req, len(prompt))
        stream = req.stream
        usage_in_stream = req.stream_options is not None and req.stream_options.include_usage
        events, seqs = server.start(prompt, cfg, stops, n, seed, asyncio.get_running_loop())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": server.name}

        def choice(i: int, text: str | None, reason: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}

        if stream:
            async def sse():
                done, prompt_tokens, completion_tokens = 0, len(prompt), 0
                try:
                    if chat:
                        for i in range(n):
                            yield f"data: {json.dumps({**head, 'choices': [choice(i, '', None, True)]})}\n\n"
                    while done < n:
                        i, ev = await events.get()
                        if "error" in ev:
                            yield f"data: {json.dumps({'error': {'message': ev['error'], 'type': 'server_error'}})}\n\n"
                            return
                        reason = ev.get("finish_reason")
                        if ev["text"] or reason:
                            yield f"data: {json.dumps({**head, 'choices': [choice(i, ev['text'], reason)]})}\n\n"
                        if reason:
                            done += 1
                            completion_tokens += ev["completion_tokens"]
                    if usage_in_stream:
                        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    for s in seqs:  # a client that went away frees its rows at the next step
                        s.cancelled = True

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts, reasons, completion_tokens = [""] * n, [None] * n, 0
        try:
            while any(r is None for r in reasons):
                i, ev = await events.get()
                if "error" in ev:
                    raise APIError(500, ev["error"], type="server_error")
                texts[i] += ev["text"]
                if ev.get("finish_reason"):
                    reasons[i] = ev["finish_reason"]
                    completion_tokens += ev["completion_tokens"]
        finally:
            for s in seqs:
                s.cancelled = True
        usage = {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                 "total_tokens": len(prompt) + completion_tokens}
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage}
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_request(request, ChatRequest)
        return await complete(req, server.chat_prompt(req), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_request(request, CompletionRequest)
        return await complete(req, server.completion_prompt(req), chat=False)

    return app


def serve(model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_body: int = MAX_BODY_BYTES) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, tokenizer, model_name, api_key, max_batch, max_body), host=host, port=port,
                log_level="info")
