"""Mistral: Llama with a sliding window (when set) on every layer and no biases. Mistral Small 3.1 / 3.2's image-text
checkpoints (model_type mistral3, autolm.models.ministral3.Mistral3Config) load their language model as one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..nn import GGUFLayout
from .image_text import ImageTextConfig
from .llama import LlamaConfig, LlamaForCausalLM


@dataclass(repr=False)
class MistralConfig(LlamaConfig):
    model_type: ClassVar[str] = "mistral"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "attention_bias",
        "max_window_layers",
        "mlp_bias",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = 4096

    def layer_window(self, i: int) -> int | None:
        return super().layer_window(i) if self.layer_types is not None else self.sliding_window

    qkv_bias = property(lambda self: False)
    o_bias = property(lambda self: False)


def _gguf_write_config(m: dict[str, Any], c: MistralConfig) -> None:
    """llama.cpp's LlamaModel converter writes no sliding window."""
    m.pop("attention.sliding_window", None)


class Idefics2Config(ImageTextConfig):
    """transformers' Idefics2Config (Idefics 2): its language model's (model.text_model.*), a Mistral unless
    text_config names another family; the head untied by default."""

    model_type: ClassVar[str] = "idefics2"
    text_class: ClassVar[type] = MistralConfig
    tie_default: ClassVar[bool | None] = False


class MistralForCausalLM(LlamaForCausalLM):
    config_class = MistralConfig
    # llama.cpp's converter writes Mistral as "llama", whose graph has no sliding window: a model with one goes out
    # without it, with a warning (gguf_plan.check); a file reads back as Llama
    gguf = GGUFLayout(
        "llama", permute_qk=True, fixed=(("sliding_window", None),), write_config=_gguf_write_config
    )
