"""Bamba (IBM's Bamba-9B v1 / v2 and their instruct versions): decoder layers that are Mamba-2 mixers or attention
layers (the attention ones listed by `attn_layer_indices`), each followed by a SiLU-gated MLP:

    x = x + mixer(input_layernorm(x))                 the mixer: `mamba` or `self_attn`
    x = x + feed_forward(pre_ff_layernorm(x))

- The mixer is autolm.nn.mamba2's Mamba2Mixer (module `mamba`, as Granite 4.0 hybrid's): `mamba_n_heads` heads of
  `mamba_d_head` channels (mamba_expand * hidden_size in all), B and C in `mamba_n_groups` groups, the gated norm at
  rms_norm_eps, chunks of `mamba_chunk_size`; its conv and state-space state live in the cache.
- Attention: grouped-query attention with RoPE over the first half of each head (transformers' BambaConfig fixes
  partial_rotary_factor at 0.5; a factor in rope_parameters is taken), rotate-half style; q/k/v/o biases where
  `attention_bias`. The MLP (`feed_forward`: gate_proj, up_proj, down_proj) has biases where `mlp_bias`.
- The final norm is `final_layernorm`; the head is untied by default. With labels, `z_loss_coefficient` > 0 adds
  that times the mean squared log-sum-exp of the logits to the loss, as transformers does.

GGUF: llama.cpp's converter writes Bamba as Granite 4.0's "granitehybrid" (its GraniteHybridModel): Llama's q/k
permutation, the Mamba-2 tensors and ssm.* sizes as Granite 4.0 hybrid's (models.granitemoehybrid_gguf), the layer
pattern as per-layer KV head counts (0 on Mamba-2 layers), `rope.scaling.finetuned` true (RoPE on), the rotary
dimensions as rope.dimension_count (what the released configs' `attn_rotary_emb` gives the converter), and none
of Granite's multipliers (their keys claim a "granitehybrid" file for Granite 4.0 hybrid). llama.cpp's graph runs
SiLU, a conv bias, no in/out projection biases, no clamp of the time steps and an expansion factor of 2: other
values are refused on GGUF out. Its RoPE rotates adjacent pairs after the converter's permutation of the whole
head, which over a partial RoPE pairs other dimensions than transformers' Bamba: such a file is written as the
converter writes it, with a warning (the converter's files read back as transformers' model).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..config import PartialRotaryConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, CheckpointRules, GatedMLP, GGUFLayout, RMSNorm
from ..nn.mamba2 import Mamba2Mixer
from .base import LLAMA_TP, CausalLM, DecoderModel
from .granitemoehybrid import GraniteMoeHybridConfig
from .granitemoehybrid_gguf import MambaGGUF
from .granitemoehybrid_gguf import write_config as hybrid_write_config
from .jamba import JambaDecoderLayer
from .mamba2 import NO_LIMIT

logger = logging.getLogger("autolm.gguf")


@dataclass(repr=False)
class BambaConfig(PartialRotaryConfig):
    """transformers' BambaConfig and its defaults; the layer kinds come from `attn_layer_indices` (transformers'
    layers_block_type, not written to config.json); mamba_d_head "auto" is written as the number, as transformers
    writes it."""

    model_type: ClassVar[str] = "bamba"
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)  # the mixers' and the MLP's
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "sliding_window")  # written when set
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PartialRotaryConfig.bool_fields,
        "mamba_conv_bias",
        "mamba_proj_bias",
        "attention_bias",
        "mlp_bias",
    )
    # GGUF out compares these its own way or not at all: the layer kinds through gguf_compared, the chunk size
    # changes only the scan's rounding, write_config refuses a clamp of the time steps, the rest is training's
    gguf_not_compared: ClassVar[tuple[str, ...]] = (
        "attn_layer_indices",
        "mamba_chunk_size",
        "time_step_limit",
        "z_loss_coefficient",
        "num_logits_to_keep",
    )

    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    rms_norm_eps: float = 1e-5
    num_logits_to_keep: int | None = 1
    pad_token_id: int | None = 0
    max_position_embeddings: int = 262144
    attn_layer_indices: list[int] | None = None
    mamba_n_heads: int = 128
    mamba_d_head: Any = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # as transformers 5 writes it: infinity tagged ({"__float__": "Infinity"}); read as written, kept as read
    time_step_limit: Any = field(default_factory=lambda: list(NO_LIMIT))
    z_loss_coefficient: float | None = 0.0
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        heads, expand = self.mamba_n_heads, self.mamba_expand
        if self.mamba_d_head == "auto" and all(map(_is_int, (expand, heads, self.hidden_size))) and heads > 0:
            self.mamba_d_head = expand * self.hidden_size // heads
        super().__post_init__()

    def is_mamba(self, i: int) -> bool:
        """Whether layer i is a Mamba-2 mixer (else attention)."""
        return not (self.attn_layer_indices and i in self.attn_layer_indices)

    step_limit = GraniteMoeHybridConfig.step_limit  # time_step_limit as two floats
    validate_mamba = GraniteMoeHybridConfig.validate_mamba  # the mamba_* sizes (same names and checks)

    def gguf_compared(self) -> dict[str, Any]:
        return {"Mamba-2 layers": [self.is_mamba(i) for i in range(self.num_hidden_layers)]}

    def validate(self) -> None:
        super().validate()
        src, indices = self.source, self.attn_layer_indices
        if indices is not None and not (isinstance(indices, list) and all(_is_int(i) for i in indices)):
            raise ConfigError(f"{src}: attn_layer_indices must be a list of layer indices or null, found "
                              f"{str(indices)[:200]}")  # fmt: skip
        self.validate_mamba()
        z = self.z_loss_coefficient
        if z is not None and not (_is_number(z) and z >= 0):
            raise ConfigError(f"{src}: z_loss_coefficient must be a non-negative number or null, found {z!r}")


class BambaDecoderLayer(nn.Module):
    """Pre-norm mixer (`mamba` or `self_attn`), then the pre-norm gated MLP (`feed_forward`)."""

    def __init__(self, config: BambaConfig, layer_idx: int):
        super().__init__()
        c, h = config, config.hidden_size
        self.feed_forward = GatedMLP(h, c.intermediate_size, c.hidden_act, bias=c.mlp_bias)
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(h, c.rms_norm_eps)
        if c.is_mamba(layer_idx):
            self.mamba = Mamba2Mixer(h, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups,
                                     c.mamba_d_conv, c.mamba_chunk_size, layer_idx, eps=c.rms_norm_eps,
                                     conv_bias=c.mamba_conv_bias, proj_bias=c.mamba_proj_bias,
                                     time_step_limit=c.step_limit(), act=c.hidden_act)  # fmt: skip
        else:
            self.self_attn = Attention(h, c.num_attention_heads, c.num_key_value_heads, c.head_dim, layer_idx,
                                       bias=c.attention_bias)  # fmt: skip

    forward = (
        JambaDecoderLayer.forward
    )  # x + mixer(input_layernorm(x)), then x + feed_forward(pre_ff_layernorm(x))


class BambaModel(DecoderModel):
    """embed_tokens, layers, final_layernorm; `norm` names final_layernorm (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "final_layernorm"}

    def __init__(self, config: BambaConfig):
        super().__init__(config, BambaDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


# ---- GGUF: llama.cpp's GraniteHybridModel converter on a BambaForCausalLM checkpoint --------------------------------


def gguf_derive(d: dict[str, Any], get) -> None:
    """The attention layers from the per-layer KV head counts (0 on Mamba-2 layers); the head size from
    attention.key_length, else hidden / heads (the converter writes no head_dim for a Granite-converted model),
    rope.dimension_count (the rotary dimensions) as the partial_rotary_factor giving them; the Mamba-2 width and head
    size from ssm.inner_size."""
    kv, heads, hidden = d.get("num_key_value_heads"), d.get("num_attention_heads"), d.get("hidden_size")
    if isinstance(kv, list):
        d["attn_layer_indices"] = [i for i, k in enumerate(kv) if k]
        d["num_key_value_heads"] = max(kv) or heads
    rotary = d.pop("head_dim", None)
    if not (_is_int(heads) and heads > 0 and _is_int(hidden) and hidden > 0):
        return  # the config's validation names the key
    head_dim = get("attention.key_length") or hidden // heads
    if head_dim != hidden // heads:
        d["head_dim"] = head_dim
    if _is_int(rotary) and _is_int(head_dim) and 0 < rotary <= head_dim:
        factor = rotary / head_dim
        while (
            int(head_dim * factor) < rotary
        ):  # transformers' int(head_dim * factor) gives the rotary dimensions
            factor = math.nextafter(factor, 2.0)
        d["rope_parameters"]["partial_rotary_factor"] = factor
    inner, mamba_heads = get("ssm.inner_size"), d.get("mamba_n_heads")
    if _is_int(inner) and _is_int(mamba_heads) and mamba_heads > 0:
        d["mamba_expand"], d["mamba_d_head"] = inner // hidden, inner // mamba_heads


def gguf_write_config(out: dict[str, Any], c: BambaConfig) -> None:
    """gguf_derive's inverse, as GraniteHybridModel.set_gguf_parameters writes a Bamba checkpoint: Granite 4.0
    hybrid's keys (the ssm.* width, the per-layer KV head counts; a clamp of the time steps refused), RoPE on with
    the context length as config.json's, the rotary dimensions (the converter takes them from attn_rotary_emb, as
    the released configs give it; without it, it writes the head size, which is not the model's RoPE)."""
    if c.mamba_expand != 2:
        raise ConfigError(f"llama.cpp's 'granitehybrid' format cannot hold this 'bamba' model: its graph runs an "
                          f"expansion factor of 2 only (mamba_expand {c.mamba_expand!r})")  # fmt: skip
    hybrid_write_config(out, c)
    out["rope.scaling.finetuned"] = True  # the converter's switch for RoPE: on for BambaForCausalLM
    out["context_length"] = c.max_position_embeddings
    rotary = out["rope.dimension_count"] = int(c.head_dim * c.rope_parameters["partial_rotary_factor"])
    if rotary < c.head_dim:
        logger.warning(
            "llama.cpp's 'granitehybrid' graph rotates adjacent pairs of the first %d dimensions of each head, "
            "its converter's q/k permutation interleaves the whole head: llama.cpp's RoPE pairs other dimensions "
            "than this 'bamba' model's partial RoPE (written as the converter writes it; llama.cpp's attention "
            "layers compute otherwise than transformers' and autolm's)",
            rotary,
        )


_MAMBA_NAMES = (
    ("ssm_in", "mamba.in_proj"),
    ("ssm_out", "mamba.out_proj"),
    # MambaGGUF's pieces
    *((stem, f"mamba.{stem}") for stem in ("ssm_conv1d", "ssm_dt", "ssm_a", "ssm_d", "ssm_norm")),
)
GGUF = GGUFLayout(
    "granitehybrid",
    permute_qk=True,
    config=(
        ("ssm.conv_kernel", "mamba_d_conv"),
        ("ssm.state_size", "mamba_d_state"),
        ("ssm.group_count", "mamba_n_groups"),
        ("ssm.time_step_rank", "mamba_n_heads"),
    ),
    layer=(
        *_MAMBA_NAMES,
        ("ffn_norm", "pre_ff_layernorm"),
        ("ffn_gate", "feed_forward.gate_proj"),
        ("ffn_up", "feed_forward.up_proj"),
        ("ffn_down", "feed_forward.down_proj"),
    ),
    top=(("output_norm", "model.final_layernorm"),),
    # what llama.cpp's graph does not read: SiLU, the conv bias, no in_proj/out_proj bias, no clamp of the time steps
    fixed=(
        ("hidden_act", "silu"),
        ("mamba_conv_bias", True),
        ("mamba_proj_bias", False),
        ("time_step_limit", NO_LIMIT),
    ),
    # biases read off the tensors: any attention layer's q bias, the first layer's MLP bias
    present=(
        *((f"blk.{i}.attn_q.bias", "attention_bias") for i in range(256)),
        ("blk.0.ffn_gate.bias", "mlp_bias"),
    ),
    derive=gguf_derive,
    write_config=gguf_write_config,
    bare=("ssm_a", "ssm_d"),
    # no claim: a "granitehybrid" file without Granite's multipliers (which claim Granite 4.0 hybrid's) is Bamba's
)


class BambaForCausalLM(CausalLM):
    """transformers' BambaForCausalLM."""

    config_class = BambaConfig
    recurrent: ClassVar[bool] = True  # the Mamba-2 layers' states: the general forward decodes
    checkpoint_rules = CheckpointRules(
        [MambaGGUF()]
    )  # llama.cpp's A, D, conv, dt bias and norm of the mixers
    gguf = GGUF
    # attention and the MLP split as Llama's; the Mamba-2 mixers are replicated on every rank
    tp_patterns: ClassVar[dict[str, str]] = {
        k.replace(".mlp.", ".feed_forward."): v for k, v in LLAMA_TP.items()
    }
    _no_split_modules: ClassVar[list[str]] = ["BambaDecoderLayer"]

    def __init__(self, config: BambaConfig):
        super().__init__(config, BambaModel(config))
        # GGUF out: the gated norm's groups (ssm_norm's rows)
        self.checkpoint_rules = CheckpointRules([MambaGGUF(config.mamba_n_groups)])

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, *args, return_dict: bool | None = None, **kwargs):  # fmt: skip
        """CausalLM's forward; with labels and z_loss_coefficient > 0, transformers' z-loss added to the loss."""
        out = super().forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels,
                              *args, return_dict=True, **kwargs)  # fmt: skip
        z = self.config.z_loss_coefficient
        if out.loss is not None and z:
            out.loss = out.loss + z * out.logits.logsumexp(dim=-1).to(out.loss.dtype).pow(2).mean()
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()
