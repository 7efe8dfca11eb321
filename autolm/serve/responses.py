"""The response bodies as pydantic models, with OpenAI's and vLLM's field names. vLLM's extensions (token ids,
prompt logprobs, the rendered prompt, ...) appear only when a request asks for them; OpenAI's own fields are
always there, null when empty, as OpenAI sends them."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_serializer


class _Out(BaseModel):
    # Fields left out of the JSON when None (vLLM's extensions, which OpenAI clients do not expect).
    omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_unasked(self, handler):
        data = handler(self)
        for name in self.omit_none:
            if data.get(name, 0) is None:
                del data[name]
        return data


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorInfo


class PromptTokensDetails(_Out):
    cached_tokens: int = 0  # prompt tokens whose keys and values the prefix cache held


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class LogprobToken(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(LogprobToken):
    top_logprobs: list[LogprobToken] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: list[ChatLogprobContent] | None = None


class CompletionLogprobs(_Out):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    # vLLM's order: the sampled token first, then the likeliest alternatives
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(_Out):
    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: entry} for the token itself
# and the requested number of likeliest alternatives.
PromptLogprobsList = list[dict[str, PromptLogprob] | None]


class FunctionCall(_Out):
    name: str
    arguments: str


class ToolCall(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ToolCall):
    index: int


class ChatMessage(_Out):
    omit_none = frozenset({"tool_calls"})
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class DeltaMessage(_Out):
    omit_none = frozenset({"role", "content", "tool_calls"})
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChoice(_Out):
    omit_none = frozenset({"token_ids"})
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Out):
    omit_none = frozenset({"prompt_logprobs", "prompt_token_ids", "prompt_text"})
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobsList | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None


class ChatStreamChoice(_Out):
    omit_none = frozenset({"stop_reason", "token_ids"})
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(_Out):
    omit_none = frozenset({"usage", "prompt_token_ids", "prompt_text"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None


class CompletionChoice(_Out):
    omit_none = frozenset({"token_ids", "prompt_token_ids", "prompt_logprobs"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobsList | None = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionStreamChoice(_Out):
    omit_none = frozenset({"stop_reason", "token_ids", "prompt_token_ids"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionChunk(_Out):
    omit_none = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "autolm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Out):
    omit_none = frozenset({"token_strs"})
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Out):
    prompt: str


class VersionResponse(_Out):
    version: str


class HealthResponse(_Out):
    status: str
    running: int
    waiting: int
    steps: int


class EmbeddingData(_Out):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 (encoding_format)


class EmbeddingUsage(_Out):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class EmbeddingResponse(_Out):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class ClassificationData(_Out):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassificationResponse(_Out):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: EmbeddingUsage


class ScoreData(_Out):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(_Out):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: EmbeddingUsage


class RerankDocument(_Out):
    text: str


class RerankResult(_Out):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(_Out):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(_Out):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class PoolingData(_Out):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[list[float]] | list[float] | str  # per token for the token_* tasks; base64: float32, flattened


class PoolingResponse(_Out):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: EmbeddingUsage
