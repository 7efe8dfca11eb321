"""Youtu-LLM (Tencent's Youtu-LLM-2B): Llama's pre-norm decoder layer with DeepSeek-V3's Multi-head Latent
Attention (models.deepseek_v3: q_a_proj / q_a_layernorm / q_b_proj, or a plain q_proj where q_lora_rank is null;
kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj; RoPE on the rope parts, over interleaved pairs where
`rope_interleave`; scores scaled by qk_head_dim ** -0.5, times YaRN's mscale_all_dim squared) and Qwen 3's bias-free
SiLU-gated MLP in every layer; a tied head by default.

transformers' YoutuConfig is DeepSeek-V3's without the mixture of experts: the expert fields here are DeepSeek-V3's,
unused, and written only where set. `initializer_range` and `embedding_initializer_range` (derived from
hidden_size by transformers) are kept as config.json gives them.

GGUF: llama.cpp's converter (its DeepseekV2Model) writes Youtu as "deepseek2", DeepSeek-V3's layout and MLA keys,
with every layer dense (leading_dense_block_count = block_count), no experts, expert_shared_count 0 (which claims
the file: DeepSeek-V2 / V3's have shared experts) and intermediate_size as expert_feed_forward_length. llama.cpp's
deepseek2 reads attention.q_lora_rank by the layer count (never for 26 or 27 layers, or 48 with a vocabulary of
128256, Youtu's): GGUF out refuses what it would read otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..nn import CheckpointRules, GatedMLP
from .base import CausalLM
from .deepseek_v3 import (
    SIGMOID_GATING,
    DeepseekV3Config,
    DeepseekV3DecoderLayer,
    DeepseekV3ForCausalLM,
    GGUFMla,
)
from .deepseek_v3 import _gguf_config as _v3_gguf_config
from .deepseek_v3 import _gguf_write_config as _v3_gguf_write_config
from .mixtral import MixtralModel

# DeepSeek-V3's mixture-of-experts fields, which transformers' Youtu drops (and its model never reads)
EXPERT_FIELDS = ("moe_intermediate_size", "n_shared_experts", "n_routed_experts", "output_router_logits",
                 "routed_scaling_factor", "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace",
                 "norm_topk_prob")  # fmt: skip


@dataclass(repr=False)
class YoutuConfig(DeepseekV3Config):
    """transformers' YoutuConfig: DeepSeek-V3's MLA fields with Youtu-LLM-2B's sizes and defaults (`head_dim` is
    qk_rope_head_dim, `qk_head_dim` written, as transformers does), a tied head, Llama 3's token ids."""

    model_type: ClassVar[str] = "youtu"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window", *EXPERT_FIELDS)  # not in transformers' config

    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    max_position_embeddings: int = 131072
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    tie_word_embeddings: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if "num_nextn_predict_layers" not in self.extra:
            out.pop("num_nextn_predict_layers")  # DeepSeek-V3's, not transformers' Youtu's
        return out


class YoutuDecoderLayer(DeepseekV3DecoderLayer):
    """Pre-norm MLA, then a pre-norm gated MLP (Qwen 3's: no biases) in every layer."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)


# ---- GGUF: llama.cpp's DeepseekV2Model converter (arch "deepseek2") -------------------------------------------------


def _gguf_config(d: dict[str, Any], get) -> None:
    """DeepSeek-V3's reading of the MLA keys (models.deepseek_v3._gguf_config), in a file whose layers are all
    dense, as the converter writes Youtu; the expert settings it adds are dropped."""
    n, dense = d.get("num_hidden_layers"), get("leading_dense_block_count")
    if dense != n or get("expert_count"):
        raise ConfigError(f"leading_dense_block_count {dense!r} of {n!r} layers, expert_count "
                          f"{get('expert_count')!r}: a deepseek2 file with experts is not Youtu's")  # fmt: skip
    _v3_gguf_config(d, lambda key, *a: SIGMOID_GATING if key == "expert_gating_func" else get(key, *a))
    for key in EXPERT_FIELDS:
        d.pop(key, None)


def _gguf_write_config(m: dict[str, Any], c: YoutuConfig) -> None:
    """DeepSeek-V3's MLA keys (models.deepseek_v3._gguf_write_config: refused there, rotate-half RoPE), then what
    the converter writes for a model without experts: every layer dense, intermediate_size as the experts' length,
    no shared experts; no renormalisation key (config.json names no norm_topk_prob)."""
    _v3_gguf_write_config(m, c)
    m.pop("expert_weights_norm", None)
    m["leading_dense_block_count"] = c.num_hidden_layers
    m["expert_feed_forward_length"] = c.intermediate_size
    m["expert_shared_count"] = 0


def _gguf_layout():
    """DeepSeek-V3's layout with its MLA keys and tensors only (no experts: the dense MLPs are Llama's names)."""
    v3 = DeepseekV3ForCausalLM.gguf
    mla = ("attention.kv_lora_rank", "attention.value_length_mla")
    return dataclasses.replace(
        v3,
        config=tuple(kv for kv in v3.config if kv[0] in mla),
        layer=tuple(kv for kv in v3.layer if kv[0].startswith("attn_")),
        derive=_gguf_config,
        write_config=_gguf_write_config,
        claim=("expert_shared_count", 0),
    )


class YoutuForCausalLM(CausalLM):
    """transformers' YoutuForCausalLM."""

    config_class = YoutuConfig
    checkpoint_rules = CheckpointRules(
        [GGUFMla()]
    )  # llama.cpp's attn_k_b / attn_v_b assembled into kv_b_proj
    gguf = _gguf_layout()
    # DeepSeek-V3's split of the heads (q_proj / q_b_proj and kv_b_proj by head, o_proj by its input) and Llama's
    # of the MLP; transformers' Youtu plan splits the MLP alone, which computes the same
    tp_patterns: ClassVar[dict[str, str]] = {
        k: v for k, v in DeepseekV3ForCausalLM.tp_patterns.items() if ".shared_experts." not in k
    }
    _no_split_modules: ClassVar[list[str]] = ["YoutuDecoderLayer"]

    def __init__(self, config: YoutuConfig):
        super().__init__(config, MixtralModel(config, YoutuDecoderLayer))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        self.checkpoint_rules = CheckpointRules([mla])
