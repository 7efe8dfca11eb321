"""nanochat (Karpathy's nanochat d20 / d32): pre-norm decoder layers of multi-head attention with RoPE, but

- every RMSNorm is weightless (x * rsqrt(mean(x^2) + eps) in fp32): the layers' two, the per-head q/k norms and
  the final norm, which also normalises the embeddings before the first layer (one module, used twice);
- RoPE rotates the other way (transformers' nanochat rotate_half is (x2, -x1)): the tables' sine is negated;
- the q/k norms follow RoPE (a rotation within each head keeps its RMS, so applying them first is the same);
- a plain MLP `fc2(relu2(fc1(x)))` (relu2: the squared ReLU), no biases;
- logits soft-capped: tanh(logits / cap) * cap at final_logit_softcapping (15 by default);
- untied embeddings; biases on q/k/v/o only where `attention_bias`.

llama.cpp has no nanochat architecture: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, Linear, Rotary
from .base import CausalLM, DecoderModel
from .gemma2 import softcap


@dataclass(repr=False)
class NanoChatConfig(PretrainedConfig):
    """transformers' NanoChatConfig: its fields and defaults (the d12 sizes, relu2, soft-capping at 15)."""

    model_type: ClassVar[str] = "nanochat"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "sliding_window")
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias")

    vocab_size: int = 50304
    hidden_size: int = 768
    intermediate_size: int = 8192
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    hidden_act: str = "relu2"
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 15.0
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 1

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' nanochat builds a plain causal mask whatever the config says

    def validate(self) -> None:
        super().validate()
        cap = self.final_logit_softcapping
        if cap is not None and (not _is_number(cap) or cap <= 0):
            raise ConfigError(
                f"{self.source}: final_logit_softcapping must be a positive number or null, found {cap!r}"
            )
        if self.layer_types is not None and "sliding_attention" in self.layer_types:
            raise ConfigError(f"{self.source}: layer_types: nanochat has no sliding-window attention")


class WeightlessRMSNorm(nn.Module):
    """transformers' NanoChatRMSNorm (Llama 4's L2 norm): x * rsqrt(mean(x^2) + eps) in fp32, cast back; no weight."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class ReversedRotary(Rotary):
    """RoPE tables for a rotation the other way: cos as is, sine negated (nanochat's rotate_half is (x2, -x1))."""

    def tables(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {k: (cos, -sin) for k, (cos, sin) in super().tables(position_ids, dtype).items()}


class NanoChatMLP(nn.Module):
    """fc2(act(fc1(x))), no biases (transformers' names, CLIP's MLP)."""

    def __init__(self, config: NanoChatConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(x)))


class NanoChatDecoderLayer(nn.Module):
    def __init__(self, config: NanoChatConfig, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
            qk_norm="head",
            norm=lambda dim: WeightlessRMSNorm(eps),
        )
        self.mlp = NanoChatMLP(config)
        self.input_layernorm = WeightlessRMSNorm(eps)
        self.post_attention_layernorm = WeightlessRMSNorm(eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class NanoChatModel(DecoderModel):
    def __init__(self, config: NanoChatConfig):
        super().__init__(config, NanoChatDecoderLayer, WeightlessRMSNorm(config.rms_norm_eps))
        self.rotary = ReversedRotary(config.rope_kinds(), config.head_dim, config.max_position_embeddings)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The final norm's module normalises the embeddings before the first layer too."""
        return self.norm(x)


class NanoChatForCausalLM(CausalLM):
    """transformers' NanoChatForCausalLM."""

    config_class = NanoChatConfig
    # transformers' base_model_tp_plan: q/k/v and fc1 split by output features, o_proj and fc2 by input
    tp_patterns: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.fc1": "colwise",
        "layers.*.mlp.fc2": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["NanoChatDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, NanoChatModel(config))

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap(logits, self.config.final_logit_softcapping)
