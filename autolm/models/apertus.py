"""Apertus (Swiss AI's Apertus-8B / 70B): Llama's pre-norm decoder layers of grouped-query attention with Llama 3
RoPE, but

- RMSNorm on queries and keys per head (before RoPE), with a weight each;
- a plain, non-gated MLP `down_proj(act(up_proj(x)))` without biases, the activation being xIELU: per-layer
  learnable `alpha_p`, `alpha_n` (parameters, one value each) and constant `beta`, `eps` (buffers, saved in the
  checkpoint), computed as transformers' Python xIELU;
- the layer's norms named `attention_layernorm` and `feedforward_layernorm`.

Biases on q/k/v/o where `attention_bias`.

GGUF (llama.cpp's "apertus", as its ApertusModel converter writes it): Llama's tensors without the q/k permutation
(llama.cpp runs the family with NeoX RoPE), Llama 3 RoPE as the rope_freqs tensor, and the xIELU values not as
tensors but as per-layer metadata arrays `xielu.alpha_p`, `xielu.alpha_n` (the raw parameters, before softplus),
`xielu.beta`, `xielu.eps`. Reading, the arrays land in the config (layout `config` keys) and the model takes its
activations' values from there (`new_if_missing` / `init_new`, then dropped from the config); writing, the
layout an instance gives (ApertusLayout) writes its own activations' values and drops their tensors. llama.cpp
always runs xIELU and needs an output tensor: other activations and a tied head are refused on GGUF out.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn import ACTIVATIONS, MLP, Attention, CheckpointRules, GGUFLayout, RMSNorm
from .base import LLAMA_TP, CausalLM, DecoderModel
from .llama import LlamaConfig

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 12000000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


@dataclass(repr=False)
class ApertusConfig(LlamaConfig):
    """transformers' ApertusConfig: its fields and defaults (Apertus-8B's sizes, xIELU, Llama 3 RoPE)."""

    model_type: ClassVar[str] = "apertus"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
    )
    activations: ClassVar[tuple[str, ...]] = (*ACTIVATIONS, "xielu")

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "xielu"
    max_position_embeddings: int = 65536
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 3
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    rope_parameters: dict[str, Any] = field(default_factory=lambda: dict(LLAMA3_ROPE))

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """No RoPE keys in config.json: transformers' default, Llama 3 scaling."""
        if not any(k in d for k in ("rope_theta", "rope_scaling", "rope_parameters")):
            d = {**d, "rope_parameters": dict(LLAMA3_ROPE)}
        return super().read_rope(d, source)

    @property
    def qk_norm(self) -> bool:
        return True

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Apertus builds a plain causal mask whatever the config says


class XIELUActivation(nn.Module):
    """xIELU (arXiv 2411.13010) as transformers' XIELUActivation computes it in Python:
    x > 0: a_p x^2 + beta x; else: a_n (expm1(min(x, eps)) - x) + beta x, with a_p = softplus(alpha_p) and
    a_n = beta + softplus(alpha_n)."""

    def __init__(
        self, alpha_p_init: float = 0.8, alpha_n_init: float = 0.8, beta: float = 0.5, eps: float = -1e-6
    ):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.tensor([math.log(math.expm1(alpha_p_init))]))
        self.alpha_n = nn.Parameter(torch.tensor([math.log(math.expm1(alpha_n_init - beta))]))
        self.register_buffer("beta", torch.tensor(beta))
        self.register_buffer("eps", torch.tensor(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(
            x > 0,
            alpha_p * x * x + self.beta * x,
            (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x,
        )


class ApertusMLP(MLP):
    """up_proj -> the activation (xIELU, a module with its parameters, or a named function) -> down_proj."""

    def __init__(self, config: ApertusConfig):
        act = config.hidden_act
        super().__init__(config.hidden_size, config.intermediate_size, "relu" if act == "xielu" else act)
        if act == "xielu":
            self.act_fn = XIELUActivation()


class ApertusDecoderLayer(nn.Module):
    def __init__(self, config: ApertusConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
            qk_norm="head",
            norm=lambda dim: RMSNorm(dim, eps),
        )
        self.mlp = ApertusMLP(config)
        self.attention_layernorm = RMSNorm(h, eps)
        self.feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.attention_layernorm(x), ctx)
        return x + self.mlp(self.feedforward_layernorm(x))


class ApertusModel(DecoderModel):
    def __init__(self, config: ApertusConfig):
        super().__init__(config, ApertusDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


# ---- GGUF: llama.cpp's ApertusModel converter (arch "apertus") -----------------------------------------------------

XIELU = ("alpha_p", "alpha_n", "beta", "eps")  # the activation's values, each a per-layer metadata array


def _xielu_values(model) -> dict[str, Any]:
    """The "xielu.*" arrays of `model`'s activations (none where the model runs another activation)."""
    layers = model.model.layers
    if model.config.hidden_act != "xielu":
        return {}
    return {
        f"xielu.{k}": [getattr(layer.mlp.act_fn, k).detach().float().item() for layer in layers]
        for k in XIELU
    }


class ApertusLayout:
    """ApertusForCausalLM.gguf: the layout (class access: what the reader and the family table see), or, on an
    instance, the layout whose write_config also writes that model's xIELU arrays (GGUF out)."""

    layout = GGUFLayout(
        "apertus",
        config=tuple((f"xielu.{k}", f"xielu_{k}") for k in XIELU),  # read into the config, see init_new
        layer=(("attn_norm", "attention_layernorm"), ("ffn_norm", "feedforward_layernorm")),
        fixed=(
            ("hidden_act", "xielu"),
            ("tie_word_embeddings", False),
        ),  # llama.cpp's graph, its output tensor
        present=(("blk.0.attn_q.bias", "attention_bias"),),
        unprefixed=tuple(f"xielu.{k}" for k in XIELU),  # llama.cpp's keys for them have no "apertus." prefix
    )

    def __get__(self, obj, cls=None) -> GGUFLayout:
        if obj is None:
            return self.layout
        return dataclasses.replace(self.layout, write_config=lambda out, c: out.update(_xielu_values(obj)))


class _NoXieluTensors:
    """A checkpoint rule for GGUF out only: the activations' values go in the metadata, not as tensors."""

    def piece(self, name: str) -> None:
        return None

    def split(self, name: str, t: torch.Tensor) -> list | None:
        return [] if ".mlp.act_fn." in name else None


class ApertusForCausalLM(CausalLM):
    """transformers' ApertusForCausalLM."""

    config_class = ApertusConfig
    gguf = ApertusLayout()
    checkpoint_rules = CheckpointRules([_NoXieluTensors()])
    # transformers' base_model_tp_plan: attention as Llama's, up_proj split by output features, down_proj by input
    # (the per-head q/k norms, replicated there, stay whole on every rank here as every norm does)
    tp_patterns: ClassVar[dict[str, str]] = {k: v for k, v in LLAMA_TP.items() if "gate_proj" not in k}
    _no_split_modules: ClassVar[list[str]] = ["ApertusDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, ApertusModel(config))

    @property
    def new_if_missing(self) -> tuple[str, ...]:
        """The activations' tensors, where the config holds their values (a GGUF file's metadata)."""
        if self.config.hidden_act != "xielu" or "xielu_alpha_p" not in self.config.extra:
            return ()
        n = self.config.num_hidden_layers
        return tuple(f"model.layers.{i}.mlp.act_fn.{k}" for i in range(n) for k in XIELU)

    def init_new(self, names: list[str]) -> str:
        """The activations' values from the config's "xielu_*" lists (a GGUF file's metadata), then dropped from
        the config, as the checkpoint's tensors would have given them."""
        extra = self.config.extra
        values = {k: extra.pop(f"xielu_{k}") for k in XIELU}
        for k, v in values.items():
            if not isinstance(v, list) or len(v) != self.config.num_hidden_layers:
                raise ConfigError(
                    f"{self.config.source}: xielu.{k} must hold one value per layer, found {v!r}"
                )
        for i, layer in enumerate(self.model.layers):
            act, like = layer.mlp.act_fn, layer.feedforward_layernorm.weight
            for k in XIELU:
                t = torch.tensor(values[k][i], dtype=like.dtype, device=like.device)
                if k in ("alpha_p", "alpha_n"):
                    setattr(act, k, nn.Parameter(t.reshape(1), requires_grad=like.requires_grad))
                else:
                    setattr(act, k, t)
        return "xIELU values from the GGUF metadata"
