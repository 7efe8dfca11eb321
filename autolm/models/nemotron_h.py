"""Nemotron-H (NVIDIA's Nemotron-H 4B/8B/47B/56B, Nemotron Nano 2 9B/12B v2 and Nemotron 3 Nano/Super, the MoE ones):
a stack of single-purpose blocks, each one `norm` (RMSNorm, the weight applied in fp32) and one `mixer`, added to
the residual stream:

- "linear_attention" ("M" in `hybrid_override_pattern`): autolm.nn.mamba2's Mamba2Mixer; its in/out projections
  have biases where `use_bias` (not `mamba_proj_bias`, which transformers reads nowhere), its dt is clamped below
  at `time_step_min` (time_step_limit is not read: transformers' lower limit);
- "full_attention" ("*"): grouped-query attention without positions (no RoPE: the Mamba layers carry position)
  and without biases (attention_bias is not read, as in transformers), scaled by head_dim ** -0.5;
- "mlp" ("-"): up_proj -> squared ReLU (`mlp_hidden_act`) -> down_proj, with biases where `mlp_bias`;
- "moe" ("E", Nemotron 3): DeepSeek V3's sigmoid routing (`gate`, with the `e_score_correction_bias` buffer,
  n_group / topk_group, routed_scaling_factor) over non-gated squared-ReLU experts (`experts.up_proj` (E, I, d),
  `experts.down_proj` (E, d, I)), d the hidden size or, where `moe_latent_size` is set (Nemotron 3 Super),
  that width between `fc1_latent_proj` and `fc2_latent_proj`; plus one ungated shared MLP (`shared_experts`).

The body's names are transformers' (`embeddings`, `layers`, `norm_f`); checkpoints say `backbone.` for `model.` and
keep one tensor per expert (`mixer.experts.<e>.up_proj.weight`). Multi-token-prediction weights (`mtp.*`) are
skipped, as transformers skips them. config.json lists the blocks as `layers_block_type` (transformers 5) or, in
the released checkpoints, as the `hybrid_override_pattern` string (with num_hidden_layers); both read, kept as
written. GGUF in and out as llama.cpp's converter writes them: the dense layout as "nemotron_h"
(models.nemotron_h_gguf), a model with MoE blocks as "nemotron_h_moe" (models.nemotron_h_moe_gguf).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import config_json_names, positive_ints
from ..errors import ConfigError
from ..nn import (
    ACTIVATIONS,
    MLP,
    Attention,
    CheckpointRules,
    Experts,
    GroupedRouter,
    Ignored,
    Linear,
    Rename,
    RMSNorm,
    SparseMoeBlock,
    Stacked,
)
from ..nn.mamba2 import Mamba2Mixer
from .base import CausalLM, DecoderModel
from .image_text import IMAGE_TEXT_RULES
from .mixtral import validate_experts
from .nemotron_h_gguf import LAYOUT, NOT_COMPARED, MixerGGUF, compared
from .nemotron_h_moe_gguf import GGUF_RULES, MOE_LAYOUT

MAMBA, ATTENTION, MLP_BLOCK, MOE = "linear_attention", "full_attention", "mlp", "moe"
PATTERN = {"M": MAMBA, "*": ATTENTION, "-": MLP_BLOCK, "E": MOE}  # hybrid_override_pattern's letters
KINDS = {**{k: k for k in (MAMBA, ATTENTION, MLP_BLOCK, MOE)}, "mamba": MAMBA, "attention": ATTENTION}
DEFAULT_BLOCKS = (MAMBA, MOE, ATTENTION, MLP_BLOCK)  # transformers' default layers_block_type
# older spellings transformers reads as the new names (Nemotron-H's first configs)
LEGACY = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
          "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max", "mamba_dt_limit": "time_step_limit",
          "mamba_dt_init_floor": "time_step_floor", "mamba_conv_bias": "use_conv_bias",
          "mamba_chunk_size": "chunk_size"}  # fmt: skip


def pattern_blocks(pattern: Any, source: str) -> list[str]:
    """hybrid_override_pattern ("M-M*-E...") -> the block types."""
    if not isinstance(pattern, str) or not pattern or set(pattern) - set(PATTERN):
        raise ConfigError(f"{source}: hybrid_override_pattern must be a string of the letters M, *, - and E, "
                          f"found {str(pattern)[:200]!r}")  # fmt: skip
    return [PATTERN[c] for c in pattern]


@dataclass(repr=False)
class NemotronHConfig(PretrainedConfig):
    """transformers' NemotronHConfig: its fields and defaults (Nemotron 3 Nano's names); config.json's
    layers_block_type, layer_norm_epsilon and mlp_hidden_act are autolm's layer_types, rms_norm_eps and hidden_act.
    num_hidden_layers is the number of blocks listed (written back only where config.json gave it)."""

    model_type: ClassVar[str] = "nemotron_h"
    attribute_map: ClassVar[dict[str, str]] = {
        "layer_types": "layers_block_type",
        "rms_norm_eps": "layer_norm_epsilon",
        "hidden_act": "mlp_hidden_act",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    gguf_not_compared: ClassVar[tuple[str, ...]] = NOT_COMPARED  # GGUF out (models.nemotron_h_gguf)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "mlp_bias",
        "use_bias",
        "use_conv_bias",
        "norm_topk_prob",
    )

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 21504
    num_hidden_layers: int | None = None
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    hidden_act: str = "relu2"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    attention_bias: bool = False
    mlp_bias: bool = False
    use_bias: bool = False
    ssm_state_size: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    time_step_min: float = 0.001
    use_conv_bias: bool = True
    n_routed_experts: int = 8
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    num_experts_per_tok: int = 2
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        for old, new in LEGACY.items():
            if old in self.extra:
                value = self.extra.pop(old)
                if new in self.__dataclass_fields__:
                    setattr(self, new, value)
                else:
                    self.extra[new] = value
        self._layers_given = self.num_hidden_layers is not None
        if self.layer_types is None:
            pattern = self.extra.get("hybrid_override_pattern")
            self.layer_types = (
                list(DEFAULT_BLOCKS) if pattern is None else pattern_blocks(pattern, self.source)
            )
        if isinstance(self.layer_types, list):
            self.num_hidden_layers = len(
                self.layer_types
            )  # the blocks listed, whatever num_hidden_layers says
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = self.attribute_map
            raise ConfigError(re.sub(rf"\b({'|'.join(names)})\b", lambda m: names[m[1]], str(e))) from None

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """No RoPE; a rope_theta some configs carry (Nemotron 3) is kept as written, nothing else is written."""
        rope, _ = super().read_rope(d, source)
        return rope, "v4" if "rope_theta" in d else "none"

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # no positions in the attention

    def block_type(self, i: int) -> str:
        """Layer i's kind: "linear_attention" (Mamba-2), "full_attention", "mlp" or "moe"."""
        return KINDS[self.layer_types[i]]

    def gguf_compared(self) -> dict[str, Any]:
        return compared(self)  # the block kinds, the MLP / MoE blocks' fields where it has such blocks

    def validate(self) -> None:
        types, self.layer_types = self.layer_types, None  # the base check knows only attention layer types
        try:
            super().validate()
        finally:
            self.layer_types = types
        src = self.source
        if self.tie_word_embeddings:
            raise ConfigError(f"{src}: tie_word_embeddings true is not supported: transformers' NemotronH never ties "
                              "its lm_head to the embeddings (it keeps a separate lm_head); expected false")  # fmt: skip
        if (
            not isinstance(types, list)
            or not types
            or not all(isinstance(t, str) and t in KINDS for t in types)
        ):
            raise ConfigError(f"{src}: layers_block_type must list the blocks, each one of {sorted(KINDS)}, "
                              f"found {str(types)[:200]}")  # fmt: skip
        kinds = {KINDS[t] for t in types}
        if MAMBA in kinds:
            self.validate_mamba()
        if MOE in kinds:
            self.validate_moe()

    def validate_mamba(self) -> None:
        src = self.source
        positive_ints(self, ( "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                             "chunk_size", ), 1 << 16)  # fmt: skip
        if self.mamba_num_heads % self.n_groups:
            raise ConfigError(f"{src}: n_groups ({self.n_groups}) must divide mamba_num_heads "
                              f"({self.mamba_num_heads})")  # fmt: skip
        if self.mamba_hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{src}: mamba_hidden_act {self.mamba_hidden_act!r} is not supported (expected one "
                              f"of {tuple(ACTIVATIONS)})")  # fmt: skip
        if not _is_number(self.time_step_min) or not 0 <= self.time_step_min < math.inf:
            raise ConfigError(
                f"{src}: time_step_min must be a non-negative number, found {self.time_step_min!r}"
            )

    def validate_moe(self) -> None:
        src = self.source
        validate_experts(self, self.n_routed_experts, self.num_experts_per_tok)
        positive_ints(self, ("moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_group", "topk_group"), 1
                             << 19)  # fmt: skip
        latent = self.moe_latent_size
        if latent is not None and (not _is_int(latent) or not 0 < latent <= 1 << 17):
            raise ConfigError(f"{src}: moe_latent_size must be a positive integer or null, found {latent!r}")
        if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
            raise ConfigError(f"{src}: n_group ({self.n_group}) must divide n_routed_experts "
                              f"({self.n_routed_experts}) and be at least topk_group ({self.topk_group})")  # fmt: skip
        if not _is_number(self.routed_scaling_factor):
            raise ConfigError(
                f"{src}: routed_scaling_factor must be a number, found {self.routed_scaling_factor!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        pattern = self.extra.get("hybrid_override_pattern")
        if (
            isinstance(pattern, str)
            and set(pattern) <= set(PATTERN)
            and self.layer_types == [PATTERN[c] for c in pattern]
        ):
            out.pop("layers_block_type")  # read from the pattern: written as the pattern alone
        if not self._layers_given:
            out.pop("num_hidden_layers")
        for key in ("rope_parameters", "rope_scaling") + (
            () if self.rope_spelling == "v4" else ("rope_theta",)
        ):
            out.pop(key, None)
        return out


# config.layers_block_type is config.layer_types (and so on), as in transformers
config_json_names(NemotronHConfig)


class NemotronHExperts(Experts):
    """`num_experts` non-gated MLPs stacked: up_proj (E, I, d), down_proj (E, d, I); down(act(up(x)))."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str):
        nn.Module.__init__(self)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden, intermediate
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.transposed, self.interleaved, self.limit, self.alpha = False, False, None, None
        self.act_fn = ACTIVATIONS[act]
        self.tp = None

    def expert(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        return self.project("down_proj", self.act_fn(self.project("up_proj", x, e)), e)

    def tp_layout(self) -> dict[str, tuple[int, int]]:
        return {"up_proj": (1, 1), "down_proj": (2, 1)}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        if self.tp is None or self.up_proj.device.type == "meta":
            return
        for name, (dim, _) in self.tp_layout().items():  # whole tensors, as one process holds them
            local = destination[prefix + name].detach()
            shards = [torch.empty_like(local) for _ in range(self.tp[1])]
            torch.distributed.all_gather(shards, local)
            destination[prefix + name] = torch.cat(shards, dim)


class NemotronHMoE(SparseMoeBlock):
    """Sigmoid-routed non-gated experts (through the latent projections where moe_latent_size is set) plus the
    shared MLP over the block's input."""

    def __init__(self, config: Any):
        c, h = config, config.hidden_size
        router = GroupedRouter(h, c.n_routed_experts, c.num_experts_per_tok, n_group=c.n_group,
                               topk_group=c.topk_group, normalize=c.norm_topk_prob,
                               scaling=float(c.routed_scaling_factor))  # fmt: skip
        experts = NemotronHExperts(
            c.n_routed_experts, c.moe_latent_size or h, c.moe_intermediate_size, c.hidden_act
        )
        shared = MLP(h, c.moe_shared_expert_intermediate_size, c.hidden_act, bias=c.mlp_bias)
        super().__init__(router, experts, shared_experts=shared)
        if c.moe_latent_size is not None:
            self.fc1_latent_proj = Linear(h, c.moe_latent_size, bias=c.mlp_bias)
            self.fc2_latent_proj = Linear(c.moe_latent_size, h, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "fc1_latent_proj"):
            return super().forward(x)
        B, T, h = x.shape
        flat = x.reshape(-1, h)
        ids, weights = self.gate(flat)
        y = self.fc2_latent_proj(self.experts(self.fc1_latent_proj(flat), ids, weights))
        return (y + self.shared_experts(flat)).view(B, T, h)


class NemotronHBlock(nn.Module):
    """x + mixer(norm(x)), the mixer of the layer's block type."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        c, h = config, config.hidden_size
        self.norm = RMSNorm(h, c.rms_norm_eps, weight_in_fp32=True)
        self.block_type = c.block_type(layer_idx)
        if self.block_type == MAMBA:
            self.mixer = Mamba2Mixer(h, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups,
                                     c.conv_kernel, c.chunk_size, layer_idx, eps=c.rms_norm_eps,
                                     conv_bias=c.use_conv_bias, proj_bias=c.use_bias,
                                     time_step_limit=(float(c.time_step_min), math.inf), act=c.mamba_hidden_act)  # fmt: skip
        elif self.block_type == ATTENTION:
            self.mixer = Attention(
                h, c.num_attention_heads, c.num_key_value_heads, c.head_dim, layer_idx, rope=None
            )
        elif self.block_type == MOE:
            self.mixer = NemotronHMoE(c)
        else:
            self.mixer = MLP(h, c.intermediate_size, c.hidden_act, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        y = self.norm(x)
        return x + (self.mixer(y, ctx) if self.block_type in (MAMBA, ATTENTION) else self.mixer(y))


class NemotronHModel(DecoderModel):
    """embeddings, layers, norm_f; `embed_tokens` and `norm` name embeddings and norm_f (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "embeddings", "norm": "norm_f"}

    def __init__(self, config: NemotronHConfig):
        super().__init__(
            config, NemotronHBlock, RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        )


class NemotronHForCausalLM(CausalLM):
    """transformers' NemotronHForCausalLM."""

    config_class = NemotronHConfig
    recurrent: ClassVar[bool] = True  # the Mamba-2 layers' states: the general forward decodes
    embeddings_name = "model.embeddings"
    checkpoint_rules = CheckpointRules(
        [
            Rename(r"^language_model\.", "", r"(?!)", ""),  # Nemotron H Omni's (image-text) language model
            *IMAGE_TEXT_RULES,
            Rename(r"^backbone\.", "model.", r"^model\.", "backbone."),
            Stacked("up_proj", ("up_proj.weight",)),
            Stacked("down_proj", ("down_proj.weight",)),
            Ignored(r"mtp\..*"),  # the multi-token-prediction layers, unused (as in transformers)
            *GGUF_RULES,  # llama.cpp's exp_probs_b.bias and stacked experts (models.nemotron_h_moe_gguf)
            MixerGGUF(),
        ]
    )
    # llama.cpp's NemotronHModel converter: the dense layout (models.nemotron_h_gguf) and, an instance's gguf where
    # the model has MoE blocks, "nemotron_h_moe" (models.nemotron_h_moe_gguf)
    gguf, gguf_more = LAYOUT, (MOE_LAYOUT,)
    # attention and the dense MLP blocks split as Llama's, the experts cut their own intermediate rows; the Mamba-2
    # mixers and the shared experts are replicated on every rank
    tp_patterns: ClassVar[dict[str, str]] = {
        "layers.*.mixer.q_proj": "colwise",
        "layers.*.mixer.k_proj": "colwise",
        "layers.*.mixer.v_proj": "colwise",
        "layers.*.mixer.o_proj": "rowwise",
        "layers.*.mixer.up_proj": "colwise",
        "layers.*.mixer.down_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["NemotronHBlock"]

    def __init__(self, config: Any):
        super().__init__(config, NemotronHModel(config))
        self.checkpoint_rules = CheckpointRules(
            [*self.checkpoint_rules.rules[:-1], MixerGGUF(config.n_groups)]
        )
        if MOE in (config.block_type(i) for i in range(config.num_hidden_layers)):
            self.gguf = MOE_LAYOUT
