"""IQuest-Coder-V1 (IQuestLab/IQuest-Coder-V1-40B-Instruct, model_type iquestcoder): transformers runs it as Llama
(its LlamaForCausalLM over an IQuestCoderConfig), so this family is Llama's with that config: LlamaConfig's fields
with the 40B model's sizes as the defaults (head_dim 128 whatever hidden_size / num_attention_heads says, RMSNorm
epsilon 1e-5), no `pretraining_tp`, and the original remote code's `clip_qkv` and `use_sliding_window`, which no
released checkpoint enables, refused as transformers refuses them. GGUF: llama.cpp's converter writes
IQuestCoderForCausalLM as "llama" (its LlamaModel), which reads back as Llama, the same computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .llama import LlamaConfig, LlamaForCausalLM


@dataclass(repr=False)
class IQuestCoderConfig(LlamaConfig):
    """transformers' IQuestCoderConfig: LlamaConfig's fields with IQuest-Coder-V1-40B's sizes as the defaults."""

    model_type: ClassVar[str] = "iquestcoder"

    vocab_size: int = 76800
    hidden_size: int = 5120
    intermediate_size: int = 27648
    num_hidden_layers: int = 80
    num_attention_heads: int = 40
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5

    def validate(self) -> None:
        super().validate()
        # the original code's options, which transformers' config refuses (no released checkpoint enables them)
        if self.extra.get("clip_qkv") is not None:
            raise ConfigError(f"{self.source}: clip_qkv is not supported by IQuestCoder (transformers refuses it), "
                              f"found {self.extra['clip_qkv']!r}")  # fmt: skip
        if self.use_sliding_window:
            raise ConfigError(
                f"{self.source}: use_sliding_window is not supported by IQuestCoder (transformers refuses it)"
            )


class IQuestCoderForCausalLM(LlamaForCausalLM):
    """What transformers builds for an IQuestCoder checkpoint: Llama's model over IQuestCoderConfig."""

    config_class = IQuestCoderConfig
