"""A.X-K1 (SK Telecom): DeepSeek-V3's architecture (models.deepseek_v3: Multi-head Latent Attention, always with the
low-rank query; the grouped sigmoid-routed experts with shared experts) in GLM-4.7-Flash's layers (models.
glm4_moe_lite: which layers are dense is `mlp_layer_types`), with one change: the mixture's output (routed plus
shared experts) passes through its own RMSNorm, `mlp.post_mlp_layernorm`, before the residual.

config.json may give no mlp_layer_types but DeepSeek's `first_k_dense_replace` (1 where absent) and `moe_layer_freq`
(1 where absent): layer i is then sparse where i >= first_k_dense_replace and i % moe_layer_freq == 0, as
transformers derives them (it keeps neither key; autolm keeps them where given, for the round trip).

The released checkpoints store the norm at the layer's level (`model.layers.N.post_mlp_layernorm.weight`, which
transformers renames into the block while loading and back while saving, as here), also for the dense layers, which
do not use it (skipped while loading), and route without a correction bias: a checkpoint without
`mlp.gate.e_score_correction_bias` loads with zeros, as in transformers. llama.cpp has no A.X-K1 architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, Ignored, Rename, RMSNorm, SparseMoeBlock
from .base import CausalLM
from .deepseek_v3 import DeepseekV3ForCausalLM
from .glm4_moe_lite import Glm4MoeLiteConfig, Glm4MoeLiteDecoderLayer
from .mixtral import MixtralModel
from .qwen2_moe import QWEN_MOE_RULES


@dataclass(repr=False)
class AXK1Config(Glm4MoeLiteConfig):
    """transformers' AXK1Config: DeepSeek-V3's fields and A.X-K1's sizes, mlp_layer_types (derived where absent, see
    the module docstring); head_dim (qk_rope_head_dim) written as transformers writes it."""

    model_type: ClassVar[str] = "axk1"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window", "first_k_dense_replace")

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 64
    n_routed_experts: int = 192
    routed_scaling_factor: float = 2.5
    q_lora_rank: int | None = 1536
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1  # the legacy key's default in transformers' derivation
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 163691
    eos_token_id: int | list[int] | None = 163691

    def __post_init__(self) -> None:
        n, first, freq = (
            self.num_hidden_layers,
            self.first_k_dense_replace,
            self.extra.get("moe_layer_freq", 1),
        )
        if self.mlp_layer_types is None and _is_int(n) and _is_int(first) and _is_int(freq) and freq > 0:
            self.mlp_layer_types = ["sparse" if i >= first and i % freq == 0 else "dense" for i in range(n)]
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["head_dim"] = self.head_dim  # transformers' AXK1Config writes it (GLM-4.7-Flash's does not)
        return out

    def validate(self) -> None:
        freq = self.extra.get("moe_layer_freq", 1)
        if not _is_int(freq) or freq < 1:
            raise ConfigError(f"{self.source}: moe_layer_freq must be a positive integer, found {freq!r}")
        if self.q_lora_rank is None:
            raise ConfigError(f"{self.source}: q_lora_rank must be a positive integer (A.X-K1 always projects the "
                              "query through its low rank), found null")  # fmt: skip
        super().validate()


class AXK1MoE(SparseMoeBlock):
    """DeepSeek-V3's mixture (router `gate`, stacked experts, `shared_experts`) with `post_mlp_layernorm` on its
    output."""

    def __init__(self, block: SparseMoeBlock, norm: nn.Module):
        super().__init__(block.gate, block.experts, shared_experts=block.shared_experts)
        self.post_mlp_layernorm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_mlp_layernorm(super().forward(x))


class AXK1DecoderLayer(Glm4MoeLiteDecoderLayer):
    """Pre-norm MLA, then a pre-norm dense MLP or the normed mixture, as mlp_layer_types says."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        mlp = super().make_mlp(config, layer_idx)
        if not isinstance(mlp, SparseMoeBlock):
            return mlp
        return AXK1MoE(mlp, RMSNorm(config.hidden_size, config.rms_norm_eps))


class AXK1ForCausalLM(CausalLM):
    """transformers' AXK1ForCausalLM."""

    config_class = AXK1Config
    # per-expert tensors stacked; the layer-level post_mlp_layernorm in the block (transformers' conversion mapping,
    # which save_pretrained reverses)
    checkpoint_rules = CheckpointRules(
        [
            *QWEN_MOE_RULES.rules,
            Rename(
                r"(layers\.\d+)\.post_mlp_layernorm\.",
                r"\1.mlp.post_mlp_layernorm.",
                r"\.mlp\.post_mlp_layernorm\.",
                ".post_mlp_layernorm.",
            ),
        ]
    )
    # transformers' plan, as DeepSeek-V3's (the norm after the mixture stays whole on every rank)
    tp_patterns: ClassVar[dict[str, str]] = DeepseekV3ForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["AXK1DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: AXK1Config):
        super().__init__(config, MixtralModel(config, AXK1DecoderLayer))
        types = config.mlp_layer_types[: config.num_hidden_layers]
        dense = "|".join(str(i) for i, t in enumerate(types) if t == "dense")
        if dense:  # the released files' norms of the dense layers, which transformers skips too
            rules = [
                *self.checkpoint_rules.rules,
                Ignored(rf"model\.layers\.({dense})\.mlp\.post_mlp_layernorm\..+"),
            ]
            self.checkpoint_rules = CheckpointRules(rules)

    @property
    def new_if_missing(self) -> tuple[str, ...]:
        """The routers' correction biases, which the released checkpoints do not hold."""
        return tuple(f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i, layer in enumerate(self.model.layers)
                     if isinstance(layer.mlp, AXK1MoE))  # fmt: skip

    def init_new(self, names: list[str]) -> str:
        """Zero correction biases where the checkpoint has none: routing by the plain sigmoid scores."""
        for name in names:
            router = self.get_submodule(name.rpartition(".")[0])
            device = router.weight.device if router.weight.device.type != "meta" else torch.device("cpu")
            router.e_score_correction_bias = torch.zeros(
                router.num_experts, dtype=torch.float32, device=device
            )
        return f"zero e_score_correction_bias in {len(names)} layers (the checkpoint has none)"
