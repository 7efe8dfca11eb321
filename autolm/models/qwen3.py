"""Qwen 3: Qwen 2 without q/k/v biases by default, plus RMSNorm on queries and keys per head. Qwen3-VL's language
model is a Qwen 3 (autolm.models.image_text): its checkpoints load as one, and llama.cpp's "qwen3vl" files (the
converter's Qwen 3 keys and tensors, the multimodal RoPE sections, the vision tower's deepstack count) read as
"qwen3" ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..nn import CheckpointRules, GGUFLayout, Ignored, Rename
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .llama import LlamaForCausalLM
from .qwen2 import Qwen2Config


@dataclass(repr=False)
class Qwen3Config(Qwen2Config):
    model_type: ClassVar[str] = "qwen3"
    absent_keys: ClassVar[tuple[str, ...]] = ("mlp_bias",)  # not in transformers' config: written when set
    head_dim: int | None = 128

    qkv_bias = property(lambda self: self.attention_bias)
    o_bias = property(lambda self: self.attention_bias)
    qk_norm = property(lambda self: True)


class Qwen3VLConfig(ImageTextConfig):
    """transformers' Qwen3VLConfig (Qwen3-VL): its language model's, a Qwen 3 with interleaved multimodal RoPE; the
    head tied by the outer config (untied by default)."""

    model_type: ClassVar[str] = "qwen3_vl"
    text_class: ClassVar[type] = Qwen3Config
    tie_default: ClassVar[bool | None] = False
    mrope: ClassVar[bool] = True


class Cosmos3OmniConfig(Qwen3VLConfig):
    """transformers' Cosmos3OmniConfig (NVIDIA Cosmos3 Omni): Qwen3-VL's, read as Qwen3VLConfig; its files hold the
    language model at the top level (`layers.*`, `embed_tokens.*`, `norm.*`: Qwen3ForCausalLM's COSMOS_RULES)."""

    model_type: ClassVar[str] = "cosmos3_omni"


class LightOnOcrConfig(ImageTextConfig):
    """transformers' LightOnOcrConfig (LightOnOCR): its language model's, a Qwen 3; the head tied by default."""

    model_type: ClassVar[str] = "lighton_ocr"
    text_class: ClassVar[type] = Qwen3Config
    tie_default: ClassVar[bool | None] = True


class Qwen3ASRConfig(LightOnOcrConfig):
    """transformers' Qwen3ASRConfig (Qwen3-ASR, audio-text): its language model's, a Qwen 3; the head tied by
    default."""

    model_type: ClassVar[str] = "qwen3_asr"


class FunAsrNanoConfig(Qwen3ASRConfig):
    """transformers' FunAsrNanoConfig (Fun-ASR-Nano, audio-text), read as Qwen3ASRConfig."""

    model_type: ClassVar[str] = "fun_asr_nano"


class MossTranscribeDiarizeConfig(Qwen3ASRConfig):
    """transformers' MossTranscribeDiarizeConfig (MOSS Transcribe-Diarize, audio-text), read as Qwen3ASRConfig."""

    model_type: ClassVar[str] = "moss_transcribe_diarize"


class QianfanOCRConfig(ImageTextConfig):
    """transformers' QianfanOCRConfig (Qianfan-OCR): its language model's, a Qwen 3; the head untied by default."""

    model_type: ClassVar[str] = "qianfan_ocr"
    text_class: ClassVar[type] = Qwen3Config
    tie_default: ClassVar[bool | None] = False


# Cosmos3 Omni's files (as transformers writes and reads them): the language model's tensors at the top level, some
# under Diffusers' attention names, the vision tower's flat beside them
COSMOS_RULES = (
    Rename(r"^(layers|embed_tokens|norm)\.", r"model.\1.", r"(?!)", ""),
    *(Rename(rf"\.self_attn\.{a}\.", f".self_attn.{b}.", r"(?!)", "") for a, b in (
        ("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "o_proj"), ("norm_q", "q_norm"),
        ("norm_k", "k_norm"))),
    Ignored(r"(blocks|patch_embed|pos_embed|deepstack_merger_list)\..+"),
)  # fmt: skip


class Qwen3ForCausalLM(LlamaForCausalLM):
    config_class = Qwen3Config
    checkpoint_rules = CheckpointRules([*IMAGE_TEXT_RULES, *COSMOS_RULES])
    gguf = GGUFLayout("qwen3")
    gguf_more = (GGUFLayout("qwen3vl"),)
