"""PaddleOCR-VL's language model (model_type paddleocr_vl_text; paddleocr_vl: the image-text checkpoints): ERNIE 4.5's
layer (pre-norm GQA attention and a SiLU-gated MLP, one `use_bias` switch for every projection's bias, head_dim 128
whatever the hidden size, RoPE base 500000, the head tied by default) with Qwen 2 VL's multimodal RoPE, which rotates
halves (x_i, x_{i + d/2}) as Llama does, not ERNIE 4.5's interleaved pairs. On text every token's three positions are
its text position, so the sections (`mrope_section`, kept in rope_parameters as read) change nothing: plain RoPE.

The image-text config holds the language model's settings as text_config, or (the Hub's files) at the top level; the
head is tied unless both the outer config and text_config untie it (transformers 5 forwards text_config's setting).
llama.cpp's converter writes the language model as "paddleocr" (ERNIE 4.5's tensors, q/k as the checkpoint's: its
multimodal RoPE rotates halves too; rope.dimension_sections)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, GGUFLayout, Ignored, RMSNorm
from .base import DecoderModel
from .ernie4_5 import Ernie4_5Config, Ernie4_5DecoderLayer, Ernie4_5ForCausalLM
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig

_TIE = "tie_word_embeddings"


class PaddleOCRTextConfig(Ernie4_5Config):
    """transformers' PaddleOCRTextConfig: Ernie4_5Config's fields and defaults under model_type paddleocr_vl_text."""

    model_type: ClassVar[str] = "paddleocr_vl_text"

    def validate(self) -> None:
        super().validate()
        sections = self.rope_parameters.get("mrope_section")
        if sections is not None and (
            not isinstance(sections, list) or not all(_is_int(s) and s >= 0 for s in sections)
        ):
            raise ConfigError(
                f"{self.source}: rope_parameters.mrope_section must be a list of non-negative integers, "
                f"found {sections!r}"
            )


class PaddleOCRVLConfig(ImageTextConfig):
    """transformers' PaddleOCRVLConfig (model_type paddleocr_vl): its language model's config (see the module
    docstring); older and Hub files hold the text settings at the top level (`flat`)."""

    model_type: ClassVar[str] = "paddleocr_vl"
    text_class: ClassVar[type] = PaddleOCRTextConfig
    flat: ClassVar[bool] = True

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool:
        return bool(outer.get(_TIE, True) or text.get(_TIE, True))


class PaddleOCRDecoderLayer(Ernie4_5DecoderLayer):
    """ERNIE 4.5's layer rotating halves (Llama's RoPE) instead of interleaved pairs."""

    def __init__(self, config: PaddleOCRTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn.rope_interleaved = False


class PaddleOCRTextModel(DecoderModel):
    def __init__(self, config: PaddleOCRTextConfig):
        super().__init__(config, PaddleOCRDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


def _gguf_config(d: dict[str, Any], get) -> None:
    """The converter's rope.dimension_sections: the multimodal RoPE's sections, kept (plain RoPE on text)."""
    sections = get("rope.dimension_sections")
    if sections is not None:
        d["rope_parameters"]["mrope_section"] = [int(x) for x in sections[:3]]


def _gguf_write_config(m: dict[str, Any], c: PaddleOCRTextConfig) -> None:
    """What llama.cpp's PaddleOCRModel writes: ERNIE 4.5's keys (the head size as key/value length, no rotary
    count: llama.cpp rotates whole heads) and the sections. llama.cpp's paddleocr reads optional q/k/v/o biases but
    none on the MLP, which `use_bias` also gives: refused."""
    if c.use_bias:
        raise ConfigError(
            "llama.cpp's 'paddleocr' has no MLP biases: a paddleocr_vl_text model with use_bias true cannot be written"
        )
    m.pop("vocab_size", None)
    m.pop("rope.dimension_count", None)
    sections = c.rope_parameters.get("mrope_section") or [c.head_dim // 2, 0, 0]
    m["rope.dimension_sections"] = ([*sections] + [0] * 4)[:4]


class PaddleOCRVLForCausalLM(Ernie4_5ForCausalLM):
    """PaddleOCR-VL's language model (transformers has no text-only causal LM: its PaddleOCRTextModel carries the
    head's hidden states)."""

    config_class = PaddleOCRTextConfig
    # the files' own layout (transformers saves it back so): the language model as model.*, the vision tower as
    # visual.*, the projector as mlp_AR.*
    checkpoint_rules = CheckpointRules([*IMAGE_TEXT_RULES, Ignored(r"mlp_AR\..+")])
    gguf = GGUFLayout(
        "paddleocr",
        config=(("attention.key_length", "head_dim"),),
        fixed=(("use_bias", False),),
        present=(("blk.0.attn_q.bias", "use_bias"),),
        derive=_gguf_config,
        write_config=_gguf_write_config,
    )
    _no_split_modules: ClassVar[list[str]] = ["PaddleOCRDecoderLayer"]

    def __init__(self, config: PaddleOCRTextConfig):
        super(Ernie4_5ForCausalLM, self).__init__(config, PaddleOCRTextModel(config))
