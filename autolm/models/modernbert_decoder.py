"""ModernBERT's decoder (model_type modernbert-decoder: the Ettin decoders): ModernBERT's layers run causally.

- token embeddings, then a LayerNorm over them (and over `inputs_embeds` a user passes), as ModernBERT's
  embeddings module does; every LayerNorm has a bias only with `norm_bias`;
- pre-norm layers, the first without an attention norm (transformers' nn.Identity); multi-head attention with
  q/k/v projections and the output projection `Wo`; a gated MLP whose one input projection `Wi` holds the input
  half, then the gate half: Wo(act(input) * gate);
- global (full) and local (sliding window of local_attention // 2 tokens) layers: `layer_types`, or every
  global_attn_every_n_layers-th layer global from the first (3 by default); each kind has its own RoPE base
  (rope_parameters by layer type; older files' global_rope_theta, 160000, and local_rope_theta, 10000);
- a final LayerNorm, then the prediction head (`lm_head`: dense, classifier_activation, LayerNorm) and the
  vocabulary projection `decoder`, with a bias (decoder_bias), tied to the embeddings by default.

transformers' names: the body's `embeddings.tok_embeddings`, `embeddings.norm` and `final_norm`, the head's
`lm_head` and `decoder`. autolm's code reaches them as `embed_tokens`, `embed_norm`, `norm`, `head` and `lm_head`
(the vocabulary projection, as in every family, so tying, placement and quantization treat it as theirs);
state_dict(), load_state_dict(), checkpoints and adapters use transformers' names (checkpoint_rules). llama.cpp
has no ModernBERT decoder architecture (its modern-bert is the encoder): no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..config_fields import read_rope
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, CheckpointRules, Linear, Rename, resize_bias, transformers_state_dict
from .base import CausalLM, DecoderModel

# layer type -> (the older config.json key of its RoPE base, transformers' default base)
_THETA = {
    "full_attention": ("global_rope_theta", 160_000.0),
    "sliding_attention": ("local_rope_theta", 10_000.0),
}


@dataclass(repr=False)
class ModernBertDecoderConfig(PretrainedConfig):
    """transformers' ModernBertDecoderConfig (its field names and defaults); `norm_eps` and `hidden_activation` are
    config.json's names for rms_norm_eps and hidden_act. sliding_window is derived: local_attention // 2."""

    model_type: ClassVar[str] = "modernbert-decoder"
    attribute_map: ClassVar[dict[str, str]] = {"rms_norm_eps": "norm_eps", "hidden_act": "hidden_activation"}
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "norm_bias", "attention_bias",
                                              "mlp_bias", "decoder_bias", "classifier_bias")  # fmt: skip
    absent_keys: ClassVar[tuple[str, ...]] = ("num_key_value_heads", "head_dim")

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_act: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    rms_norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int | None = 50283
    eos_token_id: int | list[int] | None = 50282
    bos_token_id: int | None = 50281
    cls_token_id: int | None = 50281
    sep_token_id: int | None = 50282
    attention_bias: bool = False
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    decoder_bias: bool = True
    classifier_dropout: float = 0.0
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    local_attention: int | None = 128
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {
            kind: {"rope_theta": theta, "rope_type": "default"} for kind, (_, theta) in _THETA.items()
        }
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """rope_parameters by layer type, or the older global_rope_theta / local_rope_theta (and rope_scaling, for
        both kinds), as transformers reads them; written back as rope_parameters, as transformers writes them."""
        given = d.get("rope_parameters")
        if given is None:
            scaling = d.get("rope_scaling")
            given = dict.fromkeys(_THETA, scaling)
        if not isinstance(given, dict):
            raise ConfigError(
                f"{source}: rope_parameters must be an object by layer type, found {str(given)[:100]}"
            )
        kinds = {}
        for kind, (key, default) in _THETA.items():
            params = given.get(kind) or {}
            if not isinstance(params, dict):
                raise ConfigError(
                    f"{source}: rope_parameters[{kind!r}] must be an object, found {str(params)[:100]}"
                )
            inner = {"rope_parameters": {"rope_theta": d.get(key, default), **params}}
            if "max_position_embeddings" in d:
                inner["max_position_embeddings"] = d["max_position_embeddings"]
            kinds[kind], _ = read_rope(inner, cls, source)
        return kinds, "v5"

    def __post_init__(self) -> None:
        for key, _ in _THETA.values():  # read into rope_parameters (read_rope)
            self.extra.pop(key, None)
        n = self.extra.get("global_attn_every_n_layers", 3)  # kept in config.json, as transformers keeps it
        if self.layer_types is None and _is_int(self.num_hidden_layers) and self.num_hidden_layers > 0:
            if not _is_int(n) or n <= 0:
                raise ConfigError(
                    f"{self.source}: global_attn_every_n_layers must be a positive integer, found {n!r}"
                )
            self.layer_types = [
                "sliding_attention" if i % n else "full_attention" for i in range(self.num_hidden_layers)
            ]
        local = self.local_attention
        if local is not None and not (_is_int(local) and local >= 2):
            raise ConfigError(
                f"{self.source}: local_attention must be an integer of at least 2, found {local!r}"
            )
        self.sliding_window = None if local is None else local // 2
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.classifier_activation not in self.activations:
            raise ConfigError(f"{self.source}: classifier_activation {self.classifier_activation!r} is not "
                              f"supported (expected one of {self.activations})")  # fmt: skip
        if self.local_attention is None and "sliding_attention" in self.layer_types:
            raise ConfigError(
                f"{self.source}: local_attention is null but layer_types has sliding_attention layers"
            )

    def _implied(self, f) -> Any:
        if f.name == "num_key_value_heads":
            return self.num_attention_heads
        return super()._implied(f)

    @property
    def norm_eps(self) -> float:
        return self.rms_norm_eps

    @property
    def hidden_activation(self) -> str:
        return self.hidden_act

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["full_attention"]["rope_theta"])

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {kind: self.rope_parameters[kind] for kind in _THETA if kind in self.layer_types}


_dataclass_init = ModernBertDecoderConfig.__init__


def _init(self, *, norm_eps=None, hidden_activation=None, global_rope_theta=None, local_rope_theta=None,
          global_attn_every_n_layers=None, **kwargs: Any) -> None:  # fmt: skip
    """ModernBertDecoderConfig(norm_eps=..., hidden_activation=..., global_rope_theta=..., ...) as in transformers."""
    if norm_eps is not None:
        kwargs["rms_norm_eps"] = norm_eps
    if hidden_activation is not None:
        kwargs["hidden_act"] = hidden_activation
    if global_attn_every_n_layers is not None:
        kwargs["extra"] = {
            **kwargs.get("extra", {}),
            "global_attn_every_n_layers": global_attn_every_n_layers,
        }
    if global_rope_theta is not None or local_rope_theta is not None:
        d = {"global_rope_theta": global_rope_theta, "local_rope_theta": local_rope_theta}
        d = {k: v for k, v in d.items() if v is not None}
        kwargs["rope_parameters"], _ = ModernBertDecoderConfig.read_rope(d, "ModernBertDecoderConfig")
    _dataclass_init(self, **kwargs)


ModernBertDecoderConfig.__init__ = _init


def _layer_norm(config: ModernBertDecoderConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class ModernBertDecoderAttention(Attention):
    """Multi-head attention (q_proj, k_proj, v_proj, the output projection Wo), global or sliding, RoPE by layer
    type."""

    def __init__(self, config: ModernBertDecoderConfig, layer_idx: int):
        n = config.num_attention_heads
        super().__init__(config.hidden_size, n, n, config.head_dim, layer_idx, bias=config.attention_bias,
                         window=config.layer_window(layer_idx), rope=config.layer_types[layer_idx])  # fmt: skip

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        super().make_projections(hidden, bias, o_bias)
        self.Wo = self._modules.pop("o_proj")

    @property
    def o_proj(self) -> Linear:
        """Attention.forward's output projection: ModernBERT calls it Wo."""
        return self.Wo


class ModernBertDecoderMLP(nn.Module):
    """Wo(act(input) * gate), input and gate the two halves of Wi's output."""

    def __init__(self, config: ModernBertDecoderConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.Wi = Linear(h, 2 * i, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self.Wo = Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(inp) * gate)


class ModernBertDecoderLayer(nn.Module):
    def __init__(self, config: ModernBertDecoderConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = _layer_norm(config) if layer_idx != 0 else nn.Identity()
        self.attn = ModernBertDecoderAttention(config, layer_idx)
        self.mlp_norm = _layer_norm(config)
        self.mlp = ModernBertDecoderMLP(config)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class ModernBertDecoderModel(DecoderModel):
    """embed_tokens, embed_norm (the LayerNorm over the input vectors), layers, norm: transformers'
    embeddings.tok_embeddings, embeddings.norm, layers, final_norm."""

    def __init__(self, config: ModernBertDecoderConfig):
        super().__init__(config, ModernBertDecoderLayer, _layer_norm(config))
        self.embed_norm = _layer_norm(config)
        order = ("embed_tokens", "embed_norm", "layers", "norm")
        self._modules = {k: self._modules[k] for k in order}  # forward's order

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(x)


class ModernBertDecoderPredictionHead(nn.Module):
    """norm(act(dense(x))): transformers' `lm_head`, before the vocabulary projection."""

    def __init__(self, config: ModernBertDecoderConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = ACTIVATIONS[config.classifier_activation]
        self.norm = _layer_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


# transformers' names <-> autolm's (loading: the first pattern to the second; saving: the third to the fourth)
_RULES = CheckpointRules(
    [
        Rename(
            r"^model\.embeddings\.tok_embeddings\.",
            "model.embed_tokens.",
            r"^model\.embed_tokens\.",
            "model.embeddings.tok_embeddings.",
        ),
        Rename(
            r"^model\.embeddings\.norm\.",
            "model.embed_norm.",
            r"^model\.embed_norm\.",
            "model.embeddings.norm.",
        ),
        Rename(r"^model\.final_norm\.", "model.norm.", r"^model\.norm\.", "model.final_norm."),
        Rename(r"^lm_head\.(?=(dense|norm)\.)", "head.", r"^head\.", "lm_head."),
        Rename(r"^decoder\.", "lm_head.", r"^lm_head\.(?!(dense|norm)\.)", "decoder."),
    ]
)


class ModernBertDecoderForCausalLM(CausalLM):
    """transformers' ModernBertDecoderForCausalLM: the prediction head, then the vocabulary projection (with a
    bias where decoder_bias), tied to the embeddings unless the config unties them."""

    config_class = ModernBertDecoderConfig
    checkpoint_rules = _RULES
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan
    _no_split_modules: ClassVar[list[str]] = ["ModernBertDecoderLayer"]

    def __init__(self, config: ModernBertDecoderConfig):
        super().__init__(config, ModernBertDecoderModel(config))
        self.head = ModernBertDecoderPredictionHead(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self._modules = {k: self._modules[k] for k in ("model", "head", "lm_head")}  # forward's order
        transformers_state_dict(self)  # state_dict() in transformers' names

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.finish_logits(self.lm_head(self.head(h)))

    def blocks(self) -> list[str]:
        return [*super().blocks()[:-1], "head", "lm_head"]

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """As CausalLM's, the decoder's bias (where it has one) cut or grown with zeros, as transformers does."""
        bias = self.lm_head.bias
        emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        resize_bias(self.lm_head, bias, self.config.vocab_size, False)
        self.lm_head.out_features = self.config.vocab_size
        return emb

    def adapter_key(self, key: str) -> str:
        """An adapter tensor's name in peft's file: transformers' module names."""
        return _RULES._back(key)
