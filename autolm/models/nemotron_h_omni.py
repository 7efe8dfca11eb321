"""Nemotron 3 Nano Omni (`nemotron_h_omni`, image-audio-text): its language model is a Nemotron H
(autolm.models.image_text). Its files hold it as `language_model.backbone.*` / `language_model.lm_head.*` beside the
RADIO vision tower (`vision_model.*`), the projectors (`mlp1.*`, the Hub's; `multi_modal_projector.*`) and the audio
branch (`sound_encoder.*`, `sound_projection.*`; `audio_tower.*`, `embed_audio.*`): NemotronHForCausalLM's rules
read the language model's tensors and skip the rest. llama.cpp writes the language model as Nemotron H's."""

from __future__ import annotations

from typing import Any, ClassVar

from .image_text import ImageTextConfig
from .nemotron_h import NemotronHConfig, NemotronHForCausalLM

__all__ = ["NemotronHForCausalLM", "NemotronH_Omni_Reasoning_V3_Config"]


class NemotronH_Omni_Reasoning_V3_Config(ImageTextConfig):
    """transformers' NemotronH_Omni_Reasoning_V3_Config (Nemotron 3 Nano Omni): its language model's (text_config, the
    older files' llm_config), tied by text_config's own setting (transformers builds it as a causal LM of its own)."""

    model_type: ClassVar[str] = "nemotron_h_omni"
    text_class: ClassVar[type] = NemotronHConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        if isinstance(d, dict) and d.get("text_config") is None and "llm_config" in d:
            d = {**d, "text_config": d["llm_config"]}
        return super().from_dict(d, source, **overrides)

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool | None:
        return text.get("tie_word_embeddings")
