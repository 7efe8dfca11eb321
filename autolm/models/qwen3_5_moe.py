"""Qwen 3.5 MoE's text model (model_type qwen3_5_moe_text; qwen3_5_moe: the image-text checkpoints' language model):
Qwen 3.5's hybrid layers (autolm.models.qwen3_5: gated attention, Gated DeltaNet with separate projections) with
Qwen3-Next's mixture in every layer: `num_experts` gated MLPs (`moe_intermediate_size`), softmax routing with the
top `num_experts_per_tok` always renormalised, and a shared expert (`shared_expert_intermediate_size`) gated by
sigmoid(shared_expert_gate(x)). No dense layers (the config has no intermediate_size, decoder_sparse_step or
mlp_only_layers).

Checkpoints keep one tensor per expert (stacked in the model, as Qwen 2 MoE's); the image-text ones keep the
language model under model.language_model.* (the vision tower and the multi-token-prediction layers are skipped).
GGUF: llama.cpp's "qwen35moe" (Qwen 3.5's conversion, autolm.models.qwen3_next_gguf, and Qwen 2 MoE's experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config_fields import positive_ints
from ..nn import CheckpointRules, GGUFLayout
from . import qwen3_next_gguf
from .base import CausalLM
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .llama import LlamaConfig
from .mixtral import GGUF_EXPERTS, validate_experts
from .qwen2_moe import GGUF_EXPERT_KEYS, QWEN_MOE_RULES, QWEN_MOE_TP
from .qwen3_5 import Qwen3_5DecoderLayer
from .qwen3_next import HybridConfig, HybridModel, moe_or_mlp


@dataclass(repr=False)
class Qwen3_5MoeTextConfig(HybridConfig, LlamaConfig):
    """transformers' Qwen3_5MoeTextConfig (its fields and defaults)."""

    model_type: ClassVar[str] = "qwen3_5_moe_text"
    absent_keys: ClassVar[tuple[str, ...]] = ("intermediate_size", "mlp_bias", "sliding_window",
                                              "use_sliding_window", "max_window_layers")  # fmt: skip
    bool_fields: ClassVar[tuple[str, ...]] = (*LlamaConfig.bool_fields, "output_router_logits")
    vocab_size: int = 248320
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    head_dim: int | None = 256
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 8
    num_experts: int = 256
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        self.hybrid_post_init()
        super().__post_init__()

    qk_norm = property(lambda self: True)
    norm_topk_prob = property(lambda self: True)  # the top k always renormalised

    def sparse(self, i: int) -> bool:
        return True  # every layer a mixture

    def validate(self) -> None:
        super().validate()
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        positive_ints(self, ("moe_intermediate_size", "shared_expert_intermediate_size"))


class Qwen3_5MoeConfig(ImageTextConfig):
    """transformers' Qwen3_5MoeConfig (model_type qwen3_5_moe: the image-text checkpoints): their language model's
    text_config, read as Qwen3_5Config reads it."""

    model_type: ClassVar[str] = "qwen3_5_moe"
    text_class: ClassVar[type] = Qwen3_5MoeTextConfig


class Qwen3_5MoeDecoderLayer(Qwen3_5DecoderLayer):
    """Gated attention or Gated DeltaNet, then experts with a gated shared expert."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return moe_or_mlp(config, layer_idx)


class Qwen3_5MoeForCausalLM(CausalLM):
    """transformers' Qwen3_5MoeForCausalLM (the text model; model_type qwen3_5_moe_text, or qwen3_5_moe's)."""

    config_class = Qwen3_5MoeTextConfig
    checkpoint_rules = CheckpointRules([*IMAGE_TEXT_RULES, *QWEN_MOE_RULES.rules])
    # the attention and experts split as Qwen 2 MoE's; the linear-attention mixers run whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = QWEN_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["Qwen3_5MoeDecoderLayer"]
    recurrent: ClassVar[bool] = True
    # llama.cpp reads no attention biases (nor key and value heads of other sizes: qwen3_next_gguf.write_config)
    gguf = GGUFLayout(
        "qwen35moe",
        config=(
            *GGUF_EXPERT_KEYS,
            ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
            *qwen3_next_gguf.GGUF_LINEAR_KEYS,
        ),
        layer=(
            *GGUF_EXPERTS,
            ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
            ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
            ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
            ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
            *qwen3_next_gguf.GGUF_LINEAR_35,
        ),
        fixed=(("attention_bias", False),),
        norm_shift=1.0,
        derive=qwen3_next_gguf.derive_35,
        write_config=qwen3_next_gguf.write_config_35,
        bare=("ssm_a",),
    )

    def __init__(self, config: Any):
        super().__init__(config, HybridModel(config, Qwen3_5MoeDecoderLayer))
        # llama.cpp's linear-layer tensors: a rule that knows the value heads
        self.checkpoint_rules = CheckpointRules(
            [*type(self).checkpoint_rules.rules, qwen3_next_gguf.Qwen35GGUF(config)]
        )
