"""The request bodies as pydantic models, with OpenAI's and vLLM's field names: every field checked for type and
range (a violation is a 400 naming the field, validation.py). The OpenAPI schema is generated from these
models and from the response models (responses.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Number = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[StrictInt, Field(ge=0, lt=2**63)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


class _Body(BaseModel):
    # Unknown fields are logged and ignored, as vLLM does (validation.py); known ones never silently dropped.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: StrictBool | None = True
    continuous_usage_stats: StrictBool | None = False


class JSONSchemaFormat(_Body):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: StrictStr = "response"
    description: StrictStr | None = None
    schema_: dict[str, Any] | StrictBool | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JSONSchemaFormat | None = None
    # vLLM's structural tags: text with tagged segments (begin, schema, end) that start at a trigger
    structures: list[dict[str, Any]] | None = None
    triggers: list[StrictStr] | None = None
    format: Any = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: one constraint (json, regex, choice, grammar, json_object, structural_tag)."""

    json_: dict[str, Any] | StrictBool | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None
    structural_tag: StrictStr | None = None
    disable_any_whitespace: StrictBool = False
    disable_additional_properties: StrictBool = False
    whitespace_pattern: StrictStr | None = None
    disable_fallback: StrictBool = False

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class FunctionDef(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: NonEmptyStr


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class _Request(_Body):
    """Fields that chat and completions share."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=0)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0, le=1)
    # Below 0.01 a penalty scales logits past float32's range (inf, then NaN probabilities).
    repetition_penalty: Number | None = Field(None, ge=0.01, le=10)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    n: StrictInt = Field(1, ge=1)
    best_of: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=64)] | None = None
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    allowed_token_ids: Annotated[list[StrictInt], Field(min_length=1)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    guided_grammar: StrictStr | None = None
    guided_whitespace_pattern: StrictStr | None = None
    guided_decoding_backend: StrictStr | None = None  # accepted and logged: llguidance decodes every grammar
    prompt_logprobs: StrictInt | None = Field(None, ge=-1)
    return_token_ids: StrictBool | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    request_id: Annotated[StrictStr, Field(max_length=256)] | None = None
    # Identifiers and switches that change nothing here: no prefix cache to salt, no render endpoint.
    session_id: StrictStr | None = None
    cache_salt: Annotated[StrictStr, Field(min_length=1, max_length=1024)] | None = None
    return_token_offsets: StrictBool | None = None


class ToolCallFunction(_Body):
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Body):
    type: NonEmptyStr
    text: StrictStr | None = None


class Message(_Body):
    # Any role the chat template accepts (vLLM passes custom roles through; the template decides).
    role: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    reasoning: StrictStr | None = None
    reasoning_content: StrictStr | None = None


class _ChatTemplateFields(_Body):
    messages: Annotated[list[Message], Field(min_length=1)]
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    chat_template: Annotated[StrictStr, Field(min_length=1)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    tools: list[Tool] | None = None


class ChatRequest(_Request, _ChatTemplateFields):
    """POST /v1/chat/completions."""

    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=-1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    echo: StrictBool = False
    return_prompt_text: StrictBool | None = None
    include_reasoning: StrictBool = True


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: (
        NonEmptyStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    logprobs: StrictInt | None = Field(None, ge=-1)
    echo: StrictBool = False
    add_special_tokens: StrictBool = True


class TokenizeCompletionRequest(_Body):
    """POST /tokenize with a prompt."""

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool | None = False


class TokenizeChatRequest(_ChatTemplateFields):
    """POST /tokenize with chat messages, rendered by the chat template."""

    model: StrictStr | None = None
    return_token_strs: StrictBool | None = False


class LoadLoRAAdapterRequest(_Body):
    """POST /v1/load_lora_adapter (a server started with --allow-runtime-lora), as vLLM's."""

    lora_name: StrictStr
    lora_path: StrictStr
    load_inplace: StrictBool = False


class UnloadLoRAAdapterRequest(_Body):
    """POST /v1/unload_lora_adapter."""

    lora_name: StrictStr
    lora_int_id: StrictInt | None = None


class DetokenizeRequest(_Body):
    """POST /detokenize."""

    model: StrictStr | None = None
    tokens: list[TokenId]


class _PooledInputs(_Body):
    """What the pooling endpoints' inputs share: texts or token ids, as vLLM's."""

    model: StrictStr | None = None
    input: (
        NonEmptyStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    user: StrictStr | None = None
    add_special_tokens: StrictBool = True
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None
    request_id: StrictStr | None = None


class _Activation(_Body):
    """vLLM's switch between a classifier's probabilities and its raw logits: use_activation (its older names
    softmax and activation win where set)."""

    use_activation: StrictBool | None = None
    activation: StrictBool | None = None
    softmax: StrictBool | None = None

    def activated(self) -> bool:
        return next((v for v in (self.softmax, self.activation, self.use_activation) if v is not None), True)


class _PooledChat(_ChatTemplateFields):
    """The pooling endpoints' chat form: one conversation rendered by the chat template, as vLLM's (no
    generation prompt unless asked)."""

    model: StrictStr | None = None
    add_generation_prompt: StrictBool = False
    user: StrictStr | None = None
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None
    request_id: StrictStr | None = None


class _Vectors(_Body):
    """How vectors come back: floats or base64, and a Matryoshka model's dimensions."""

    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None


class ClassificationRequest(_PooledInputs, _Activation):
    """POST /classify (a server started with --task classify)."""


class ClassificationChatRequest(_PooledChat, _Activation):
    """POST /classify with messages: the conversation's classes (a reward model's score of it)."""


class EmbeddingRequest(_PooledInputs, _Vectors):
    """POST /v1/embeddings (a server started with --task embed)."""


class EmbeddingChatRequest(_PooledChat, _Vectors):
    """POST /v1/embeddings with messages."""


PoolingTask = Literal["embed", "classify", "token_embed", "token_classify"]


class PoolingRequest(_PooledInputs, _Vectors, _Activation):
    """POST /pooling, vLLM's generic pooling: `task` (default: the server's) picks what each input gives."""

    task: PoolingTask | None = None


class PoolingChatRequest(_PooledChat, _Vectors, _Activation):
    """POST /pooling with messages."""

    task: PoolingTask | None = None


Texts = StrictStr | Annotated[list[StrictStr], Field(min_length=1)]


class ScoreRequest(_Activation):
    """POST /score (/v1/score): text_1 against each of text_2 (1:1, 1:N or N:N), as vLLM's: a cross-encoder's
    score (a one-label classifier, --task classify) or the cosine of two embeddings (--task embed)."""

    model: StrictStr | None = None
    text_1: Texts
    text_2: Texts
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None
    request_id: StrictStr | None = None


class RerankRequest(_Activation):
    """POST /rerank (/v1/rerank, /v2/rerank): the documents ordered by their score against the query, as vLLM's
    (Jina's and Cohere's API); top_n 0: all of them."""

    model: StrictStr | None = None
    query: StrictStr
    documents: Annotated[list[StrictStr], Field(min_length=1)]
    top_n: Annotated[StrictInt, Field(ge=0)] = 0
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None
    request_id: StrictStr | None = None


# Known to OpenAI's API or vLLM's but not something this server does: a 400 naming the field when it is set to
# anything but its "off" values.
REFUSED: dict[str, tuple] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "web_search_options": (None,),
    "suffix": (None, ""),
    "reasoning_effort": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "watermarking": (None, False),
    "bad_words": (None, []),
    "logprob_token_ids": (None,),
    "prompt_embeds": (None, []),
    "priority": (None, 0),
    "kv_transfer_params": (None,),
    "ec_transfer_params": (None,),
    "vllm_xargs": (None,),
    "repetition_detection": (None,),
    "thinking_token_budget": (None, -1),
    "routed_experts_prompt_start": (None, 0),
    "media_io_kwargs": (None, {}),
    "mm_processor_kwargs": (None, {}),
    "spaces_between_special_tokens": (None, True),
    "logits_processors": (None, []),
    "stream_interval": (None, 1),  # every token is sent as it comes
}
