"""GLM-5 (transformers' glm_moe_dsa): DeepSeek-V3.2's layers (models.deepseek_v32: latent attention over the keys a
lightning indexer keeps, dense layers by mlp_layer_types, the grouped sigmoid-routed experts) with two changes:
the indexer turns interleaved pairs (as the attention does) rather than rotate-half, and layers may share their
selection: `indexer_types` says per layer "full" (the layer runs its own indexer) or "shared" (it has no indexer and
attends to the keys the last full layer before it kept).

config.json may give no indexer_types but `index_topk_pattern` (a string of F / S, or a list) or `index_topk_freq`
(1 where absent) and `index_skip_topk_offset` (2 where absent): layer i is then full where
max(i - offset + 1, 0) % freq == 0, as transformers derives it (the keys kept, for the round trip). A shared layer
keeps nothing in the cache (its extra cache layer is zero wide).

GGUF: llama.cpp's GlmMoeDsaModel converter writes "glm-dsa": DeepSeek-V3.2's layout and keys (models.deepseek_v32),
the shared layers without indexer tensors, attention.indexer.types (true for a full layer) where config.json gives
indexer_types (autolm's always does), expert_gating_func only where config.json names the scoring function (llama.cpp's
glm-dsa routes with the sigmoid without it). A file without indexer types reads as llama.cpp reads it: every layer
full under a context of 1048576, GLM-5.2's pattern (every fourth from the third) from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Ignored
from .deepseek_v3 import SIGMOID_GATING, DeepseekV3Attention, DeepseekV3ForCausalLM, GGUFMla
from .deepseek_v32 import (
    DeepseekV32Attention,
    DeepseekV32Config,
    DeepseekV32DecoderLayer,
    DeepseekV32ForCausalLM,
    DSAIndexer,
    IndexedCausalLM,
    gguf_config,
    gguf_write_config,
)
from .glm4_moe import GROUPED_MOE_RULES
from .mixtral import MixtralModel

INDEXER_TYPES = ("full", "shared")


def _indexer_types(n: int, extra: dict[str, Any]) -> list[str] | None:
    """transformers' derivation of indexer_types from index_topk_pattern, or index_topk_freq and
    index_skip_topk_offset; None where the keys are not usable (validate names them)."""
    pattern = extra.get("index_topk_pattern")
    if isinstance(pattern, str):
        return [{"F": "full", "S": "shared"}.get(c, c) for c in pattern]
    if pattern is not None:
        return list(pattern) if isinstance(pattern, list) else None
    freq, offset = extra.get("index_topk_freq", 1), extra.get("index_skip_topk_offset", 2)
    if not (_is_int(freq) and _is_int(offset)):
        return None
    freq = max(freq, 1)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]


@dataclass(repr=False)
class GlmMoeDsaConfig(DeepseekV32Config):
    """transformers' GlmMoeDsaConfig: DeepSeek-V3.2's fields with GLM-5's sizes, and indexer_types (derived where
    absent, see the module docstring)."""

    model_type: ClassVar[str] = "glm_moe_dsa"

    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 64
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 2048
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    qk_nope_head_dim: int = 192
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    max_position_embeddings: int = 202752
    rms_norm_eps: float = 1e-5
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    indexer_types: list[str] | None = None

    def __post_init__(self) -> None:
        if self.indexer_types is None and _is_int(self.num_hidden_layers):
            self.indexer_types = _indexer_types(self.num_hidden_layers, self.extra)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        types, n = self.indexer_types, self.num_hidden_layers
        if not isinstance(types, list) or len(types) < n or set(types[:n]) - set(INDEXER_TYPES):
            raise ConfigError(f"{self.source}: indexer_types must list {INDEXER_TYPES} for each of the {n} layers "
                              f"(or index_topk_pattern / index_topk_freq give it), found {types!r}")  # fmt: skip
        if types[0] != "full":
            raise ConfigError(f"{self.source}: indexer_types must start with 'full': a shared layer reuses the keys "
                              f"an earlier layer's indexer kept, found {types[:4]!r}")  # fmt: skip


class GlmMoeDsaIndexer(DSAIndexer):
    """DeepSeek-V3.2's indexer with RoPE over interleaved pairs (transformers' GlmMoeDsaIndexer)."""

    interleaved: ClassVar[bool] = True


class GlmMoeDsaAttention(DeepseekV32Attention):
    """Latent attention over the keys its own indexer keeps ("full"), or over those the last full layer's indexer
    kept ("shared": no indexer; `source` holds that layer's attention, unregistered)."""

    indexer_class: ClassVar[type[DSAIndexer]] = GlmMoeDsaIndexer

    def __init__(self, config: Any, layer_idx: int, slot: int):
        if config.indexer_types[layer_idx] == "full":
            super().__init__(config, layer_idx, slot)
        else:
            DeepseekV3Attention.__init__(self, config, layer_idx)
            self.indexer = None
        self.kept: torch.Tensor | None = (
            None  # a full layer's last mask, which the shared layers after it read
        )
        self.source: list[GlmMoeDsaAttention] = []

    def keep(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.indexer is None:
            return self.source[0].kept.to(x.device)
        self.kept = super().keep(x, ctx)
        return self.kept


class GlmMoeDsaDecoderLayer(DeepseekV32DecoderLayer):
    """Pre-norm indexed (or sharing) MLA, then a pre-norm dense MLP or the mixture, as mlp_layer_types says."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return GlmMoeDsaAttention(config, layer_idx, config.num_hidden_layers + layer_idx)


# ---- GGUF: llama.cpp's GlmMoeDsaModel converter (arch "glm-dsa") ----------------------------------------------------

LONG_CONTEXT = 1048576  # llama.cpp's glm-dsa: a file without indexer types from this context on is GLM-5.2's


def _gguf_config(d: dict[str, Any], get) -> None:
    """DeepSeek-V3.2's reading with the sigmoid where the file names no gating function, and indexer_types from
    attention.indexer.types (or, absent, as llama.cpp defaults it: module docstring)."""
    gating = get("expert_gating_func")
    gguf_config(
        d, lambda key, *a: SIGMOID_GATING if key == "expert_gating_func" and gating is None else get(key, *a)
    )
    n, types = d.get("num_hidden_layers"), get("attention.indexer.types")
    if isinstance(types, list):
        d["indexer_types"] = ["full" if t else "shared" for t in types]
    elif _is_int(n):
        long = (d.get("max_position_embeddings") or 0) >= LONG_CONTEXT
        d["indexer_types"] = _indexer_types(
            n, {"index_topk_freq": 4, "index_skip_topk_offset": 3} if long else {}
        )


def _gguf_write_config(m: dict[str, Any], c: GlmMoeDsaConfig) -> None:
    """DeepSeek-V3.2's keys, the gating function only where config.json names the scoring function (as the
    converter), the indexer types."""
    gguf_write_config(m, c)
    if c.extra.get("scoring_func") is None:
        del m["expert_gating_func"]
    m["attention.indexer.types"] = [t == "full" for t in c.indexer_types[: c.num_hidden_layers]]


class GlmMoeDsaForCausalLM(IndexedCausalLM):
    """transformers' GlmMoeDsaForCausalLM."""

    config_class = GlmMoeDsaConfig
    # per-expert tensors on disk (GLM-4.5's rules); GLM-5's multi-token prediction layer 78 skipped, as transformers;
    # llama.cpp's attn_k_b / attn_v_b assembled (GGUFMla)
    checkpoint_rules = CheckpointRules(
        [*GROUPED_MOE_RULES.rules, Ignored(r"model\.layers\.78\..*"), GGUFMla()]
    )
    # DeepSeek-V3.2's layout as "glm-dsa" (module docstring)
    gguf = dataclasses.replace(
        DeepseekV32ForCausalLM.gguf, arch="glm-dsa", derive=_gguf_config, write_config=_gguf_write_config
    )
    # DeepSeek-V3's plan; the indexers stay whole on every rank (each rank selects the same keys)
    tp_patterns: ClassVar[dict[str, str]] = DeepseekV3ForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["GlmMoeDsaDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: GlmMoeDsaConfig):
        super().__init__(config, MixtralModel(config, GlmMoeDsaDecoderLayer))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        rules = type(self).checkpoint_rules.rules
        self.checkpoint_rules = CheckpointRules([mla if isinstance(r, GGUFMla) else r for r in rules])
        full = None
        for layer in self.model.layers:
            attn = layer.self_attn
            if attn.indexer is None:
                attn.source.append(full)
            else:
                full = attn
