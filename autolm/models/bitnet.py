"""BitNet (microsoft/bitnet-b1.58-2B-4T's bf16 master weights, as transformers' BitNetForCausalLM runs them):
Llama's pre-norm decoder layer of grouped-query attention with RoPE, plus

- `attn_sub_norm`, an RMSNorm over the attention's output (all heads) before o_proj;
- a gated MLP with the squared ReLU (`relu2`) and no biases, `ffn_sub_norm` (an RMSNorm over the intermediate
  width) before down_proj: down(sub_norm(relu(gate(x))^2 * up(x))).

transformers' model itself quantizes nothing in forward: a checkpoint without `quantization_config` runs dense.
The released -bf16 checkpoint's config.json carries `quantization_config` {"quant_method": "bitnet",
"linear_class": "autobitlinear", "quantization_mode": "online"}, and transformers then swaps every Linear but the
head for its AutoBitLinear, which computes each forward with the weight made ternary (per tensor: scale
1 / mean|W|, round, clamp to [-1, 1], unscale; W1.58) and the input fake-quantized to int8 (per token: scale
127 / max|x|, round, clamp to [-128, 127], unscale; A8), both in fp32 and cast back. `AutoBitLinear` here does the
same (its ternary weight kept between calls while the weight is unchanged and needs no gradient; straight through
for gradients). Packed checkpoints (uint8 weights with `weight_scale`, quantization_mode "offline", or
`use_rms_norm`) are refused by name: load the -bf16 one.

No GGUF: llama.cpp's "bitnet" graph is 1bitLLM's BitNet (SiLU-gated MLP, sub-norms named `inner_attn_ln` /
`ffn_layernorm` by its converter, which also ternarizes the weights while converting); it cannot hold this model's
squared ReLU. No tensor-parallel plan (transformers declares none; the sub-norms span every head and the whole
intermediate width).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GatedMLP, Linear, RMSNorm, apply_rotary, packed
from .base import CausalLM, DecoderModel
from .llama import LlamaConfig, LlamaDecoderLayer

_ONLINE = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}


@dataclass(repr=False)
class BitNetConfig(LlamaConfig):
    """transformers' BitNetConfig: its fields and defaults (BitNet b1.58 2B4T's sizes, relu2, RoPE base 500000).
    A bitnet `quantization_config` is read here (`bitnet_quantization`), not by autolm's int8 / int4 loading."""

    model_type: ClassVar[str] = "bitnet"
    default_theta: ClassVar[float] = 500000.0
    # not in transformers' config: written when set (the MLP never has biases, whatever mlp_bias says)
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "mlp_bias", "max_window_layers", "sliding_window",
                                              "use_sliding_window")  # fmt: skip
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)

    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 5
    hidden_act: str = "relu2"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 500000.0}
    )

    def __post_init__(self) -> None:
        quant = self.extra.get("quantization_config")
        bitnet = isinstance(quant, dict) and quant.get("quant_method") == "bitnet"
        self.bitnet_quantization = self.extra.pop("quantization_config") if bitnet else None
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    @property
    def online_quantization(self) -> bool:
        """Whether the linear layers compute with ternary weights and int8 inputs (transformers' AutoBitLinear)."""
        return self.bitnet_quantization is not None

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' BitNet builds a plain causal mask whatever the config says

    def validate(self) -> None:
        super().validate()
        src = self.source
        if self.num_attention_heads * self.head_dim != self.hidden_size:
            raise ConfigError(
                f"{src}: head_dim ({self.head_dim}) times num_attention_heads ({self.num_attention_heads}) must "
                f"equal hidden_size ({self.hidden_size}): attn_sub_norm norms hidden_size features"
            )
        q = self.bitnet_quantization
        if q is not None:
            kept = {k: q.get(k, v) for k, v in _ONLINE.items()}
            skip = q.get("modules_to_not_convert")
            if (
                kept != _ONLINE
                or q.get("use_rms_norm")
                or not (skip is None or (isinstance(skip, list) and all(isinstance(s, str) for s in skip)))
            ):
                raise ConfigError(
                    f"{src}: quantization_config {q}: only BitNet's online quantization of bf16 master weights "
                    f"({_ONLINE}, no use_rms_norm) is supported; packed ternary checkpoints are not (load the "
                    "-bf16 checkpoint, e.g. microsoft/bitnet-b1.58-2B-4T-bf16)"
                )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.bitnet_quantization is not None:
            out["quantization_config"] = self.bitnet_quantization
        return out


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """transformers' WeightQuant: w made ternary times one scale, mean|w| (in fp32, cast back)."""
    wf = w.float()
    scale = 1.0 / wf.abs().mean().clamp(min=1e-5)
    return ((wf * scale).round().clamp(-1, 1) / scale).to(w.dtype)


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """transformers' ActQuant: each row (token) fake-quantized to int8 by its largest |x| (in fp32, cast back)."""
    xf = x.float()
    scale = 127 / xf.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return ((xf * scale).round().clamp(-128, 127) / scale).to(x.dtype)


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q's values, with x's gradient (the straight-through estimator transformers' quantizers use)."""
    return x + (q - x).detach() if x.requires_grad else q


class AutoBitLinear(Linear):
    """transformers' AutoBitLinear in its online mode: y = act_quant(x) @ weight_quant(W)^T + b. The float weight
    stays the parameter (saved as is; LoRA adapts it, as peft adapts AutoBitLinear)."""

    quantizes_itself: ClassVar[bool] = True  # autolm's int8 / int4 refuse it (quant.targets)

    @classmethod
    def concat(cls, modules: list, copy: bool = True) -> None:
        return None  # each weight has its own scale: q/k/v and gate/up are never fused (packed() runs each)

    def ternary(self) -> torch.Tensor:
        """weight_quant(weight), kept between calls while the weight is unchanged and needs no gradient."""
        w = self.weight
        if torch.compiler.is_compiling() or (w.requires_grad and torch.is_grad_enabled()):
            return _straight_through(w, weight_quant(w))
        key = (w.data_ptr(), -1 if w.is_inference() else w._version, w.dtype, w.device)  # no version counter
        kept = self.__dict__.get("_ternary")
        if kept is None or kept[0] != key:
            kept = self.__dict__["_ternary"] = (key, weight_quant(w.detach()))
        return kept[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(_straight_through(x, act_quant(x)), self.ternary(), self.bias)


def _converted(name: str, patterns: list[str]) -> bool:
    """transformers' should_convert_module: a pattern skips a module by its name's start (up to a module boundary,
    as a regular expression) or end."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


def online_linears(model: nn.Module, skip: list[str] | None) -> None:
    """Make every Linear AutoBitLinear but those `skip` names (transformers' modules_to_not_convert; when null,
    its default skips: the LM head), keeping their parameters."""
    patterns = ["lm_head"] if skip is None else skip
    for name, m in list(model.named_modules()):
        if type(m) is Linear and _converted(name, patterns):
            with torch.device("meta"):
                new = AutoBitLinear(m.in_features, m.out_features, bias=m.bias is not None)
            new.weight, new.bias = m.weight, m.bias
            model.set_submodule(name, new)


class BitNetAttention(Attention):
    """Llama's attention with `attn_sub_norm` over the heads' output before o_proj."""

    def __init__(self, config: BitNetConfig, layer_idx: int):
        nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        super().__init__(config.hidden_size, nh, nkv, hd, layer_idx, bias=config.attention_bias)
        self.attn_sub_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.project(x)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        cos, sin = ctx.rope[self.rope]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = ctx.attend(self.layer_idx, q, k, v, self.sliding_window, self.scaling)
        return self.o_proj(self.attn_sub_norm(y.reshape(B, T, nh * hd)))


class BitNetMLP(GatedMLP):
    """down_proj(ffn_sub_norm(act(gate_proj(x)) * up_proj(x))), no biases."""

    def __init__(self, config: BitNetConfig):
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.ffn_sub_norm = RMSNorm(config.intermediate_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.ffn_sub_norm(self.act_fn(gate) * up))


class BitNetDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer (input_layernorm, self_attn, post_attention_layernorm, mlp) of BitNet's parts."""

    def __init__(self, config: BitNetConfig, layer_idx: int):
        nn.Module.__init__(self)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = BitNetAttention(config, layer_idx)
        self.mlp = BitNetMLP(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)


class BitNetModel(DecoderModel):
    def __init__(self, config: BitNetConfig):
        super().__init__(config, BitNetDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


class BitNetForCausalLM(CausalLM):
    """transformers' BitNetForCausalLM; with BitNet's online quantization_config, its AutoBitLinear layers."""

    config_class = BitNetConfig
    tp_patterns: ClassVar[dict[str, str]] = {}  # none, as in transformers (the sub-norms span all heads)
    _no_split_modules: ClassVar[list[str]] = ["BitNetDecoderLayer"]

    def __init__(self, config: BitNetConfig):
        super().__init__(config, BitNetModel(config))
        if config.online_quantization:
            online_linears(self, config.bitnet_quantization.get("modules_to_not_convert"))
