"""Aria's language model (rhymes-ai/Aria, `aria_text`): Llama's attention with a mixture of experts in every layer.
The router takes the top `moe_topk` of its `moe_num_experts` logits and the softmax over those k (no bias); the
routed experts are SiLU-gated whatever `hidden_act` says, and shared experts, one gated MLP
`moe_num_shared_experts` times `intermediate_size` wide (with `hidden_act` and `mlp_bias`), see every token and
are added to the experts' output.

transformers 5 holds the experts stacked and stored (in, out): `mlp.experts.gate_up_proj` (E, h, 2I; [gate | up]
along the last axis) and `mlp.experts.down_proj` (E, I, h), the model's names; checkpoints on the Hub and
transformers' save_pretrained name them `mlp.experts.fc1.weight` and `mlp.experts.fc2.weight`, in the same layout.
llama.cpp has no Aria architecture. The image-text `aria` checkpoint (AriaForConditionalGeneration) loads as its
language model (autolm.models.image_text): the head tied by the outer config (untied by default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import ACTIVATIONS, CheckpointRules, Experts, GatedMLP, Rename, Router, SparseMoeBlock
from .base import CausalLM
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .llama import LlamaConfig
from .mixtral import MOE_TP, MixtralDecoderLayer, MixtralModel, validate_experts


@dataclass(repr=False)
class AriaTextConfig(LlamaConfig):
    """transformers' AriaTextConfig: Llama's fields (pretraining_tp and initializer_range kept as config.json gives
    them) plus the experts'; `intermediate_size` is each routed expert's."""

    model_type: ClassVar[str] = "aria_text"
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)  # the shared experts'
    intermediate_size: int = 4096
    pad_token_id: int | None = 2
    moe_num_experts: int = 8
    moe_topk: int = 2
    moe_num_shared_experts: int = 2

    @property
    def num_experts(self) -> int:
        return self.moe_num_experts

    @property
    def num_experts_per_tok(self) -> int:
        return self.moe_topk

    def validate(self) -> None:
        super().validate()
        if not _is_int(self.moe_num_experts) or self.moe_num_experts < 1:
            raise ConfigError(f"{self.source}: moe_num_experts must be a positive integer, found "
                              f"{self.moe_num_experts!r}")  # fmt: skip
        try:
            validate_experts(self, self.moe_num_experts, self.moe_topk)
        except ConfigError as e:  # the message in config.json's name
            raise ConfigError(str(e).replace("num_experts_per_tok", "moe_topk")) from None
        if not _is_int(self.moe_num_shared_experts) or self.moe_num_shared_experts < 0:
            raise ConfigError(f"{self.source}: moe_num_shared_experts must be a non-negative integer, found "
                              f"{self.moe_num_shared_experts!r}")  # fmt: skip


class AriaConfig(ImageTextConfig):
    """transformers' AriaConfig (Aria, image-text): its language model's, an AriaText; tied by the outer config."""

    model_type: ClassVar[str] = "aria"
    text_class: ClassVar[type] = AriaTextConfig
    tie_default: ClassVar[bool | None] = False


class AriaTextDecoderLayer(MixtralDecoderLayer):
    """Llama's attention, then the mixture (`mlp`: router, experts, shared_experts)."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, n = config.hidden_size, config.moe_num_experts
        router = Router(h, n, config.moe_topk, order="topk_softmax")
        experts = Experts(
            n, h, config.intermediate_size, "silu", transposed=True
        )  # always SiLU, as transformers'
        width = (
            config.intermediate_size * config.moe_num_shared_experts
        )  # 0: zero wide, as transformers' (adds 0)
        shared = GatedMLP(h, width, config.hidden_act, bias=config.mlp_bias)
        return SparseMoeBlock(router, experts, router_name="router", shared_experts=shared)


def _renamed(checkpoint: str, model: str) -> Rename:
    """An experts' tensor under the checkpoint's name and the model's, both ways (whole names only)."""
    checkpoint, model = f".mlp.experts.{checkpoint}", f".mlp.experts.{model}"
    return Rename(re.escape(checkpoint) + "$", model, re.escape(model) + "$", checkpoint)


class AriaTextForCausalLM(CausalLM):
    """transformers' AriaTextForCausalLM."""

    config_class = AriaTextConfig
    checkpoint_rules = CheckpointRules(
        [*IMAGE_TEXT_RULES, _renamed("fc1.weight", "gate_up_proj"), _renamed("fc2.weight", "down_proj")]
    )
    # transformers' plan: attention and the shared experts split as Llama's; the experts cut their own
    # intermediate rows (nn.Experts.shard)
    tp_patterns: ClassVar[dict[str, str]] = {
        **MOE_TP,
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["AriaTextDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, MixtralModel(config, AriaTextDecoderLayer))
