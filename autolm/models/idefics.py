"""IDEFICS 1's language model (model_type idefics: HuggingFaceM4/idefics-9b and -80b, transformers'
IdeficsForVisionText2Text), on text.

The body is LLaMA 1's decoder (multi-head attention with RoPE, no biases, a SiLU-gated MLP, RMSNorm) with, before each
decoder layer whose index is a multiple of `cross_layer_interval`, a gated cross-attention block
(model.gated_cross_attn_layers[i // cross_layer_interval], transformers' IdeficsGatedCrossAttentionLayer):
`x + tanh(alpha_cross_attn) * cross_attn(...)`, then `x + tanh(alpha_dense) * mlp(post_attention_layernorm(x))`.

Text only: transformers' IdeficsModel refuses input without an image (exactly one of pixel_values,
image_encoder_embeddings, perceiver_embeddings); text alone is its forward with an image attention mask of zeros
(no token attends to an image). Then `cross_attention_gate` is zero for every token, the cross-attention's output is
filled with zeros and its residual adds nothing, but the block's MLP still runs: on text each gated block is
`x + tanh(alpha_dense) * mlp(post_attention_layernorm(x))`, which autolm computes (the cross-attention's q/k/v/o
projections, its q/k layer norms (`qk_layer_norms`), input_layernorm and alpha_cross_attn load and save under
transformers' names and compute nothing).

The decoupled vocabulary: with `additional_vocab_size` > 0 the embeddings are `embed_tokens.weight` (vocab_size rows)
and `embed_tokens.additional_embedding.weight` (the ids from vocab_size up), the head `lm_head.weight` and
`lm_head.additional_fc.weight`, whose logits are concatenated (vocab_size + additional_vocab_size of them). A tied
model ties both pairs, as transformers does.

Loading skips the vision tower (model.vision_model.*) and the perceiver resampler (model.perceiver_resampler.*);
config.json keeps vision_config and perceiver_config (the cross-attention's keys and values take vision_config's
embed_dim wide inputs). Saved, the checkpoint holds every tensor of the language model (the gated blocks included)
and no vision tower: transformers' IdeficsForVisionText2Text loads it (initializing the tower it lacks, which text
never reaches) with the same text logits.

The compiled one-token step is not available: its graphs are built per decoder layer (model.layers.N) from that
layer's own tensors, and the gated blocks sit beside them under transformers' names (model.gated_cross_attn_layers);
the eager one-token step (the body's run) serves generation. The gated blocks stay in floating point under int8 /
int4 (which quantize model.layers' linears). llama.cpp has no IDEFICS 1 architecture (only Idefics 3's vision
projector for mtmd): no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError, GenerationError
from ..nn import GatedMLP, Linear, RMSNorm, embedding
from ..nn.checkpoint import CheckpointRules, Ignored
from .base import CausalLM, DecoderModel
from .image_text import IMAGE_TEXT_RULES
from .llama import LlamaDecoderLayer

# the inputs of transformers' IdeficsForVisionText2Text that carry an image: autolm runs the language model alone
IMAGE_INPUTS = ("pixel_values", "image_encoder_embeddings", "perceiver_embeddings", "image_hidden_states")
_ALPHA_INITS = ("zeros", "ones", "normal", "gaussian", "random")


@dataclass(repr=False)
class IdeficsConfig(PretrainedConfig):
    """transformers' IdeficsConfig (IDEFICS 9B's): the language model's fields; vision_config, perceiver_config and
    the freeze_* switches are kept as config.json gives them."""

    model_type: ClassVar[str] = "idefics"
    # not in transformers' config: written when set (multi-head attention, head_dim hidden_size / heads)
    absent_keys: ClassVar[tuple[str, ...]] = (
        "num_key_value_heads",
        "head_dim",
        "attention_dropout",
        "sliding_window",
    )
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "qk_layer_norms",
        "use_resampler",
    )

    additional_vocab_size: int = 0
    dropout: float = 0.0
    alpha_initializer: str = "zeros"
    alphas_initializer_range: float = 0.0
    alpha_type: str = "float"
    pad_token_id: int | None = 0
    cross_layer_interval: int = 1
    qk_layer_norms: bool = False
    use_resampler: bool = False

    # what Llama's decoder layer asks of its config: IDEFICS's self-attention has no biases or q/k norms
    qkv_bias = o_bias = qk_norm = mlp_bias = property(lambda self: False)

    def layer_window(self, i: int) -> int | None:
        return None

    def _implied(self, f) -> Any:
        return self.num_attention_heads if f.name == "num_key_value_heads" else super()._implied(f)

    @property
    def vision_embed_dim(self) -> int:
        """The width of the image states the cross-attention's keys and values project (vision_config's embed_dim,
        768 by default)."""
        vision = self.extra.get("vision_config") or {}
        return vision.get("embed_dim", vision.get("hidden_size", 768))

    def is_cross(self, i: int) -> bool:
        """Whether a gated cross-attention block runs before decoder layer i."""
        return i % self.cross_layer_interval == 0

    def validate(self) -> None:
        super().validate()
        src, k, n = self.source, self.cross_layer_interval, self.num_hidden_layers
        if not _is_int(k) or k <= 0 or n % k:
            raise ConfigError(f"{src}: cross_layer_interval must be a positive integer dividing num_hidden_layers "
                              f"({n}; transformers builds num_hidden_layers // interval blocks), found {k!r}")  # fmt: skip
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(f"{src}: num_key_value_heads must be num_attention_heads ({self.num_attention_heads}): "
                              f"IDEFICS's attention is multi-head, found {self.num_key_value_heads!r}")  # fmt: skip
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            raise ConfigError(f"{src}: head_dim must be hidden_size / num_attention_heads "
                              f"({self.hidden_size // self.num_attention_heads}) in IDEFICS, found {self.head_dim!r}")  # fmt: skip
        if not _is_int(self.additional_vocab_size) or self.additional_vocab_size < 0:
            raise ConfigError(f"{src}: additional_vocab_size must be a non-negative integer, "
                              f"found {self.additional_vocab_size!r}")  # fmt: skip
        if self.alpha_type not in ("float", "vector"):
            raise ConfigError(f"{src}: alpha_type must be 'float' or 'vector', found {self.alpha_type!r}")
        if self.alpha_initializer not in _ALPHA_INITS:
            raise ConfigError(
                f"{src}: alpha_initializer must be one of {_ALPHA_INITS}, found {self.alpha_initializer!r}"
            )
        if not _is_number(self.dropout) or not 0 <= self.dropout <= 1:
            raise ConfigError(f"{src}: dropout must be a number in [0, 1], found {self.dropout!r}")
        vision = self.extra.get("vision_config")
        if vision is not None and not (
            isinstance(vision, dict) and _is_int(self.vision_embed_dim) and self.vision_embed_dim > 0
        ):
            raise ConfigError(
                f"{src}: vision_config must be an object with a positive embed_dim, found {vision!r}"
            )


class IdeficsDecoupledEmbedding(nn.Embedding):
    """transformers' IdeficsDecoupledEmbedding: `weight` for ids below vocab_size, `additional_embedding` for the
    additional_vocab_size ids after them."""

    def __init__(self, num: int, additional: int, dim: int):
        super().__init__(num, dim, _weight=embedding(num, dim).weight.detach())
        self.additional_embedding = embedding(additional, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        extra = input_ids >= self.num_embeddings
        base = F.embedding(input_ids.masked_fill(extra, 0), self.weight)
        more = F.embedding((input_ids - self.num_embeddings).clamp(min=0), self.additional_embedding.weight)
        return torch.where(extra[..., None], more, base)


class IdeficsDecoupledLinear(nn.Module):
    """transformers' IdeficsDecoupledLinear (the head with additional_vocab_size > 0): logits of `weight`, then of
    `additional_fc`, concatenated. Not a Linear: an int8 / int4 head would drop additional_fc."""

    def __init__(self, hidden: int, vocab: int, additional: int):
        super().__init__()
        self.in_features, self.out_features = hidden, vocab
        self.weight = nn.Parameter(torch.empty(vocab, hidden))
        nn.init.normal_(self.weight, std=0.02)
        self.additional_fc = Linear(hidden, additional, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((F.linear(x, self.weight), self.additional_fc(x)), -1)


class IdeficsCrossAttention(nn.Module):
    """The gated block's cross-attention weights under transformers' names: q/o over hidden_size, k/v from the
    image states (vision_config's embed_dim), the per-head RMS norms where qk_layer_norms. On text its output is
    zeroed (no token attends to an image), so autolm computes nothing with them."""

    def __init__(self, config: IdeficsConfig):
        super().__init__()
        h, v = config.hidden_size, config.vision_embed_dim
        self.q_proj = Linear(h, h, bias=False)
        self.k_proj = Linear(v, h, bias=False)
        self.v_proj = Linear(v, h, bias=False)
        self.o_proj = Linear(h, h, bias=False)
        if config.qk_layer_norms:
            self.q_layer_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_layer_norm = RMSNorm(config.head_dim, config.rms_norm_eps)


class IdeficsGatedCrossAttentionLayer(nn.Module):
    """transformers' IdeficsGatedCrossAttentionLayer on text: the cross-attention adds nothing (its output zeroed by
    the gate), the MLP adds tanh(alpha_dense) * mlp(post_attention_layernorm(x))."""

    def __init__(self, config: IdeficsConfig, index: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.cross_attn = IdeficsCrossAttention(config)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        shape = (1, 1, h) if config.alpha_type == "vector" else (1,)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape))
        self.alpha_dense = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(x))


class IdeficsDecoderLayer(LlamaDecoderLayer):
    """transformers' IdeficsDecoderLayer: Llama's decoder layer (multi-head attention)."""


class IdeficsModel(DecoderModel):
    def __init__(self, config: IdeficsConfig):
        super().__init__(config, IdeficsDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        if config.additional_vocab_size:
            self.embed_tokens = IdeficsDecoupledEmbedding(config.vocab_size, config.additional_vocab_size,
                                                          config.hidden_size)  # fmt: skip
        blocks = config.num_hidden_layers // config.cross_layer_interval
        self.gated_cross_attn_layers = nn.ModuleList(
            IdeficsGatedCrossAttentionLayer(config, j) for j in range(blocks)
        )

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        """DecoderModel.run with the gated block (its text path) before each decoder layer at a multiple of
        cross_layer_interval; hidden_states as transformers records them: the first decoder layer's input (after
        its block), each decoder layer's output (before the next block) but the last's, then the final norm's."""
        k, last = self.config.cross_layer_interval, len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i % k == 0:
                x = self._checkpointed(self.gated_cross_attn_layers[i // k], x)
            if hidden_states is not None and i == 0:
                hidden_states.append(x)
            x = self._checkpointed(layer, x, ctx)
            if hidden_states is not None and i < last:
                hidden_states.append(x)
        x = self.final_norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    def _checkpointed(self, module: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)


class IdeficsForCausalLM(CausalLM):
    """transformers' IdeficsForVisionText2Text on text (see the module docstring)."""

    config_class = IdeficsConfig
    checkpoint_rules: ClassVar[CheckpointRules] = CheckpointRules(
        (*IMAGE_TEXT_RULES, Ignored(r"model\.perceiver_resampler\..+"))
    )
    compiled_graphs: ClassVar[bool] = False  # the gated blocks sit outside model.layers: the eager step
    _no_split_modules: ClassVar[list[str]] = ["IdeficsDecoderLayer", "IdeficsGatedCrossAttentionLayer"]

    def __init__(self, config: IdeficsConfig):
        super().__init__(config, IdeficsModel(config))
        if config.additional_vocab_size:
            self.lm_head = IdeficsDecoupledLinear(
                config.hidden_size, config.vocab_size, config.additional_vocab_size
            )

    def blocks(self) -> list[str]:
        """Placement units in forward order: the embeddings, each gated block before its decoder layer, the final
        norm, the head."""
        k, out = self.config.cross_layer_interval, ["model.embed_tokens"]
        for i in range(len(self.model.layers)):
            out += [f"model.gated_cross_attn_layers.{i // k}"] if i % k == 0 else []
            out.append(f"model.layers.{i}")
        return [*out, "model.norm", "lm_head"]

    def tie_weights(self) -> None:
        super().tie_weights()
        head, emb = self.lm_head, self.model.embed_tokens
        if self.config.tie_word_embeddings and isinstance(head, IdeficsDecoupledLinear):
            head.weight = emb.weight
            head.additional_fc.weight = emb.additional_embedding.weight

    @property
    def new_if_missing(self) -> tuple[str, ...]:
        """A tied decoupled head: the checkpoint holds its embeddings' tensors alone (tied after loading)."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, IdeficsDecoupledLinear):
            return ("lm_head.weight", "lm_head.additional_fc.weight")
        return ()

    def init_new(self, names: list[str]) -> str:
        self.tie_weights()
        return "the decoupled head tied to the embeddings"

    def resize_token_embeddings(self, *args, **kwargs):
        if self.config.additional_vocab_size:
            raise ConfigError("additional_vocab_size: autolm does not resize IDEFICS's decoupled embeddings")
        return super().resize_token_embeddings(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """CausalLM's forward; image inputs (pixel_values, image_encoder_embeddings, ...) are refused by name, and
        an image_attention_mask letting a token attend to an image."""
        given = [k for k in IMAGE_INPUTS if kwargs.get(k) is not None]
        mask = kwargs.pop("image_attention_mask", None)
        if mask is not None and bool(torch.as_tensor(mask).any()):
            given.append("image_attention_mask")
        if given:
            raise GenerationError(f"IdeficsForCausalLM: {', '.join(given)}: autolm runs IDEFICS's language model "
                                  "alone (on text, as transformers' model with no token attending to an image)")  # fmt: skip
        return super().forward(*args, **kwargs)
