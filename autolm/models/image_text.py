"""Image-text (and audio-text) checkpoints whose language model autolm runs (Gemma 3 / 3n / 4, Llama 4, Llama 3.2
Vision, Emu3, Qwen 2 VL / 2.5 VL / 3 VL / 3 VL MoE / 3.5, GLM-4V, Mistral 3, LLaVA / LLaVA-NeXT / LLaVA-OneVision /
VipLLaVA / Video-LLaVA / LLaVA-NeXT-Video, InternVL, SmolVLM / Idefics 2 / 3, PaliGemma, GOT-OCR 2, Ovis 2, Fuyu,
DeepSeek-VL, Janus, LightOnOCR, EXAONE 4.5, LFM2-VL, Aya Vision, Command A Vision, Kimi K2.5, HunyuanOCR, Step 3.7,
Inkling, Qwen2-Audio, Voxtral, Granite Speech, Phi-4-multimodal, Audio Flamingo 3, Music Flamingo, VibeVoice-ASR,
VideoLLaMA 3, PP-Chart2Table, Qwen3-ASR, Fun-ASR-Nano, MOSS Transcribe-Diarize, Qianfan-OCR, GLM-ASR, HyperCLOVA X
Vision 2, LFM3-VL, MiniCPM-OCR, MiniCPM-V 4.6 / 4.7, BLIP-2, InstructBLIP, InstructBLIP-Video, Aria, Cosmos3 Omni /
Edge, GLM-4.6V, GLM-GA, GLM-OCR, Nemotron H Omni, ShieldGemma 2, Granite Docling, Granite 4 Vision, FastVLM,
PerceptionLM, PaddleOCR-VL, ERNIE 4.5 VL, Mistral Large 4, DeepSeek-OCR 2, Unlimited-OCR, Molmo 2, Muse Glimmer /
Spark, and the Qwen2.5-Omni / Qwen3-Omni-MoE thinkers): their config is a wrapper holding the language model's
settings as `text_config` (the Omni models' under thinker_config), and their files hold the language model's tensors
beside a vision (or audio) tower's.

`ImageTextConfig` reads such a config.json as the language model's config: text_config, read by the text family's
config class (by text_config's model_type where a wrapper holds several: Mistral 3's Mistral or Ministral 3), with
dtype from the outer config where text_config leaves it out and tie_word_embeddings as the image-text model ties
its head (`tie`). Older Qwen 2 VL / 2.5 VL files keep the language model's settings at the top level, their
multimodal RoPE as rope_scaling {"type": "mrope", "mrope_section": [...]} (`flat`).

Multimodal RoPE (`mrope_section`): the rotary frequencies' shares of a token's temporal, height and width positions.
For text every token's three positions are its text position, so each frequency turns by it as in plain RoPE:
a text model's config drops the sections (`mrope`), the GGUF files' rope.dimension_sections are not read.

IMAGE_TEXT_RULES (every family's by default, models.base.CausalLM): the checkpoint names of the language model
(model.language_model.* in transformers 5, language_model.model.* / language_model.lm_head.* in older files,
model.text_model.* in SmolVLM's, model.* in Qwen 2 VL's) mapped to the text model's, the vision tower's and
projector's tensors skipped. Saved, the model is the text model.

A prefix attended both ways (`prompt_blocks`, the block ids of autolm.nn's Forward, as transformers' block_sequence_ids):
a config's `prefix_token_type` is the token type whose tokens form it (PaliGemma's 0, HRM-Text's 1 under prefix_lm):
with token_type_ids those tokens of a row attend each other both ways, the rest causally; its
`bidirectional_prompt`: without token_type_ids, a prompt of a batch without padding attends both ways (PaliGemma
over a Gemma whose use_bidirectional_attention is unset: transformers' SDPA attention runs non-causal where it
leaves its mask out, and with padding the causal mask it builds). Either applies to the first forward over an empty
cache (the prompt's prefill, or a forward without a cache), as in transformers: later tokens attend causally, so the
one-token decode steps run as they are.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError, GenerationError
from ..nn import Ignored, Rename

IMAGE_TEXT_RULES = (
    # Qwen2.5-Omni's and Qwen3-Omni-MoE's whole models: the thinker's language model (`ThinkerConfig`)
    Rename(r"^thinker\.", "", r"(?!)", ""),
    # transformers writes Qianfan-OCR's language model's layers as its vision encoder's (encoder.layers.N)
    Rename(r"^language_model\.model\.encoder\.layers\.", "language_model.model.layers.", r"(?!)", ""),
    Rename(r"^(language_model\.model|model\.language_model|model\.text_model)\.", "model.", r"(?!)", ""),
    Rename(r"^language_model\.lm_head\.", "lm_head.", r"(?!)", ""),
    Ignored(r"(model\.)?(visual|vision_tower|vision_model|multi_modal_projector|mm_projector|connector)\..+"),
    Ignored(r"(model\.)?(image_newline|visual_embeddings_table\.weight)"),
    # other towers and projectors: video / audio (Video-LLaVA, Qwen2-Audio, Voxtral, Granite Speech), DeepSeek-VL's
    # and Janus's aligners, DeepSeek-VL-Hybrid's high-resolution tower, Janus's image generation, LightOnOCR's
    # vision encoder, Fuyu's patch embedding, VibeVoice-ASR's tokenizers' encoders, Qianfan-OCR's, HyperCLOVA X
    # Vision 2's and MiniCPM-V's projectors
    Ignored(
        r"(model\.)?(image_tower|video_tower|audio_tower|encoder|projector|aligner|vision_encoder|vision_projection"
        r"|vision_embed_tokens|high_res_vision_\w+|vqmodel|generation_\w+|(acoustic|semantic)_tokenizer_encoder"
        r"|mlp1|vision_projector|merger)\..+"
    ),
    Ignored(r"(model\.)?high_res_vision_alpha"),
    # Granite Docling's density router, Granite 4 Vision's Q-Former projectors, Nemotron H Omni's vision norm and
    # audio projection (transformers' names and the Hub's)
    Ignored(
        r"(model\.)?(density_router|layerwise_projectors|spatial_projectors|vision_final_layernorm|embed_audio"
        r"|sound_encoder|sound_projection)\..+"
    ),
    Ignored(r"query_tokens|(qformer|language_projection)\..+"),  # BLIP-2's and InstructBLIP's Q-Former
    Ignored(r"model\.embed_tokens_extend\..+"),  # Phi-4-multimodal's image and audio embeddings
    Ignored(r"mtp\..+"),
    Ignored(r"(talker|token2wav|code2wav)\..+"),  # the Omni models' speech generation
)
_TIE = "tie_word_embeddings"
# transformers' forward inputs that carry an image, a video or audio: autolm runs the language model alone
MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "image_sizes",
                "pixel_attention_mask", "input_features", "input_features_mask", "audio_values",
                "image_pixel_values", "audio_input_features", "image_embeds",
                "image_embeds_position_mask", "flattened_patches")  # fmt: skip


def refuse_media(model: Any, inputs: dict[str, Any]) -> None:
    """GenerationError naming the image / video / audio inputs given to a model that runs text alone."""
    given = [k for k in MEDIA_INPUTS if inputs.get(k) is not None]
    if given:
        raise GenerationError(
            f"{type(model).__name__}.forward: {', '.join(given)} given, but autolm runs the language model of an "
            "image-text (or audio-text) checkpoint alone: pass input_ids (or inputs_embeds) only"
        )


def prompt_blocks(
    config: Any, token_type_ids: Any, attention_mask: torch.Tensor | None, past: int, shape: tuple, S: int
) -> dict[str, torch.Tensor]:
    """The body's block_ids ({} for the causal mask) for new tokens of `shape` (B, T) after `past` cached ones over
    S key slots, by the config's prefix settings (see the module docstring); token_type_ids (B, T) where given."""
    if past:
        return {}
    kind, types, T = getattr(config, "prefix_token_type", None), token_type_ids, shape[1]
    if types is not None and kind is not None:
        if not isinstance(types, torch.Tensor) or tuple(types.shape) != tuple(shape):
            got = tuple(types.shape) if isinstance(types, torch.Tensor) else type(types).__name__
            raise GenerationError(
                f"token_type_ids: a {tuple(shape)} tensor (a type per token) expected, got {got}"
            )
        blocks = torch.where(types == kind, 0, -1)
    elif types is None and getattr(config, "bidirectional_prompt", False) and T == S:
        if attention_mask is not None and not bool(attention_mask[:, :S].all()):
            return {}
        blocks = torch.zeros(1, T, dtype=torch.long)  # one block: each row's tokens attend each other
    else:
        return {}
    return {"block_ids": F.pad(blocks, (0, S - T), value=-1)}


class ImageTextConfig:
    """transformers' config of an image-text model (see the module docstring); `text_class` reads text_config, or
    `text_classes` by text_config's model_type."""

    model_type: ClassVar[str]
    text_class: ClassVar[type]
    text_classes: ClassVar[dict[str, type]] = {}
    tie_default: ClassVar[bool | None] = None  # the image-text model's default; None: text_config's own
    flat: ClassVar[bool] = False  # older files: the language model's settings at the top level
    mrope: ClassVar[bool] = False  # text_config's RoPE may be multimodal (dropped: plain RoPE on text)
    fixed: ClassVar[dict[str, Any]] = {}  # text settings the image-text model fixes whatever text_config says
    defaults: ClassVar[dict[str, Any]] = {}  # the image-text model's text defaults where they differ

    def __new__(cls, text_config: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return cls.from_dict({"text_config": text_config or {}, **kwargs})

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        text = d.get("text_config") if isinstance(d, dict) else None
        if text is None and cls.flat and isinstance(d, dict):
            text = {
                k: v for k, v in d.items() if not any(w in k for w in ("vision", "image", "video", "audio"))
            }
            for key in ("model_type", "architectures"):  # the image-text model's
                text.pop(key, None)
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: model_type {cls.model_type!r} needs a text_config object (the "
                              f"language model's settings), found {str(text)[:100]}")  # fmt: skip
        text = dict(text)
        text.update({k: d[k] for k in ("dtype", "torch_dtype") if k in d and k not in text})
        tie = cls.tie(d, text)
        if tie is not None:
            text[_TIE] = tie
        if cls.mrope:
            _plain_rope(text)
        cls.adapt(text)
        return cls.text_class_of(text.get("model_type"), source).from_dict(text, source, **overrides)

    @classmethod
    def text_class_of(cls, kind: Any, source: str) -> type:
        """text_config's config class: the family text_config's model_type names (`text_classes`, or any family
        autolm ships: LLaVA's Mistral, Qwen 2, ...), else `text_class` (none named, or the wrapper's own text type,
        such as qwen2_5_vl_text)."""
        if kind in cls.text_classes:
            return cls.text_classes[kind]
        from . import config_class, model_types

        return config_class(kind, source) if kind in model_types() else cls.text_class

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool | None:
        """Whether the image-text model ties its head: the outer config's setting, else its default."""
        return outer.get(_TIE, text.get(_TIE) if cls.tie_default is None else cls.tie_default)

    @classmethod
    def adapt(cls, text: dict[str, Any]) -> None:
        """text_config as the text family's class reads it: `defaults` where absent, `fixed` always."""
        for key, value in cls.defaults.items():
            text.setdefault(key, value)
        text.update(cls.fixed)


class ThinkerConfig:
    """A model whose language model is its thinker's (Qwen2.5-Omni, Qwen3-Omni-MoE): config.json's thinker_config,
    read by the thinker's config class (`thinker_class`, an ImageTextConfig), with dtype from the outer config where
    thinker_config leaves it out; the talker and the speech decoder (IMAGE_TEXT_RULES) skipped."""

    model_type: ClassVar[str]
    thinker_class: ClassVar[type]
    text_class: ClassVar[type]  # the language model's config class: the thinker's text_class

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "thinker_class" in cls.__dict__:
            cls.text_class = cls.thinker_class.text_class

    def __new__(cls, thinker_config: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return cls.from_dict({"thinker_config": thinker_config or {}, **kwargs})

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        thinker = d.get("thinker_config") if isinstance(d, dict) else None
        if not isinstance(thinker, dict):
            raise ConfigError(f"{source}: model_type {cls.model_type!r} needs a thinker_config object (the "
                              f"thinker's settings, its language model's under text_config), found "
                              f"{str(thinker)[:100]}")  # fmt: skip
        thinker = dict(thinker)
        thinker.update({k: d[k] for k in ("dtype", "torch_dtype") if k in d and thinker.get(k) is None})
        return cls.thinker_class.from_dict(thinker, source, **overrides)


class EitherTiesConfig(ImageTextConfig):
    """A wrapper whose head is tied by the outer config or, as files before transformers 5 hold it, by text_config
    (Qwen 2 VL, GLM-4V)."""

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool:
        return bool(outer.get(_TIE) or text.get(_TIE))


class TextFirstConfig(ImageTextConfig):
    """A wrapper whose language model ties its head by text_config's setting, the outer config's where text_config
    leaves it out (Gemma 3 / 3n / 4, Llama 4)."""

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool | None:
        return text.get(_TIE, outer.get(_TIE))


_MROPE_KEYS = ("mrope_section", "mrope_interleaved", "interleaved")  # "interleaved": Qwen3-Omni-MoE's files


def _plain_rope(text: dict[str, Any]) -> None:
    """Multimodal RoPE as the plain RoPE it is on text: the sections dropped, type "mrope" read as "default"."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        if not isinstance(rope, dict):
            continue
        rope = {k: v for k, v in rope.items() if k not in _MROPE_KEYS}
        for name in ("type", "rope_type"):
            if rope.get(name) == "mrope":
                rope[name] = "default"
        text[key] = rope
