"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

One engine thread owns the model and runs continuous batching: requests are prefilled one by one
as they arrive and join the running batch between decode steps; finished or abandoned requests
leave it at once. The HTTP side (FastAPI) only validates requests, hands them to the engine and
turns its events into JSON bodies or server-sent events.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run time.
import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import KVCache
from .generation import GenerationConfig, cache_capacity, next_token_logits, process_logits

# ---- the engine -------------------------------------------------------------------------------------


@dataclass
class Sequence:
    """One completion being generated: its settings, its progress, and where its events go."""

    prompt: list[int]
    config: GenerationConfig
    stops: list[str]
    emit: Any  # callable(event dict), called from the engine thread
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    cancelled: bool = False
    cached: int = 0  # tokens of this sequence in the batch cache
    last: int = -1  # the latest sampled token, fed to the next decode step


class Engine:
    """Runs the model on a background thread; `submit` hands it a Sequence."""

    def __init__(self, model, tokenizer, max_batch: int = 8):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.pending: queue.Queue[Sequence] = queue.Queue()
        self.active: list[Sequence] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 where the cache slot holds a real token
        self.steps = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="autolm-engine", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        self.pending.put(seq)

    def _run(self) -> None:
        while True:
            try:
                self._admit(block=not self.active)
                self._step()
            except Exception as e:  # keep serving; fail the requests in flight
                self.error = e
                for seq in self.active:
                    seq.emit({"error": f"generation failed: {e}"})
                self.active, self.cache, self.mask = [], None, None

    @torch.inference_mode()
    def _admit(self, block: bool) -> None:
        """Take waiting requests (up to max_batch in all), prefill them together, add them to the batch."""
        joined: list[Sequence] = []
        while len(self.active) + len(joined) < self.max_batch:
            try:
                seq = self.pending.get(block=block and not joined)
            except queue.Empty:
                break
            if not seq.cancelled:
                joined.append(seq)
        if not joined:
            return
        try:
            cache = self._prefill(joined)
        except Exception as e:  # these requests fail; the running batch goes on
            for seq in joined:
                seq.emit({"error": f"generation failed: {type(e).__name__}: {e}"})
            return
        self._rebuild([(seq, cache, j) for j, seq in enumerate(joined)])

    def _prefill(self, seqs: list[Sequence]) -> KVCache:
        """Run the new prompts as one left-padded batch and sample each one's first token."""
        dev, T = self.model.device, max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, T - len(s.prompt):] = torch.tensor(s.prompt)
            mask[j, T - len(s.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = KVCache.for_model(self.model, len(seqs), T)
        out = self.model(ids, attention_mask=mask if not bool(mask.all()) else None, position_ids=positions,
                         past_key_values=cache, logits_to_keep=1)
        for j, s in enumerate(seqs):
            s.cached = len(s.prompt)
            self._take(s, out.logits[j, -1])
        return cache

    def _rebuild(self, joined: list[tuple[Sequence, KVCache, int]] = ()) -> None:
        """Drop finished rows and add new ones: the batch cache re-made with every row right-aligned."""
        keep = [(s, i) for i, s in enumerate(self.active) if not self._done(s)]
        new = [(s, c, j) for s, c, j in joined if not self._done(s)]
        rows = [(self.cache, i, s.cached) for s, i in keep] + [(c, j, s.cached) for s, c, j in new]
        self.active = [s for s, _ in keep] + [s for s, _, _ in new]
        if not self.active:
            self.cache, self.mask = None, None
            return
        longest = max(s.cached for s in self.active)
        self.cache = KVCache.gather(rows, cache_capacity(self.model, longest + 64))
        self.mask = torch.zeros(len(self.active), longest, dtype=torch.long, device=self.model.device)
        for i, s in enumerate(self.active):
            self.mask[i, longest - s.cached:] = 1

    @torch.inference_mode()
    def _step(self) -> None:
        """One decode step for every active row."""
        if any(self._done(s) for s in self.active):
            self._rebuild()
        if not self.active:
            return
        dev = self.model.device
        tokens = torch.tensor([[s.last] for s in self.active], device=dev)
        positions = torch.tensor([[s.cached] for s in self.active], device=dev)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
        logits = next_token_logits(self.model, tokens, self.mask, positions, self.cache)
        greedy = logits.argmax(-1).tolist()
        self.steps += 1
        for i, seq in enumerate(self.active):
            seq.cached += 1
            self._take(seq, logits[i], greedy[i])

    def _take(self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Choose the next token of a row, emit its text, and decide whether the row is finished."""
        cfg = seq.config
        if cfg.do_sample or cfg.repetition_penalty != 1.0 or greedy is None:
            history = torch.tensor([seq.prompt + seq.tokens], device=logits.device)
            scores = process_logits(logits[None].float(), history, cfg, len(seq.tokens))
            if cfg.do_sample:
                token = int(torch.multinomial(scores.softmax(-1), 1, generator=seq.generator))
            else:
                token = int(scores.argmax(-1))
        else:
            token = greedy
        seq.last = token
        if token in cfg.eos_ids:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in seq.stops if s in text), default=-1)
        if cut >= 0:
            return self._finish(seq, "stop", text[:cut])
        if len(seq.tokens) >= cfg.max_new_tokens:
            return self._finish(seq, "length", text)
        # Hold back an incomplete character, and any tail that could still become a stop string.
        safe = len(text) - (max(map(len, seq.stops)) - 1 if seq.stops else 0)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > seq.sent:
            seq.emit({"text": text[seq.sent: safe]})
            seq.sent = safe

    def _finish(self, seq: Sequence, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        seq.emit({"text": text[seq.sent:], "finish_reason": reason, "prompt_tokens": len(seq.prompt),
                  "completion_tokens": len(seq.tokens) + (reason == "stop" and seq.last in seq.config.eos_ids)})
        seq.sent = len(text)
        seq.cancelled = True  # marks it done: the next step drops the row

    @staticmethod
    def _done(seq: Sequence) -> bool:
        return seq.cancelled


# ---- the HTTP API -----------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, kind: type, lo: float | None = None, hi: float | None = None,
            default: Any = None, lo_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = f" in {'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]" if lo is not None else ""
        raise APIError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}{rng}, got {value!r}",
                       param=name)
    return value


class Server:
    """Request parsing and response shaping around one Engine."""

    def __init__(self, model, tokenizer, model_name: str, api_key: str | None = None, max_batch: int = 8):
        self.model, self.tokenizer, self.name, self.api_key = model, tokenizer, model_name, api_key
        self.engine = Engine(model, tokenizer, max_batch)
        self.context = model.config.max_position_embeddings
        self.created = int(time.time())

    # -- parsing

    def settings(self, body: dict, prompt_len: int) -> tuple[GenerationConfig, list[str], int, int | None]:
        if body.get("model") not in (None, self.name):
            raise APIError(404, f"The model '{body.get('model')}' does not exist; this server has '{self.name}'",
                           param="model", code="model_not_found")
        max_tokens = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
        room = self.context - prompt_len
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                           f"{prompt_len} and {max_tokens or 1} more were requested",
                           param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
        temperature = _number(body, "temperature", float, 0, 2, default=1.0)
        top_p = _number(body, "top_p", float, 0, 1, default=1.0, lo_open=True)
        top_k = _number(body, "top_k", int, -1, default=-1)
        min_p = _number(body, "min_p", float, 0, 1)
        penalty = _number(body, "repetition_penalty", float, 0, default=1.0, lo_open=True)
        n = _number(body, "n", int, 1, 16, default=1)
        seed = _number(body, "seed", int)
        stop = body.get("stop")
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
            stops = list(stop)
        else:
            raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
        stops = [s for s in stops if s]
        cfg = GenerationConfig(
            max_new_tokens=max_tokens or room, do_sample=temperature > 0, temperature=temperature or 1.0,
            top_k=top_k if top_k > 0 else None, top_p=top_p, min_p=min_p, repetition_penalty=penalty,
            eos_token_id=(self.model.generation_config or GenerationConfig()).eos_token_id)
        return cfg, stops, n, seed

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                               param="messages")
            clean.append({"role": m["role"], "content": content})
        try:
            return list(self.tokenizer.apply_chat_template(clean, add_generation_prompt=True)["input_ids"])
        except Exception as e:
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return prompt
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (or a list of token ids)", param="prompt")
        return self.tokenizer.encode(prompt)

    # -- running

    def start(self, prompt: list[int], cfg: GenerationConfig, stops: list[str], n: int, seed: int | None,
              loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue, list[Sequence]]:
        """Submit n sequences; their events arrive on one asyncio queue as (index, event)."""
        events: asyncio.Queue = asyncio.Queue()
        seqs = []
        for i in range(n):
            gen = torch.Generator(device=self.model.device)
            gen.manual_seed(seed + i if seed is not None else int(torch.randint(0, 2**62, (1,))))
            emit = (lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))
            seqs.append(Sequence(prompt, cfg, stops, emit, gen))
        for s in seqs:
            self.engine.submit(s)
        return events, seqs


def create_app(model, tokenizer, model_name: str = "autolm", api_key: str | None = None, max_batch: int = 8):
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

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        engine = server.engine
        return {"status": "ok" if engine.error is None else f"degraded: {engine.error}",
                "running": len(engine.active), "waiting": engine.pending.qsize(), "steps": engine.steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "autolm"}]}

    async def complete(body: dict, prompt: list[int], chat: bool):
        cfg, stops, n, seed = server.settings(body, len(prompt))
        stream = bool(body.get("stream", False))
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage", False))
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
        body = await read_json(request)
        return await complete(body, server.chat_prompt(body), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        return await complete(body, server.completion_prompt(body), chat=False)

    return app


def serve(model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, tokenizer, model_name, api_key, max_batch), host=host, port=port,
                log_level="info")
