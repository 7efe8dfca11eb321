"""Cohere (CohereForAI/c4ai-command-r-v01, command-r-plus, aya-23): one LayerNorm per layer (mean-subtracted,
weight only, computed in fp32) whose output feeds attention and the SwiGLU MLP in parallel
(x + attn(ln(x)) + mlp(ln(x))), RoPE over interleaved pairs (x0, x1), (x2, x3), ... computed in fp32, optional
per-head q/k LayerNorms whose weights hold one row per head (`use_qk_norm`, command-r-plus), logits multiplied by
`logit_scale`, and the LM head tied to the embeddings by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_number
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, GGUFLayout
from .base import LLAMA_TP, CausalLM, DecoderModel


@dataclass(repr=False)
class CohereConfig(PretrainedConfig):
    """transformers' CohereConfig: its fields and defaults (RoPE base 500000 where config.json names none)."""

    model_type: ClassVar[str] = "cohere"
    default_theta: ClassVar[float] = 500000.0
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "rms_norm_eps", "sliding_window")
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias", "use_qk_norm")

    vocab_size: int = 256000
    hidden_size: int = 8192
    intermediate_size: int = 22528
    logit_scale: float = 0.0625
    num_hidden_layers: int = 40
    num_attention_heads: int = 64
    max_position_embeddings: int = 8192
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 5
    eos_token_id: int | list[int] | None = 255001
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    use_qk_norm: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 500000.0}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    def validate(self) -> None:
        super().validate()
        src = self.source
        if not _is_number(self.layer_norm_eps) or not 0 < self.layer_norm_eps < 1:
            raise ConfigError(
                f"{src}: layer_norm_eps must be a positive number below 1, found {self.layer_norm_eps!r}"
            )
        if not _is_number(self.logit_scale):
            raise ConfigError(f"{src}: logit_scale must be a finite number, found {self.logit_scale!r}")


class CohereLayerNorm(nn.Module):
    """transformers' CohereLayerNorm: (x - mean) / sqrt(var + eps) over the last dimension in fp32, times the
    weight in fp32, cast back; no bias. A weight of shape (heads, head_dim) normalises each head of
    (..., heads, head_dim) with its own row (the q/k norms); under tensor parallelism those rows are cut by head
    (`shard`)."""

    def __init__(self, shape: int | tuple[int, ...], eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.variance_epsilon = eps
        self.tp: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.float(), (x.shape[-1],), None, None, self.variance_epsilon)
        return (self.weight.float() * normed).to(x.dtype)

    def shard(self, rank: int, world: int) -> dict[str, tuple[int, int]]:
        """Tensor parallelism (on the meta model): a per-head weight keeps this rank's heads, as the q/k
        projections keep them; a plain norm stays whole. Returns {parameter: (dim, parts)} for the loader."""
        if self.weight.dim() < 2:
            return {}
        shape = (self.weight.shape[0] // world, *self.weight.shape[1:])
        self.weight = nn.Parameter(torch.empty(shape, dtype=self.weight.dtype, device=self.weight.device))
        self.tp = (rank, world)
        return {"weight": (0, 1)}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tp is None or self.weight.device.type == "meta":
            return
        local = destination[prefix + "weight"].detach()  # whole, as one process holds it
        shards = [torch.empty_like(local) for _ in range(self.tp[1])]
        torch.distributed.all_gather(shards, local)
        destination[prefix + "weight"] = torch.cat(shards)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class CohereAttention(Attention):
    """Attention with interleaved RoPE, q/k/v/o biases where `attention_bias`, and with `use_qk_norm` per-head
    LayerNorms on queries and keys with a weight row for each head."""

    def __init__(self, config: CohereConfig, layer_idx: int):
        nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        super().__init__(config.hidden_size, nh, nkv, hd, layer_idx, bias=config.attention_bias,
                         rope_interleaved=True)  # fmt: skip
        if config.use_qk_norm:
            self.q_norm = CohereLayerNorm((nh, hd), config.layer_norm_eps)
            self.k_norm = CohereLayerNorm((nkv, hd), config.layer_norm_eps)
            self.qk_norm = "head"  # applied to (B, T, heads, hd), each head by its own row


class CohereDecoderLayer(nn.Module):
    def __init__(self, config: CohereConfig, layer_idx: int):
        super().__init__()
        self.self_attn = CohereAttention(config, layer_idx)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = CohereLayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, ctx) + self.mlp(h)  # parallel residual, summed in transformers' order


class CohereModel(DecoderModel):
    def __init__(self, config: CohereConfig):
        super().__init__(
            config, CohereDecoderLayer, CohereLayerNorm(config.hidden_size, config.layer_norm_eps)
        )


def gguf_write_config(m: dict[str, Any], c: CohereConfig) -> None:
    """What llama.cpp's CommandR2Model writes (TextModel's keys, the LayerNorm epsilon, logit_scale, RoPE scaling
    type "none"): no vocabulary size, head size or RMS epsilon. Its context length is config.json's
    model_max_length where given; autolm writes max_position_embeddings, which the file must read back as."""
    if not c.tie_word_embeddings:
        raise ConfigError(
            "llama.cpp's 'command-r' format has no output tensor: a cohere model with tie_word_embeddings "
            "false cannot be written"
        )
    for key in (
        "vocab_size",
        "rope.dimension_count",
        "attention.key_length",
        "attention.value_length",
        "attention.layer_norm_rms_epsilon",
        "rope.scaling.factor",
    ):
        m.pop(key, None)
    m["rope.scaling.type"] = "none"  # the converter's; a scaled RoPE then reads back unscaled, and is refused


def gguf_derive(d: dict[str, Any], get: Any) -> None:
    """llama.cpp's command-r loads q/k norms (Command R+'s) only in models of 64 or more layers."""
    if d.get("use_qk_norm") and d["num_hidden_layers"] < 64:
        raise ConfigError(
            "llama.cpp's 'command-r' reads q/k norms (blk.N.attn_q_norm) only with 64 or more layers, not "
            f"{d['num_hidden_layers']}: use_qk_norm"
        )


class CohereForCausalLM(CausalLM):
    """transformers' CohereForCausalLM: logits = lm_head(h) * logit_scale."""

    config_class = CohereConfig
    # llama.cpp's CommandR2Model: tensors renamed one to one (no q/k permutation: llama.cpp's command-r rotates
    # interleaved pairs, as the checkpoint does), no output tensor (tied)
    gguf = GGUFLayout(
        "command-r",
        config=(("attention.layer_norm_epsilon", "layer_norm_eps"), ("logit_scale", "logit_scale")),
        present=(("blk.0.attn_q.bias", "attention_bias"), ("blk.0.attn_q_norm.weight", "use_qk_norm")),
        derive=gguf_derive,
        write_config=gguf_write_config,
    )
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP  # transformers' base_model_tp_plan for Cohere
    _no_split_modules: ClassVar[list[str]] = ["CohereDecoderLayer"]

    def __init__(self, config: CohereConfig):
        super().__init__(config, CohereModel(config))
        self.logit_scale = float(config.logit_scale)  # an attribute: the compiled head's key holds it

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.logit_scale
