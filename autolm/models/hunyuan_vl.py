"""HunYuan-VL's language model (Tencent's HunyuanOCR; model_type hunyuan_vl_text, and hunyuan_vl: the image-text
checkpoints' language model): Hunyuan dense's decoder (autolm.models.hunyuan_v1_dense: per-head q/k RMSNorms after
RoPE, NTK-alpha RoPE) with XD-RoPE, a head tied by default and a `sep_token_id`.

XD-RoPE (`mrope_section` in rope_parameters; `xdrope_section` and type "xdrope" in older files, read as transformers
reads them: the sections, type "dynamic"): the rotary frequencies' shares of a token's 3 or 4 positions (sequence,
width, height, image index). On text every one of a token's positions is its text position (transformers'
HunYuanVLTextModel expands the 1-D positions over the axes; generation gives text zero rope deltas), so every
frequency turns by it as in plain RoPE: the sections are kept in the config (written back, and to GGUF as
rope.dimension_sections) and the rotation is the dense family's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, GGUFLayout, Ignored, RMSNorm
from .base import CausalLM, DecoderModel
from .hunyuan_v1_dense import (
    HunYuanDenseV1Config,
    HunYuanDenseV1DecoderLayer,
    HunYuanDenseV1ForCausalLM,
)
from .hunyuan_v1_dense import (
    _gguf_write_config as _dense_write_config,
)
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig

_TIE = "tie_word_embeddings"
# older Tencent files' names for transformers' fields (its attribute_map): read as the field where it is absent
_LEGACY = {"attention_head_dim": "head_dim", "org_vocab_size": "vocab_size", "pad_id": "pad_token_id"}


@dataclass(repr=False)
class HunYuanVLTextConfig(HunYuanDenseV1Config):
    """transformers' HunYuanVLTextConfig: Hunyuan dense's fields and defaults, the head tied, a separator token."""

    model_type: ClassVar[str] = "hunyuan_vl_text"

    tie_word_embeddings: bool = True
    sep_token_id: int | None = 4

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        if isinstance(d, dict):
            d = dict(d)
            for old, new in _LEGACY.items():
                if old in d and new not in d:
                    d[new] = d.pop(old)
        return super().from_dict(d, source, **overrides)

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """XD-RoPE as transformers reads it: `xdrope_section` as mrope_section, type "xdrope" as "dynamic"."""
        rope, spelling = super().read_rope(d, source)
        legacy = rope.pop("xdrope_section", None)
        if legacy is not None:
            if rope.get("mrope_section") not in (None, legacy):
                raise ConfigError(
                    f"{source}: RoPE mrope_section {rope['mrope_section']!r} and xdrope_section {legacy!r} differ"
                )
            rope["mrope_section"] = legacy
        if rope.get("rope_type") == "xdrope":
            rope["rope_type"] = "dynamic"
        return rope, spelling

    def validate(self) -> None:
        pad = self.pad_token_id
        if pad == -1:  # HunyuanOCR's files: no padding token, kept as -1 (as transformers keeps it)
            self.pad_token_id = None
        try:
            super().validate()
        finally:
            self.pad_token_id = pad
        sections = self.rope_parameters.get("mrope_section")
        if sections is not None:
            half = self.head_dim // 2
            if not (isinstance(sections, list) and all(_is_int(s) and s >= 0 for s in sections)) or (
                sum(sections) != half
            ):
                raise ConfigError(
                    f"{self.source}: RoPE mrope_section must be non-negative integers summing to head_dim / 2 "
                    f"({half}), found {sections!r}"
                )
        sep = self.sep_token_id
        if sep is not None and not (_is_int(sep) and sep >= 0):
            raise ConfigError(
                f"{self.source}: sep_token_id must be a non-negative integer or null, found {sep!r}"
            )

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        """The dense family's RoPE: on text the XD-RoPE sections turn every frequency by the text position."""
        kinds = super().rope_kinds()
        return {k: {n: v for n, v in r.items() if n != "mrope_section"} for k, r in kinds.items()}


class HunYuanVLConfig(ImageTextConfig):
    """transformers' HunYuanVLConfig (model_type hunyuan_vl): its language model's config. The head is tied unless
    both the outer config and text_config untie it (each defaults to tied); older flat files keep the language
    model's settings at the top level."""

    model_type: ClassVar[str] = "hunyuan_vl"
    text_class: ClassVar[type] = HunYuanVLTextConfig
    flat: ClassVar[bool] = True

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool:
        return bool(outer.get(_TIE, True) or text.get(_TIE, True))


class HunYuanVLDenseV1DecoderLayer(HunYuanDenseV1DecoderLayer):
    """transformers' HunYuanVLDenseV1DecoderLayer: Hunyuan dense's layer."""


class HunYuanVLTextModel(DecoderModel):
    def __init__(self, config: HunYuanVLTextConfig):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, HunYuanVLDenseV1DecoderLayer, norm)


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's hunyuan_vl: XD-RoPE as the VL converter writes it (the base unscaled, rope.scaling.alpha, the
    sections as rope.dimension_sections; llama.cpp scales the base by alpha ** (d / (d - 2)))."""
    alpha, sections = get("rope.scaling.alpha"), get("rope.dimension_sections")
    rope = d["rope_parameters"]
    if alpha:
        rope.update(rope_type="dynamic", alpha=float(alpha), factor=float(get("rope.scaling.factor") or 1.0))
    if sections is not None and any(sections):
        rope["mrope_section"] = [int(s) for s in sections]


def _gguf_write_config(meta: dict[str, Any], c: HunYuanVLTextConfig) -> None:
    """As llama.cpp's HunyuanVLTextModel writes it: Hunyuan dense's keys; for NTK-alpha RoPE the base unscaled with
    rope.scaling.alpha, scaling type none, the factor, the model's context as both lengths, the sections."""
    _dense_write_config(meta, c)
    rope = c.rope_parameters
    if c.ntk_alpha:
        meta["rope.freq_base"] = float(rope["rope_theta"])
        meta["rope.scaling.alpha"] = float(rope["alpha"])
        meta["rope.scaling.factor"] = float(rope.get("factor", 1))
    if rope.get("mrope_section") is not None:
        meta["rope.dimension_sections"] = list(rope["mrope_section"])


class HunYuanVLForCausalLM(HunYuanDenseV1ForCausalLM):
    """HunYuan-VL's language model (transformers has it as HunYuanVLTextModel, with the tied head of
    HunYuanVLForConditionalGeneration)."""

    config_class = HunYuanVLTextConfig
    # transformers saves the image-text model in Tencent's names: the language model as model.*, the vision tower
    # as vit.* (skipped)
    checkpoint_rules = CheckpointRules([*IMAGE_TEXT_RULES, Ignored(r"vit\..+")])
    # llama.cpp's HunyuanVLTextModel converter: Hunyuan dense's tensors; its hunyuan_vl graph runs NeoX RoPE (the
    # multimodal kernel where the file has sections: the same on text), the per-head norms after RoPE, no biases
    gguf = GGUFLayout(
        "hunyuan_vl",
        config=(("attention.key_length", "head_dim"),),
        layer=(("attn_q_norm", "self_attn.query_layernorm"), ("attn_k_norm", "self_attn.key_layernorm")),
        fixed=(("attention_bias", False),),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    _no_split_modules: ClassVar[list[str]] = ["HunYuanVLDenseV1DecoderLayer"]

    def __init__(self, config: Any):
        CausalLM.__init__(self, config, HunYuanVLTextModel(config))
