"""VaultGemma (Google's VaultGemma 1B, trained with differential privacy): Gemma 2's layer without the norms after
attention and after the MLP, so two (1 + w) RMSNorms per layer, before each block (`input_layernorm`,
`pre_feedforward_layernorm`). The rest is Gemma 2's (models.gemma2): the embeddings times sqrt(hidden_size) in their
dtype, GeLU-tanh from `hidden_activation`, attention scores scaled by query_pre_attn_scalar ** -0.5 and soft-capped
at attn_logit_softcapping, sliding and full layers by `layer_types` (every other layer full by default), logits
soft-capped at final_logit_softcapping, a tied head.

transformers' VaultGemmaConfig is Gemma2Config without use_bidirectional_attention (its attention is always
causal): a config.json that gives the key has it kept as read, not acted on. llama.cpp has no VaultGemma
architecture: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .gemma2 import Gemma2Config, Gemma2DecoderLayer, Gemma2ForCausalLM, Gemma2Model, takes_hidden_activation


@takes_hidden_activation
@dataclass(repr=False)
class VaultGemmaConfig(Gemma2Config):
    """transformers' VaultGemmaConfig: Gemma 2's fields and defaults, less use_bidirectional_attention."""

    model_type: ClassVar[str] = "vaultgemma"
    absent_keys: ClassVar[tuple[str, ...]] = ("use_bidirectional_attention",)  # not in transformers' config

    def __post_init__(self) -> None:
        if self.use_bidirectional_attention is not None:  # transformers' VaultGemma ignores it: kept as read
            self.extra["use_bidirectional_attention"] = self.use_bidirectional_attention
            self.use_bidirectional_attention = None
        super().__post_init__()


class VaultGemmaDecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's layer less post_attention_layernorm and post_feedforward_layernorm."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.post_attention_layernorm, self.post_feedforward_layernorm

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.pre_feedforward_layernorm(x))


class VaultGemmaForCausalLM(Gemma2ForCausalLM):
    """transformers' VaultGemmaForCausalLM."""

    config_class = VaultGemmaConfig
    gguf = None  # llama.cpp has no VaultGemma
    _no_split_modules: ClassVar[list[str]] = ["VaultGemmaDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Gemma2Model(config, VaultGemmaDecoderLayer))
