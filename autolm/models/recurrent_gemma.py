"""RecurrentGemma (Griffin): RecurrentGemma 2B / 9B. Residual blocks whose temporal mixer is, by `block_types`
(cycled over the layers; "recurrent", "recurrent", "attention" by default), a recurrent block or local attention:

- every layer: temporal_block under temporal_pre_norm, then the MLP (`mlp_block`) under channel_pre_norm; Gemma's
  RMSNorm times (1 + w) in fp32; the inputs times sqrt(hidden_size) rounded to bfloat16 (transformers' `normalizer`
  buffer), in the body, so given `inputs_embeds` are scaled too; the final norm `final_norm`;
- the MLP: down(act(gate(x)) * up(x)), all three with biases, intermediate_size // 2 wide, act `hidden_activation`
  (gelu_pytorch_tanh);
- attention: sliding-window (`attention_window_size`) grouped-query attention (MQA in the releases), head_dim
  hidden / heads (transformers recomputes it whatever config.json says), partial rotary (`partial_rotary_factor`,
  0.5), q/k/v biases by `attention_bias`, o_proj always with a bias. transformers keeps the window's keys; autolm's
  cache keeps every position and the mask limits each query to the last `attention_window_size` keys;
- the recurrent block: out = linear_out(RG-LRU(conv(linear_x(x))) * act(linear_y(x))), the causal depthwise conv
  (`conv_1d`, `conv1d_width` taps, with a bias) continuing from the cache's last conv1d_width - 1 inputs; the RG-LRU
  (`rg_lru`) with block-diagonal gates (one bw x bw block per head, bw = lru_width / heads): i = sigmoid(x W_i + b_i),
  r = sigmoid(x W_r + b_r), log a = -8 r softplus(recurrent_param), h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)
  in float32; at position 0 (a sequence's first token: position_ids == 0) the state resets (a = 0) and the input
  is not scaled. The cache keeps (the conv's last inputs in the model's dtype, h in float32). The conv's inputs at
  padding positions are zeroed (and the RG-LRU resets at each row's first real token), so a left-padded row gives
  its unpadded logits; transformers zeroes nothing, so its left-padded rows differ from its own unpadded ones (the
  padding's inputs, and the garbage attention gives fully masked padding queries, reach the conv): autolm's equal
  transformers' on unpadded rows;
- logits soft-capped: tanh(logits / logits_soft_cap) * logits_soft_cap; the head tied.

llama.cpp has no RecurrentGemma (Griffin) architecture: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PartialRotaryConfig, _is_int, _is_number
from ..config_fields import config_json_names, positive_ints
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GatedMLP, Linear, RMSNorm
from ..nn.causal_conv import causal_conv1d
from .base import CausalLM, DecoderModel
from .deepseek_v4 import PositionedRotary
from .gemma2 import softcap

BLOCK_KINDS = ("recurrent", "attention")


@dataclass(repr=False)
class RecurrentGemmaConfig(PartialRotaryConfig):
    """transformers' RecurrentGemmaConfig: `hidden_activation` and `attention_window_size` are autolm's hidden_act
    and sliding_window (attributes under both names); head_dim and final_w_init_variance_scale are derived (from
    hidden_size / num_attention_heads and 2 / num_hidden_layers), as transformers derives them."""

    model_type: ClassVar[str] = "recurrent_gemma"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_act": "hidden_activation",
        "sliding_window": "attention_window_size",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PartialRotaryConfig.bool_fields, "attention_bias")
    # not in transformers' config (it has no length limit): written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("max_position_embeddings",)

    vocab_size: int = 256000
    hidden_size: int = 2560
    intermediate_size: int = 3 * 2560
    num_hidden_layers: int = 26
    num_attention_heads: int = 10
    num_key_value_heads: int | None = None
    hidden_act: str = "gelu_pytorch_tanh"  # config.json's hidden_activation (attribute_map)
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    sliding_window: int | None = 2048  # config.json's attention_window_size (attribute_map)
    lru_width: int | None = None
    conv1d_width: int = 4
    logits_soft_cap: float = 30.0
    block_types: list[str] = field(default_factory=lambda: ["recurrent", "recurrent", "attention"])
    attention_bias: bool = False
    w_init_variance_scale: float = 0.01
    final_w_init_variance_scale: float | None = None

    def __post_init__(self) -> None:
        self.head_dim = None  # hidden_size / num_attention_heads, whatever config.json says (as transformers)
        if self.lru_width is None:
            self.lru_width = self.hidden_size
        if isinstance(self.block_types, tuple):
            self.block_types = list(self.block_types)
        n = self.num_hidden_layers
        self.final_w_init_variance_scale = 2.0 / n if _is_int(n) and n > 0 else None
        super().__post_init__()

    @property
    def hidden_activation(self) -> str:
        return self.hidden_act

    @property
    def attention_window_size(self) -> int:
        return self.sliding_window

    def is_attention(self, i: int) -> bool:
        """Whether layer i's temporal block is local attention (else the recurrent block)."""
        return self.block_types[i % len(self.block_types)] == "attention"

    @property
    def layers_block_type(self) -> list[str]:
        """transformers' layer kinds: "sliding_attention" or "linear_attention" (the recurrent blocks)."""
        kinds = ("linear_attention", "sliding_attention")
        return [kinds[self.is_attention(i)] for i in range(self.num_hidden_layers)]

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window  # every attention block is local

    def validate(self) -> None:
        super().validate()
        src = self.source
        kinds = self.block_types
        if not (isinstance(kinds, list) and kinds and set(kinds) <= set(BLOCK_KINDS)):
            raise ConfigError(
                f"{src}: block_types must be a non-empty list of {BLOCK_KINDS}, found {kinds!r}"
            )
        if self.sliding_window is None:
            raise ConfigError(f"{src}: attention_window_size must be a positive integer, found None")
        positive_ints(self, ("lru_width", "conv1d_width"), 1 << 20)
        if self.lru_width % self.num_attention_heads:
            raise ConfigError(
                f"{src}: lru_width ({self.lru_width}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}): the RG-LRU's gates are one block per head"
            )
        if not _is_int(self.intermediate_size) or self.intermediate_size < 2:
            raise ConfigError(
                f"{src}: intermediate_size must be an integer of at least 2 (the MLP is half of it wide), "
                f"found {self.intermediate_size!r}"
            )
        for name in ("logits_soft_cap", "w_init_variance_scale"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                raise ConfigError(f"{src}: {name} must be a positive number, found {v!r}")
        if self.rope_parameters.get("rope_type") != "default":
            raise ConfigError(
                f"{src}: rope_parameters: RecurrentGemma's RoPE is the default one (as transformers requires), "
                f"found rope_type {self.rope_parameters.get('rope_type')!r}"
            )


config_json_names(
    RecurrentGemmaConfig
)  # cls(hidden_activation=..., attention_window_size=...) as transformers'


class RecurrentGemmaRglru(nn.Module):
    """The Real-Gated Linear Recurrent Unit: block-diagonal input and recurrence gates, a per-channel decay."""

    def __init__(self, config: Any):
        super().__init__()
        heads, width = config.num_attention_heads, config.lru_width
        self.num_attention_heads, self.block_width = heads, width // heads
        bw = self.block_width
        self.recurrent_param = nn.Parameter(torch.empty(width))
        self.input_gate_weight = nn.Parameter(torch.empty(heads, bw, bw))
        self.input_gate_bias = nn.Parameter(torch.empty(heads, bw))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(heads, bw, bw))
        self.recurrent_gate_bias = nn.Parameter(torch.empty(heads, bw))

    def gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """sigmoid(x W + b), one (bw, bw) block of W per head: x (B, T, lru_width)."""
        xh = x.unflatten(-1, (self.num_attention_heads, self.block_width))
        return torch.sigmoid(torch.einsum("bthi,hij->bthj", xh, weight) + bias).flatten(-2)

    def forward(
        self, x: torch.Tensor, reset: torch.Tensor | None, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, lru_width) after `state` (B, lru_width) float32, or None (zeros); reset (B, T, 1) True where a
        sequence starts, or None -> (the outputs (B, T, lru_width) in x's dtype, the state after the last token)."""
        input_gate = self.gate(x, self.input_gate_weight, self.input_gate_bias)
        recurrent_gate = self.gate(x, self.recurrent_gate_weight, self.recurrent_gate_bias)
        log_a = -8.0 * recurrent_gate * F.softplus(self.recurrent_param)
        a, multiplier = torch.exp(log_a), torch.sqrt(1 - torch.exp(2 * log_a))
        if reset is not None:
            multiplier = torch.where(reset, torch.ones_like(multiplier), multiplier)
            a = a * ~reset
        inputs = (x * input_gate) * multiplier.to(x.dtype)
        h = x.new_zeros(x.shape[0], x.shape[-1], dtype=torch.float32) if state is None else state
        outs = []
        for t in range(x.shape[1]):  # float32, as transformers accumulates
            h = a[:, t].float() * h + inputs[:, t].float()
            outs.append(h.to(x.dtype))
        return torch.stack(outs, 1), h


class RecurrentGemmaRecurrentBlock(nn.Module):
    """Griffin's recurrent block: linear_out(rg_lru(conv_1d(linear_x(x))) * act(linear_y(x)))."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, width, K = config.hidden_size, config.lru_width, config.conv1d_width
        self.layer_idx = layer_idx
        self.linear_y = Linear(h, width, bias=True)
        self.linear_x = Linear(h, width, bias=True)
        self.linear_out = Linear(width, h, bias=True)
        self.conv_1d = nn.Conv1d(width, width, K, groups=width, padding=K - 1)
        self.rg_lru = RecurrentGemmaRglru(config)
        self.act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        y = self.act_fn(self.linear_y(x))
        state = ctx.state(self.layer_idx)
        conv_state, lru_state = (None, None) if state is None else state
        xs = self.linear_x(x)
        real = ctx.real_tokens()
        if (
            real is not None
        ):  # the padding's conv inputs zeroed: a left-padded row's state is its unpadded one
            xs = xs * real[..., None].to(xs.dtype)
        xs, conv_state = causal_conv1d(xs.transpose(1, 2), self.conv_1d.weight, self.conv_1d.bias, conv_state)
        # the positions are absent from the compiled one-token graphs: no token there starts a sequence
        positions = ctx.rope.get("positions")
        reset = None if positions is None else (positions[0] == 0)[..., None]
        xs, lru_state = self.rg_lru(xs.to(x.dtype).transpose(1, 2), reset, lru_state)
        ctx.keep_state(self.layer_idx, (conv_state, lru_state))
        return self.linear_out(xs * y)


class RecurrentGemmaDecoderLayer(nn.Module):
    """Griffin's residual block: the temporal block under temporal_pre_norm, the MLP under channel_pre_norm."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.temporal_pre_norm = RMSNorm(h, eps, offset=1.0)
        if config.is_attention(layer_idx):
            self.temporal_block = Attention(h, config.num_attention_heads, config.num_key_value_heads,
                                            config.head_dim, layer_idx, bias=config.attention_bias, o_bias=True,
                                            window=config.sliding_window)  # fmt: skip
        else:
            self.temporal_block = RecurrentGemmaRecurrentBlock(config, layer_idx)
        self.channel_pre_norm = RMSNorm(h, eps, offset=1.0)
        self.mlp_block = GatedMLP(h, config.intermediate_size // 2, config.hidden_act, bias=True)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.temporal_block(self.temporal_pre_norm(x), ctx)
        return x + self.mlp_block(self.channel_pre_norm(x))


class RecurrentGemmaModel(DecoderModel):
    """The body: inputs times sqrt(hidden_size) (rounded to bfloat16), the layers, `final_norm`; the RoPE tables
    carry the positions too (the recurrent blocks reset at position 0)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "final_norm"}
    # the module itself, where DecoderModel has a method of that name: run() calls it, the loader reaches it by name
    final_norm = property(lambda self: self._modules["final_norm"])

    def __init__(self, config: Any):
        super().__init__(config, RecurrentGemmaDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                                     offset=1.0))  # fmt: skip
        self.rotary = PositionedRotary(
            config.rope_kinds(), config.head_dim, config.max_position_embeddings, True
        )
        root = torch.tensor(config.hidden_size**0.5, dtype=torch.bfloat16, device="cpu")
        self.normalizer = float(root)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return x * torch.tensor(self.normalizer, dtype=x.dtype, device=x.device)


class RecurrentGemmaForCausalLM(CausalLM):
    """transformers' RecurrentGemmaForCausalLM."""

    config_class = RecurrentGemmaConfig
    recurrent: ClassVar[bool] = True
    # MQA (one KV head) and the recurrent blocks: tensor parallelism would split nothing evenly; all run whole
    tp_patterns: ClassVar[dict[str, str]] = {}
    _no_split_modules: ClassVar[list[str]] = ["RecurrentGemmaDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, RecurrentGemmaModel(config))
        self.logits_soft_cap = config.logits_soft_cap  # a setting of the compiled head's graph

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap(logits, self.logits_soft_cap)
