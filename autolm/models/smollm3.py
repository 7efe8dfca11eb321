"""SmolLM3: Llama in which some layers have no rotary embedding (NoPE): `no_rope_layers[i]` is 1 where layer i
uses RoPE (by default every layer but each `no_rope_layer_interval`-th), and a sliding window on the layers
`layer_types` marks (by default the NoPE layers, when `use_sliding_window`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, GGUFLayout, RMSNorm
from .base import CausalLM, DecoderModel
from .llama import LlamaConfig

DEFAULT_THETA = 2000000.0


@dataclass(repr=False)
class SmolLM3Config(LlamaConfig):
    """transformers' SmolLM3Config: its defaults, no_rope_layers derived from no_rope_layer_interval and
    layer_types from both, as transformers derives them."""

    model_type: ClassVar[str] = "smollm3"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
    )  # not in transformers' config: written when set

    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 32768
    pad_token_id: int | None = 128004
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    tie_word_embeddings: bool = True
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": DEFAULT_THETA}
    )

    def __post_init__(self) -> None:
        n, every = self.num_hidden_layers, self.no_rope_layer_interval
        if not _is_int(every) or every <= 0:
            raise ConfigError(
                f"{self.source}: no_rope_layer_interval must be a positive integer, found {every!r}"
            )
        if _is_int(n) and n > 0:  # else the base validation names num_hidden_layers
            if self.no_rope_layers is None:
                self.no_rope_layers = [int((i + 1) % every != 0) for i in range(n)]
            self.check_no_rope_layers()  # before layer_types are derived from it
        if self.layer_types is None and isinstance(self.no_rope_layers, list):
            sliding = self.use_sliding_window and self.sliding_window is not None
            self.layer_types = [
                "sliding_attention" if sliding and not rope else "full_attention"
                for rope in self.no_rope_layers
            ]
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": DEFAULT_THETA, **d}, source)  # SmolLM3's default base

    def validate(self) -> None:
        super().validate()
        self.check_no_rope_layers()

    def check_no_rope_layers(self) -> None:
        """ConfigError unless no_rope_layers holds a 0 or 1 per layer."""
        r = self.no_rope_layers
        if not (isinstance(r, list) and len(r) == self.num_hidden_layers and all(v in (0, 1) for v in r)):
            raise ConfigError(
                f"{self.source}: no_rope_layers must list {self.num_hidden_layers} entries of 0 or 1 "
                f"(1: the layer uses RoPE), found {str(r)[:200]}"
            )

    def layer_rope(self, i: int) -> str | None:
        """The RoPE table layer i reads, None for a NoPE layer."""
        return "default" if self.no_rope_layers[i] else None


class SmolLM3DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
            window=config.layer_window(layer_idx),
            rope=config.layer_rope(layer_idx),
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class SmolLM3Model(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, SmolLM3DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


class SmolLM3ForCausalLM(CausalLM):
    config_class = SmolLM3Config
    # llama.cpp converts SmolLM3 as Llama (q/k rows permuted); its runtime fixes the NoPE interval at 4, which
    # is also this config's default, so the file carries no NoPE metadata
    gguf = GGUFLayout("smollm3", permute_qk=True)
    _no_split_modules: ClassVar[list[str]] = ["SmolLM3DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, SmolLM3Model(config))
