"""The HTTP routes, as vLLM's api_router: each one checks the key, reads and validates its body, and hands the
request to its serving object (serving_chat.py, serving_completion.py, serving_models.py).

Bodies must be JSON, are refused past max_body bytes before they are read and past body_timeout seconds
while they are read, and are validated off the event loop. Errors are OpenAI's error body, with no
filesystem path in them."""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run time.
import asyncio
import contextlib
import functools
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from .. import __version__
from .errors import APIError, bad_request
from .openapi import Route, openapi_schema
from .protocol import (
    ChatRequest,
    ClassificationChatRequest,
    ClassificationRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingChatRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    PoolingChatRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    UnloadLoRAAdapterRequest,
)
from .responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    ClassificationResponse,
    CompletionChunk,
    CompletionResponse,
    DetokenizeResponse,
    EmbeddingResponse,
    HealthResponse,
    ModelList,
    PoolingResponse,
    RerankResponse,
    ScoreResponse,
    TokenizeResponse,
    VersionResponse,
)
from .serving import State, error_body
from .serving_chat import ServingChat
from .serving_completion import ServingCompletion
from .serving_embedding import ServingClassification, ServingEmbedding
from .serving_models import ServingModels, ServingTokens
from .serving_pooling import ServingPooling
from .serving_score import ServingScores
from .speculation import Speculation
from .validation import Limits, parse

MAX_BODY_BYTES = 4 << 20
SCORE, RERANK = ("/score", "/v1/score"), ("/rerank", "/v1/rerank", "/v2/rerank")  # vLLM's paths

ROUTES = [
    Route("/v1/chat/completions", "post", (ChatRequest,), ChatCompletionResponse, ChatCompletionChunk),
    Route("/v1/completions", "post", (CompletionRequest,), CompletionResponse, CompletionChunk),
    Route("/v1/embeddings", "post", (EmbeddingRequest, EmbeddingChatRequest), EmbeddingResponse),
    Route("/classify", "post", (ClassificationRequest, ClassificationChatRequest), ClassificationResponse),
    Route("/pooling", "post", (PoolingRequest, PoolingChatRequest), PoolingResponse),
    *(Route(path, "post", (ScoreRequest,), ScoreResponse) for path in SCORE),
    *(Route(path, "post", (RerankRequest,), RerankResponse) for path in RERANK),
    Route("/v1/models", "get", (), ModelList, errors=("401",)),
    Route("/tokenize", "post", (TokenizeCompletionRequest, TokenizeChatRequest), TokenizeResponse),
    Route("/detokenize", "post", (DetokenizeRequest,), DetokenizeResponse),
    Route("/health", "get", (), HealthResponse, errors=()),
    Route("/version", "get", (), VersionResponse, errors=()),
]


class Access:
    """The API key and the limits on reading a body."""

    def __init__(self, state: State, api_key: str | None, max_body: int, body_timeout: float):
        self.state, self.api_key, self.max_body, self.body_timeout = state, api_key, max_body, body_timeout

    def authorize(self, request: Request) -> None:
        """Every route but /health and /version checks the key itself (an HTTP middleware would hide client
        disconnects)."""
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(401, "Incorrect or missing API key", code="invalid_api_key")

    async def read(self, request: Request, *classes):
        """The body validated as the first of `classes` (the second, if any, when it has 'messages')."""
        self.authorize(request)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise bad_request(
                f"Unsupported Media Type {media or '(none)'!r}: the body must be 'application/json'"
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise APIError(
                413, f"request body of {declared} bytes is over this server's {self.max_body}-byte limit"
            )
        chunks, size, deadline = [], 0, time.monotonic() + self.body_timeout
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - time.monotonic(), 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body was not sent within {self.body_timeout:g} s") from None
            size += len(chunk)
            if size > self.max_body:
                raise APIError(413, f"request body is over this server's {self.max_body}-byte limit")
            chunks.append(chunk)
        return await asyncio.to_thread(parse, classes, b"".join(chunks), self.state.limits)


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


async def _answer(result):
    """A handler's awaited result as the response: a response as it is, a pydantic model as JSON."""
    result = await result
    if isinstance(result, Response):
        return result
    return Response(await asyncio.to_thread(result.model_dump_json), media_type="application/json")


def build_router(state: State, access: Access) -> APIRouter:
    """The routes over the serving objects."""
    chat, completion = ServingChat(state), ServingCompletion(state)
    models, tokens = ServingModels(state), ServingTokens(state)
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(chat.create(await access.read(request, ChatRequest), request))

    @router.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(completion.create(await access.read(request, CompletionRequest), request))

    @router.get("/v1/models")
    async def list_models(request: Request):
        access.authorize(request)
        return _json(models.models())

    @router.post("/tokenize")
    async def tokenize(request: Request):
        return _json(
            await tokens.tokenize(await access.read(request, TokenizeCompletionRequest, TokenizeChatRequest))
        )

    @router.post("/detokenize")
    async def detokenize(request: Request):
        return _json(await tokens.detokenize(await access.read(request, DetokenizeRequest)))

    @router.get("/health")
    async def health():
        return _json(models.health())

    @router.get("/version")
    async def version():
        return _json(models.version())

    _pooling_routes(router, state, access)
    if state.runtime_lora:
        _lora_routes(router, models, access)
    return router


def _pooling_routes(router: APIRouter, state: State, access: Access) -> None:
    """vLLM's pooling endpoints: /v1/embeddings, /classify, /pooling, /score and /rerank."""
    embedding, classification = ServingEmbedding(state), ServingClassification(state)
    scores, pooled = (
        ServingScores(state, embedding, classification),
        ServingPooling(state, embedding, classification),
    )

    @router.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await _answer(
            embedding.create(await access.read(request, EmbeddingRequest, EmbeddingChatRequest))
        )

    @router.post("/classify")
    async def classify(request: Request):
        body = await access.read(request, ClassificationRequest, ClassificationChatRequest)
        return await _answer(classification.create(body))

    @router.post("/pooling")
    async def pooling(request: Request):
        return await _answer(pooled.create(await access.read(request, PoolingRequest, PoolingChatRequest)))

    async def score(request: Request):
        return await _answer(scores.score(await access.read(request, ScoreRequest)))

    async def rerank(request: Request):
        return await _answer(scores.rerank(await access.read(request, RerankRequest)))

    for path in SCORE:
        router.add_api_route(path, score, methods=["POST"])
    for path in RERANK:
        router.add_api_route(path, rerank, methods=["POST"])


def _lora_routes(router: APIRouter, models: ServingModels, access: Access) -> None:
    """vLLM's runtime LoRA routes (VLLM_ALLOW_RUNTIME_LORA_UPDATING): plain-text answers."""

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return Response(await models.load_adapter(await access.read(request, LoadLoRAAdapterRequest)))

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return Response(await models.unload_adapter(await access.read(request, UnloadLoRAAdapterRequest)))


def create_app(
    model,
    tokenizer,
    model_name: str = "autolm",
    api_key: str | None = None,
    max_batch: int = 8,
    max_body: int = MAX_BODY_BYTES,
    limits: Limits | None = None,
    body_timeout: float = 30.0,
    prefix_cache_mb: int = 256,
    engine_thread: bool = True,
    speculation: Speculation | None = None,
    prefill_chunk: int = 512,
    task: str = "generate",
    runtime_lora: bool = False,
) -> FastAPI:
    """The FastAPI application serving `model` under `model_name`; prompts' keys and values are reused within
    `prefix_cache_mb` (autolm.serve.prefix; 0: off). engine_thread=False: the caller runs
    `app.state.server.engine.run()` (until the app shuts down); `speculation`: autolm.serve.speculation; `prefill_chunk`: prompt tokens per forward (autolm.serve.engine); task "embed": `model` is a body
    (AutoModel) served at /v1/embeddings, "classify": a sequence classifier at /classify; neither generates.
    runtime_lora: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (a generating server)."""
    state = State(
        model,
        tokenizer,
        model_name,
        limits or Limits(),
        max_batch,
        prefix_cache_mb,
        engine_thread,
        speculation,
        prefill_chunk,
        task,
    )
    state.runtime_lora = runtime_lora and task == "generate"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.close()  # requests still in flight end with finish_reason "abort"

    app = FastAPI(title="autolm", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = state
    app.include_router(build_router(state, Access(state, api_key, max_body, body_timeout)))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        exc.message = state.prompts.scrub(exc.message)
        return Response(
            error_body(exc).model_dump_json(), status_code=exc.status, media_type="application/json"
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # logged by uvicorn; its text may name paths
        body = error_body(APIError(500, f"internal error ({type(exc).__name__})", type="server_error"))
        return Response(body.model_dump_json(), status_code=500, media_type="application/json")

    app.openapi = functools.partial(openapi_schema, app, ROUTES, __version__, bool(api_key))
    return app
