"""Cohere Compass (CohereLabs' North models: model_type cohere_compass_text; and the language model of the image-text
checkpoints, model_type cohere_compass, e.g. North-Micro-Vision-Instruct). Cohere 2's parallel block (one LayerNorm
feeding attention and the SwiGLU MLP, both added to the residual) with layer types as `layer_types` says (all full by
default; sliding layers attend within `sliding_window`) and `rope_parameters` keyed by layer type, a null entry for a
type without position encoding (NoPE). Unlike Cohere 2, RoPE rotates the two halves of each head (Qwen 3's
rotate-half; the multimodal sections of the image-text model's RoPE turn every frequency by the text position on
text), and the logits are multiplied by `logit_scale` only where it is set. llama.cpp has no Cohere Compass architecture: no GGUF layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from .base import CausalLM
from .beam import _KINDS, NopeRopeConfig
from .cohere2 import Cohere2Config, Cohere2DecoderLayer, Cohere2ForCausalLM, Cohere2Model
from .qwen3 import Qwen3VLConfig


@dataclass(repr=False)
class CohereCompassTextConfig(NopeRopeConfig, Cohere2Config):
    """transformers' CohereCompassTextConfig: Cohere 2's fields and defaults, with no logit scale, every layer full and
    no RoPE entries by default (transformers' model needs one per layer type: autolm's model refuses it by name)."""

    model_type: ClassVar[str] = "cohere_compass_text"

    logit_scale: float | None = None
    pooling: str | None = None
    rope_parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """As NopeRopeConfig; a rope_theta / rope_type beside the layer types' entries dropped, as transformers
        drops them (the Hub's North-Micro-Vision config holds both)."""
        given = d.get("rope_parameters")
        if isinstance(given, dict) and set(given) & set(_KINDS):
            d = {
                **d,
                "rope_parameters": {k: v for k, v in given.items() if k not in ("rope_theta", "rope_type")},
            }
        return super().read_rope(d, source)

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:
            self.layer_types = ["full_attention"] * n
        pattern = self.extra.get("sliding_window_pattern")  # kept as read: Cohere 2 would consume it
        super().__post_init__()
        if pattern is not None:
            self.extra["sliding_window_pattern"] = pattern

    def validate(self) -> None:
        PretrainedConfig.validate(self)  # Cohere 2's checks but for a logit scale that may be null
        if not _is_number(self.layer_norm_eps) or not 0 < self.layer_norm_eps < 1:
            raise ConfigError(
                f"{self.source}: layer_norm_eps must be a positive number below 1, found {self.layer_norm_eps!r}"
            )
        if self.logit_scale is not None and not _is_number(self.logit_scale):
            raise ConfigError(
                f"{self.source}: logit_scale must be a number or null, found {self.logit_scale!r}"
            )


class CohereCompassConfig(Qwen3VLConfig):
    """transformers' CohereCompassConfig (the image-text model, Qwen3-VL's wrapper): its language model's; the head
    tied by the outer config (untied by default); the image-text model scales its logits as the text model does."""

    model_type: ClassVar[str] = "cohere_compass"
    text_class: ClassVar[type] = CohereCompassTextConfig


class CohereCompassDecoderLayer(Cohere2DecoderLayer):
    """Cohere 2's parallel block, RoPE (where the layer type has it) over the two halves of each head."""

    def __init__(self, config: CohereCompassTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn.rope_interleaved = False


class CohereCompassForCausalLM(Cohere2ForCausalLM):
    """transformers' CohereCompassForCausalLM: logits = lm_head(h) * logit_scale (1 where unset)."""

    config_class = CohereCompassTextConfig
    gguf = None
    _no_split_modules: ClassVar[list[str]] = ["CohereCompassDecoderLayer"]
    layer_cls: ClassVar[type[nn.Module]] = CohereCompassDecoderLayer

    def __init__(self, config: CohereCompassTextConfig):
        config.check_rope_entries()
        CausalLM.__init__(self, config, Cohere2Model(config, self.layer_cls))
        self.logit_scale = 1.0 if config.logit_scale is None else float(config.logit_scale)
