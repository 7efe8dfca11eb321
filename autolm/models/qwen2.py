"""Qwen 2: Llama with q/k/v biases; a sliding window only with use_sliding_window, on layers from
max_window_layers on. Qwen2-VL's and Qwen2.5-VL's language model is a Qwen 2 (autolm.models.image_text), as is
Qwen2.5-Omni's thinker's: their checkpoints load as one, and llama.cpp's "qwen2vl" files (the converter's Qwen 2 keys
and tensors, plus the multimodal RoPE sections) read as "qwen2" ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..nn import GGUFLayout
from .image_text import EitherTiesConfig, ImageTextConfig, ThinkerConfig
from .llama import LlamaConfig, LlamaForCausalLM


@dataclass(repr=False)
class Qwen2Config(LlamaConfig):
    model_type: ClassVar[str] = "qwen2"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "attention_bias",
        "head_dim",
        "mlp_bias",
    )  # not in transformers' config: written when set
    vocab_size: int = 151936
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def layer_window(self, i: int) -> int | None:
        window = self.sliding_window if self.use_sliding_window else None
        if self.layer_types is not None:
            return window if self.layer_types[i] == "sliding_attention" else None
        return window if window is not None and i >= self.max_window_layers else None

    qkv_bias = property(lambda self: True)
    o_bias = property(lambda self: False)


class Qwen2VLConfig(EitherTiesConfig):
    """transformers' Qwen2VLConfig (Qwen2-VL): its language model's, a Qwen 2 with multimodal RoPE; older files keep
    its settings at the top level; files before transformers 5 hold tie_word_embeddings in text_config (either
    ties the head)."""

    model_type: ClassVar[str] = "qwen2_vl"
    text_class: ClassVar[type] = Qwen2Config
    flat: ClassVar[bool] = True
    mrope: ClassVar[bool] = True


class Qwen2_5_VLConfig(Qwen2VLConfig):
    """transformers' Qwen2_5_VLConfig (Qwen2.5-VL), read as Qwen2VLConfig."""

    model_type: ClassVar[str] = "qwen2_5_vl"


class Qwen2_5OmniThinkerConfig(ImageTextConfig):
    """transformers' Qwen2_5OmniThinkerConfig (Qwen2.5-Omni's thinker): its language model's, Qwen2.5-VL's text model
    (a Qwen 2 with multimodal RoPE); the head tied by the thinker's config (untied by default; text_config's own
    setting, true by default, is not what transformers ties by); transformers' text defaults where text_config
    leaves them out."""

    model_type: ClassVar[str] = "qwen2_5_omni_thinker"
    text_class: ClassVar[type] = Qwen2Config
    tie_default: ClassVar[bool | None] = False
    mrope: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "sliding_window": 32768, "rope_theta": 1e6,
    }  # fmt: skip


class Qwen2_5OmniConfig(ThinkerConfig):
    """transformers' Qwen2_5OmniConfig (Qwen2.5-Omni: thinker, talker and token2wav): its thinker's language model
    (thinker_config read as Qwen2_5OmniThinkerConfig; the checkpoint's thinker.model.* and thinker.lm_head.*)."""

    model_type: ClassVar[str] = "qwen2_5_omni"
    thinker_class: ClassVar[type] = Qwen2_5OmniThinkerConfig


class FastVlmConfig(EitherTiesConfig):
    """transformers' FastVlmConfig (Apple FastVLM): its language model's, a Qwen 2, tied where either config ties
    it (the outer config takes text_config's setting)."""

    model_type: ClassVar[str] = "fast_vlm"
    text_class: ClassVar[type] = Qwen2Config


class LlavaOnevisionConfig(ImageTextConfig):
    """transformers' LlavaOnevisionConfig (LLaVA-OneVision): its language model's, a Qwen 2 unless text_config names
    another family; the head untied by default."""

    model_type: ClassVar[str] = "llava_onevision"
    text_class: ClassVar[type] = Qwen2Config
    tie_default: ClassVar[bool | None] = False


class InternVLConfig(ImageTextConfig):
    """transformers' InternVLConfig (InternVL 3 / 3.5, the -hf checkpoints): its language model's, a Qwen 2 unless
    text_config names another family (Qwen 3, Llama, ...); the head tied by default."""

    model_type: ClassVar[str] = "internvl"
    text_class: ClassVar[type] = Qwen2Config
    tie_default: ClassVar[bool | None] = True


class GotOcr2Config(ImageTextConfig):
    """transformers' GotOcr2Config (GOT-OCR 2.0): its language model's, a Qwen 2; the head tied by default."""

    model_type: ClassVar[str] = "got_ocr2"
    text_class: ClassVar[type] = Qwen2Config
    tie_default: ClassVar[bool | None] = True


class Ovis2Config(GotOcr2Config):
    """transformers' Ovis2Config (Ovis 2): its language model's, a Qwen 2; the head tied by default."""

    model_type: ClassVar[str] = "ovis2"


class Qwen2AudioConfig(ImageTextConfig):
    """transformers' Qwen2AudioConfig (Qwen2-Audio, audio-text): its language model's, a Qwen 2; the head never
    tied (the model ties none)."""

    model_type: ClassVar[str] = "qwen2_audio"
    text_class: ClassVar[type] = Qwen2Config
    fixed: ClassVar[dict[str, Any]] = {"tie_word_embeddings": False}


class AudioFlamingo3Config(Qwen2AudioConfig):
    """transformers' AudioFlamingo3Config (Audio Flamingo 3, audio-text), read as Qwen2AudioConfig."""

    model_type: ClassVar[str] = "audioflamingo3"


class MusicFlamingoConfig(Qwen2AudioConfig):
    """transformers' MusicFlamingoConfig (Music Flamingo, audio-text), read as Qwen2AudioConfig."""

    model_type: ClassVar[str] = "musicflamingo"


class VibeVoiceAsrConfig(Qwen2AudioConfig):
    """transformers' VibeVoiceAsrConfig (VibeVoice-ASR, audio-text), read as Qwen2AudioConfig; its acoustic and
    semantic tokenizers' encoders skipped."""

    model_type: ClassVar[str] = "vibevoice_asr"


class VideoLlama3Config(EitherTiesConfig):
    """transformers' VideoLlama3Config (VideoLLaMA 3): its language model's, a Qwen 2; the head tied by the outer
    config or, as older files hold it, by text_config (untied by default)."""

    model_type: ClassVar[str] = "video_llama_3"
    text_class: ClassVar[type] = Qwen2Config


class PPChart2TableConfig(GotOcr2Config):
    """transformers' PPChart2TableConfig (PP-Chart2Table, a GOT-OCR 2.0 model), read as GotOcr2Config."""

    model_type: ClassVar[str] = "pp_chart2table"


class Qwen2ForCausalLM(LlamaForCausalLM):
    config_class = Qwen2Config
    gguf = GGUFLayout("qwen2", fixed=(("use_sliding_window", False),))
    gguf_more = (GGUFLayout("qwen2vl", fixed=(("use_sliding_window", False),)),)
