"""Qwen 3 MoE: Qwen 3's attention (q/k norms per head, no biases by default) with Qwen 2 MoE's experts
(`decoder_sparse_step`, `mlp_only_layers`, `norm_topk_prob`) and no shared expert. A sliding window, when
`use_sliding_window`, applies to every layer. Qwen3-VL-MoE's language model is a Qwen 3 MoE renormalising its top k
(autolm.models.image_text; Qwen3-Omni-MoE's thinker's too, renormalising by norm_topk_prob), whose files hold the
experts stacked (E, in, out) (nn.expert_formats.InOutExperts); llama.cpp's "qwen3vlmoe" files read as "qwen3moe"
ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..nn import CheckpointRules, GGUFLayout
from ..nn.expert_formats import InOutExperts
from .base import CausalLM
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig, ThinkerConfig
from .mixtral import GGUF_EXPERTS, MixtralModel
from .qwen2_moe import GGUF_EXPERT_KEYS, QWEN_MOE_RULES, QWEN_MOE_TP, Qwen2MoeDecoderLayer, QwenMoeConfig


@dataclass(repr=False)
class Qwen3MoeConfig(QwenMoeConfig):
    """transformers' Qwen3MoeConfig (config.json may spell num_experts as num_local_experts, which is how
    transformers writes it)."""

    model_type: ClassVar[str] = "qwen3_moe"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "mlp_bias",
    )  # not in transformers' config: written when set
    attribute_map: ClassVar[dict[str, str]] = {"num_experts": "num_local_experts"}
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128

    def __post_init__(self) -> None:
        if not self.use_sliding_window:
            self.sliding_window = None
        super().__post_init__()

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window

    qk_norm = property(lambda self: True)


class Qwen3VLMoeConfig(ImageTextConfig):
    """transformers' Qwen3VLMoeConfig (Qwen3-VL-MoE): its language model's, a Qwen 3 MoE with interleaved
    multimodal RoPE that always renormalises its top k and has no sliding window; the head tied by the outer config
    (untied by default)."""

    model_type: ClassVar[str] = "qwen3_vl_moe"
    text_class: ClassVar[type] = Qwen3MoeConfig
    tie_default: ClassVar[bool | None] = False
    mrope: ClassVar[bool] = True
    fixed: ClassVar[dict[str, Any]] = {"norm_topk_prob": True, "use_sliding_window": False}


class Qwen3OmniMoeThinkerConfig(ImageTextConfig):
    """transformers' Qwen3OmniMoeThinkerConfig (Qwen3-Omni-MoE's thinker): its language model's, Qwen3-VL-MoE's text
    model (a Qwen 3 MoE with interleaved multimodal RoPE and no sliding window) that renormalises its top k by
    norm_topk_prob (true by default); the head tied by the thinker's config (untied by default); transformers' text
    defaults where text_config leaves them out."""

    model_type: ClassVar[str] = "qwen3_omni_moe_thinker"
    text_class: ClassVar[type] = Qwen3MoeConfig
    tie_default: ClassVar[bool | None] = False
    mrope: ClassVar[bool] = True
    fixed: ClassVar[dict[str, Any]] = {"use_sliding_window": False}
    defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 3584, "hidden_size": 2048, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "norm_topk_prob": True, "rope_theta": 1e6,
    }  # fmt: skip

    @classmethod
    def adapt(cls, text: dict[str, Any]) -> None:
        """Also transformers' head size where text_config gives none: hidden_size // num_attention_heads rounded
        down, as its attention takes it (its defaults' 2048 / 28 included)."""
        super().adapt(text)
        hidden, heads = text["hidden_size"], text["num_attention_heads"]
        if text.get("head_dim") is None and type(hidden) is type(heads) is int and heads > 0:
            text["head_dim"] = hidden // heads


class Qwen3OmniMoeConfig(ThinkerConfig):
    """transformers' Qwen3OmniMoeConfig (Qwen3-Omni-MoE: thinker, talker and code2wav): its thinker's language model
    (thinker_config read as Qwen3OmniMoeThinkerConfig; the checkpoint's thinker.model.* and thinker.lm_head.*)."""

    model_type: ClassVar[str] = "qwen3_omni_moe"
    thinker_class: ClassVar[type] = Qwen3OmniMoeThinkerConfig


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    pass


_GGUF = GGUFLayout(
    "qwen3moe",
    config=(*GGUF_EXPERT_KEYS, ("attention.key_length", "head_dim")),
    layer=GGUF_EXPERTS,
    fixed=(("norm_topk_prob", True), ("use_sliding_window", False)),
)


class Qwen3MoeForCausalLM(CausalLM):
    """transformers' Qwen3MoeForCausalLM."""

    config_class = Qwen3MoeConfig
    checkpoint_rules = CheckpointRules([*IMAGE_TEXT_RULES, *QWEN_MOE_RULES.rules, InOutExperts()])
    # llama.cpp renormalises the top k and runs every layer as a mixture
    gguf, gguf_more = _GGUF, (dataclasses.replace(_GGUF, arch="qwen3vlmoe"),)
    tp_patterns: ClassVar[dict[str, str]] = QWEN_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["Qwen3MoeDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, MixtralModel(config, Qwen3MoeDecoderLayer))
