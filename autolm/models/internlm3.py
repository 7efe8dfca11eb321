"""InternLM3 (internlm/internlm3-8b-instruct, model_type internlm3): transformers runs it as Llama (its
LlamaForCausalLM over an InternLM3Config), so this family is Llama's with that config: InternLM's `qkv_bias` is
Llama's attention_bias (the q/k/v and o biases) and its `bias` Llama's mlp_bias, read under either name and written
under Llama's, as transformers writes them. GGUF: llama.cpp's converter writes it as "llama" (its InternLM3Model),
which reads back as Llama, the same computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .llama import LlamaConfig, LlamaForCausalLM

# InternLM's names for Llama's fields (transformers' InternLM3Config.attribute_map)
_NAMES = {"qkv_bias": "attention_bias", "bias": "mlp_bias"}


@dataclass(repr=False)
class InternLM3Config(LlamaConfig):
    """transformers' InternLM3Config: LlamaConfig's fields with InternLM3-8B's sizes as the defaults."""

    model_type: ClassVar[str] = "internlm3"

    vocab_size: int = 128512
    hidden_size: int = 4096
    intermediate_size: int = 10240
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 2
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> InternLM3Config:
        d = {**d, **overrides}
        for theirs, ours in _NAMES.items():
            if theirs in d:
                d.setdefault(ours, d.pop(theirs))
        return super().from_dict(d, source)


class InternLM3ForCausalLM(LlamaForCausalLM):
    """What transformers builds for an InternLM3 checkpoint: Llama's model over InternLM3Config."""

    config_class = InternLM3Config
