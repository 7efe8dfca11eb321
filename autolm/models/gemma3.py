"""Gemma 3's text model (model_type gemma3_text, and the language model of the image-text checkpoints, model_type
gemma3: Gemma 3 4B and larger): Gemma 2's layer with (1 + w) RMSNorm on queries and keys per
head and a RoPE table per layer type: sliding layers rotate with their own base (rope_local_base_freq), global
layers with rope_theta and the checkpoint's RoPE scaling. Global every 6th layer by default
(sliding_window_pattern). attn_logit_softcapping is read but not applied, as in transformers' Gemma 3; the final
soft-capping applies where set (off by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, GGUFLayout, Ignored, Rename
from .gemma2 import (
    GEMMA_GGUF_LAYER,
    Gemma2Config,
    Gemma2DecoderLayer,
    Gemma2ForCausalLM,
    Gemma2Model,
    gguf_derive,
    takes_hidden_activation,
)
from .image_text import TextFirstConfig

# layer type -> (config.json's v4 key for its RoPE base, transformers' default base)
_THETA = {"sliding_attention": ("rope_local_base_freq", 10000.0), "full_attention": ("rope_theta", 1000000.0)}


@takes_hidden_activation
@dataclass(repr=False)
class Gemma3TextConfig(Gemma2Config):
    """transformers' Gemma3TextConfig; rope_parameters holds one dict per layer type."""

    model_type: ClassVar[str] = "gemma3_text"

    vocab_size: int = 262_208
    max_position_embeddings: int = 131_072
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {
            kind: {"rope_type": "default", "rope_theta": theta} for kind, (_, theta) in _THETA.items()
        }
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """rope_parameters by layer type (v5), or v4's rope_theta (global layers), rope_local_base_freq (sliding
        layers) and rope_scaling (global layers), as transformers' Gemma3TextConfig reads them; written back as
        v5, as transformers writes them."""
        given = d.get("rope_parameters")
        if given is None:
            given = {"full_attention": d.get("rope_scaling")}
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
            params = {"rope_theta": d.get(key, default), **params}
            inner = {"rope_parameters": params}
            if "max_position_embeddings" in d:
                inner["max_position_embeddings"] = d["max_position_embeddings"]
            kinds[kind], _ = super().read_rope(inner, source)
        return kinds, "v5"

    def __post_init__(self) -> None:
        self.extra.pop("rope_local_base_freq", None)  # read into rope_parameters (read_rope)
        super().__post_init__()

    def default_pattern(self) -> int:
        n = self.extra.get("sliding_window_pattern", 6)
        if not _is_int(n) or n <= 0:
            raise ConfigError(
                f"{self.source}: sliding_window_pattern must be a positive integer, found {n!r}"
            )
        return n

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["full_attention"]["rope_theta"])

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {kind: self.rope_parameters[kind] for kind in _THETA if kind in self.layer_types}

    def layer_rope(self, i: int) -> str:
        return self.layer_types[i]

    @property
    def qk_norm(self) -> bool:
        return True

    @property
    def attn_softcap(self) -> float | None:
        return None  # transformers' Gemma 3 attention does not pass attn_logit_softcapping on


class Gemma3Config(TextFirstConfig):
    """transformers' Gemma3Config (model_type gemma3: the image-text checkpoints, Gemma 3 4B and larger). autolm runs
    their language model: the config is its `text_config`, read as a Gemma3TextConfig (top-level settings it
    leaves out, such as tie_word_embeddings and dtype, taken from the outer config), and loading skips the vision
    tower's and projector's tensors (Gemma3ForCausalLM.checkpoint_rules). Its logits on text are the image-text
    model's: as transformers' Gemma3ForConditionalGeneration, no final soft-capping whatever text_config says
    (final_logit_softcapping is read as None). Saved, it is the text model transformers' Gemma3ForCausalLM loads,
    with the same logits."""

    model_type: ClassVar[str] = "gemma3"
    text_class: ClassVar[type] = Gemma3TextConfig
    fixed: ClassVar[dict[str, Any]] = {"final_logit_softcapping": None}


class ShieldGemma2Config(Gemma3Config):
    """transformers' ShieldGemma2Config (ShieldGemma 2): Gemma 3's image-text model inside an image classifier, whose
    forward gives the last token's logits of two tokens (yes / no); autolm runs its language model, read as
    Gemma3Config (all the logits), the head tied where either config ties it (text_config's default: tied)."""

    model_type: ClassVar[str] = "shieldgemma2"

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool:
        return bool(outer.get("tie_word_embeddings") or text.get("tie_word_embeddings", True))


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's layer as Gemma3TextConfig sets it up (q/k norms, no score soft-capping, RoPE by layer type)."""


class Gemma3TextModel(Gemma2Model):
    def __init__(self, config: Any):
        super().__init__(config, Gemma3DecoderLayer)


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's reading of a gemma3 GGUF: no sliding window in the file means every layer is global, the
    sliding layers' RoPE base is rope.freq_base_swa (10000 where absent) and RoPE scaling is the global layers'."""
    if not d.get("sliding_window"):
        d.pop("sliding_window", None)
        if _is_int(d.get("num_hidden_layers")) and d["num_hidden_layers"] > 0:
            d["layer_types"] = ["full_attention"] * d["num_hidden_layers"]
    gguf_derive(big_layers=62, pattern=6)(d, get)
    d["rope_parameters"] = {
        "full_attention": d.get("rope_parameters") or {},
        "sliding_attention": {"rope_theta": get("rope.freq_base_swa", 10000.0)},
    }


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """transformers' Gemma3ForCausalLM (the text model; model_type gemma3_text)."""

    config_class = Gemma3TextConfig
    checkpoint_rules = CheckpointRules(
        [  # the image-text checkpoints (Gemma3Config): their language model's tensors, saved as the text model's
            # ShieldGemma 2's as transformers writes them (the classifier's `model.` before Gemma 3's older names)
            # and reads them (without it)
            Rename(r"^(model\.)?model\.language_model\.model\.", "model.", r"(?!)", ""),
            Rename(r"^model\.lm_head\.", "lm_head.", r"(?!)", ""),
            Rename(r"^(language_model\.model|model\.language_model)\.", "model.", r"(?!)", ""),
            Rename(r"^language_model\.lm_head\.", "lm_head.", r"(?!)", ""),
            Ignored(r"(model\.){0,2}(vision_tower|multi_modal_projector)\..+"),
        ]
    )
    gguf = GGUFLayout(
        "gemma3",
        config=(("attention.key_length", "head_dim"), ("final_logit_softcapping", "final_logit_softcapping")),
        layer=GEMMA_GGUF_LAYER,
        norm_shift=1.0,
        derive=_gguf_derive,
    )
    _no_split_modules: ClassVar[list[str]] = ["Gemma3DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Gemma3TextModel(config))
