"""GPT-2: learned position embeddings, pre-norm layers of LayerNorm (with bias), multi-head attention whose q/k/v
are one fused `c_attn`, and a plain GELU MLP; every projection a transformers `Conv1D` (weight stored (in, out)).

transformers' names: the body is `transformer` (wte, wpe, h, ln_f); autolm's code reaches it as `model` and
its parts as `embed_tokens`, `layers` and `norm`, which here are other names for wte, h and ln_f. Old
checkpoints (openai-community/gpt2) lack the `transformer.` prefix and carry attention-mask buffers; both load,
and saving writes what transformers writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..config_fields import config_json_names
from ..errors import ConfigError, GenerationError
from ..nn import ACTIVATIONS, Attention, CheckpointRules, Conv1D, GGUFLayout, Ignored, Rename, embedding
from .base import CausalLM, DecoderModel

# config fields GPT-2's config.json does not have (autolm derives them, or GPT-2 has no such feature)
_NOT_GPT2 = ("intermediate_size", "num_key_value_heads", "head_dim", "sliding_window", "rope_parameters",
             "rope_theta", "rope_scaling")  # fmt: skip


@dataclass(repr=False)
class GPT2Config(PretrainedConfig):
    """transformers' GPT2Config: config.json keeps GPT-2's names (n_embd, n_layer, ...), which are also
    attributes here, as in transformers. `reorder_and_upcast_attn` is accepted: it only changes the precision of
    transformers' eager attention (its default SDPA ignores it; in fp32 it changes nothing)."""

    model_type: ClassVar[str] = "gpt2"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "rms_norm_eps": "layer_norm_epsilon",
        "hidden_act": "activation_function",
        "attention_dropout": "attn_pdrop",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    )

    vocab_size: int = 50257
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 1024
    hidden_act: str = "gelu_new"
    rms_norm_eps: float = 1e-5
    attention_dropout: float = 0.1
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    n_inner: int | None = None
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False

    def __post_init__(self) -> None:
        if self.n_inner is not None and not (_is_int(self.n_inner) and self.n_inner > 0):
            raise ConfigError(
                f"{self.source}: n_inner must be a positive integer or null, found {self.n_inner!r}"
            )
        h = self.hidden_size
        self.intermediate_size = self.n_inner if self.n_inner is not None else 4 * h if _is_int(h) else h
        self.num_key_value_heads = self.head_dim = None  # GPT-2 has neither: derived from n_head and n_embd
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = "|".join(self.attribute_map)
            raise ConfigError(re.sub(rf"\b({names})\b", lambda m: self.attribute_map[m[1]], str(e))) from None

    def validate(self) -> None:
        super().validate()
        if self.add_cross_attention:
            raise ConfigError(
                f"{self.source}: add_cross_attention is not supported (autolm runs decoders only)"
            )

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned position embeddings, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_GPT2:
            out.pop(key, None)
        return out


config_json_names(GPT2Config)  # config.n_embd is config.hidden_size, as in transformers


class GPTSw3Config(GPT2Config):
    """model_type "gpt-sw3" (AI Sweden's GPT-SW3): transformers reads it as GPT2Config (and writes it back as
    "gpt2"); autolm keeps "gpt-sw3". The model is GPT2LMHeadModel; its tokenizer, GPTSw3Tokenizer, is a
    sentencepiece model (spiece.model) that autolm does not read: it needs a tokenizer.json."""

    model_type: ClassVar[str] = "gpt-sw3"


class GPT2Attention(Attention):
    """Attention with q/k/v as one Conv1D `c_attn` (q, k, v in that order along its outputs) and `c_proj`."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        h, n = config.hidden_size, config.num_attention_heads
        super().__init__(h, n, n, config.head_dim, layer_idx, bias=True, scale=scale, rope=None)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        self.c_attn = Conv1D(3 * hidden, hidden)
        self.c_proj = Conv1D(hidden, hidden)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.c_attn(x).split(self.num_heads * self.head_dim, -1)  # (B, T, 3 * h) -> 3 x (B, T, h)
        return q, k, v

    @property
    def o_proj(self) -> Conv1D:
        """Attention.forward's output projection: GPT-2 calls it c_proj."""
        return self.c_proj


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.c_fc = Conv1D(inner, hidden)
        self.c_proj = Conv1D(hidden, inner)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(h, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(h, eps=eps)
        self.mlp = GPT2MLP(h, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(DecoderModel):
    """wte, wpe, h, ln_f; `embed_tokens`, `layers` and `norm` name wte, h and ln_f (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "wte", "layers": "h", "norm": "ln_f"}

    def __init__(self, config: GPT2Config):
        super().__init__(config, GPT2Block, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon))
        self.wpe = embedding(config.max_position_embeddings, config.hidden_size)
        self._modules = {"wte": self.wte, "wpe": self.wpe, **self._modules}  # transformers' order (forward's)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input vectors plus the learned embeddings of their positions (B, T): the padding mask's positions."""
        n = self.wpe.num_embeddings
        if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
            raise GenerationError(
                f"position {int(position_ids.max())} is past GPT-2's {n} learned positions (n_positions): "
                "shorten the prompt or max_new_tokens"
            )
        return x + self.wpe(position_ids)


class TokenTypeEmbeddings:
    """transformers' forward of the classic decoders whose token_type_ids are looked up in the token embeddings
    and added to the input vectors (GPT-2, GPT-1, CTRL: scaled after, as the tokens are)."""

    def forward(self, input_ids=None, *args, token_type_ids=None, inputs_embeds=None, **kwargs):
        if token_type_ids is not None:
            if inputs_embeds is None:
                inputs_embeds, input_ids = self.model.embed(input_ids), None
            inputs_embeds = inputs_embeds + self.model.embed_tokens(token_type_ids)
        return super().forward(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)


class GPT2LMHeadModel(TokenTypeEmbeddings, CausalLM):
    """transformers' GPT2LMHeadModel (the LM head tied to wte unless the config unties it)."""

    config_class = GPT2Config
    base_model_prefix = "transformer"
    layers_prefix = "transformer.h"
    embeddings_name = "transformer.wte"
    tp_patterns: ClassVar[dict[str, str]] = {}  # none, as in transformers: c_attn packs q/k/v of all heads
    _no_split_modules: ClassVar[list[str]] = ["GPT2Block"]
    checkpoint_rules = CheckpointRules(
        [
            # old files name the body's tensors without "transformer."; saved with it, as transformers saves
            Rename(r"^(?=(wte|wpe|h|ln_f)\.)", "transformer.", r"(?!)", ""),
            Ignored(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"),  # causal-mask buffers of old files
        ]
    )
    gguf = GGUFLayout(
        "gpt2",
        config=(("attention.layer_norm_epsilon", "layer_norm_epsilon"),),
        layer=(
            ("attn_norm", "ln_1"),
            ("attn_qkv", "attn.c_attn"),
            ("attn_output", "attn.c_proj"),
            ("ffn_norm", "ln_2"),
            ("ffn_up", "mlp.c_fc"),
            ("ffn_down", "mlp.c_proj"),
        ),
        top=(
            ("token_embd", "transformer.wte"),
            ("position_embd", "transformer.wpe"),
            ("output_norm", "transformer.ln_f"),
        ),
        transposed=("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
    )

    def __init__(self, config: GPT2Config):
        super().__init__(config, GPT2Model(config))

    @property
    def model(self) -> GPT2Model:
        """The body (`transformer`), by the name autolm's code uses in every family."""
        return self.transformer
