"""HRM-Text (Sapient's Hierarchical Reasoning Model for text, DFM Mimir): two stacks of Llama-shaped layers, a
low-level (L) and a high-level (H) one, run over the same tokens in nested cycles:

    z_H = embeddings * embedding_scale;  z_L = z_L_init (a learned vector, broadcast)
    for each of H_cycles:  L_cycles times z_L = L_module(z_L + z_H);  then z_H = H_module(z_H + z_L)
    logits = lm_head(z_H)

- a stack is num_layers_per_stack pre-norm layers and a final norm; every RMSNorm is weightless (nanochat's);
- attention is multi-head (no GQA) with RoPE, its output gated by sigmoid(gate_proj(x)) before o_proj;
- every invocation of a stack's layer attends over keys and values of its own: the cache holds
  num_layers_per_stack * H_cycles * (L_cycles + 1) layers (transformers' config rewrites num_hidden_layers to that
  count and keeps the per-stack count in num_layers_per_stack), invocation (h, l) of layer i at slot
  (h * (L_cycles + 1) + l) * num_layers_per_stack + i, the H stack's at l = L_cycles;
- L_bp_cycles: in training only the last L_bp_cycles[h] low-level passes of cycle h carry gradients (the list
  left-padded with 1s to H_cycles); no effect on what is computed;
- prefix_lm: transformers' bidirectional prefix for tokens with token_type_ids == 1 (in the prompt's forward, and in
  generate; image_text's prefix); without token_type_ids (what llama.cpp runs) the mask is causal.

The recurrence is the body's `run`: the one-token step and the torch.compile'd step run it as they are (each stack's
layers under a context that shifts their cache slots); the per-layer compiled graphs (autolm.step.graphs) assume
one cache layer per decoder layer and are not used.

GGUF in and out as llama.cpp's "hrm_text" (conversion/hrm_text.py), which runs the same graph: block_count the cache's
layer count, `hrm.layers_per_stack`, `hrm.h_cycles`, `hrm.l_cycles`, `hrm.prefix_lm` and `embedding_scale` (a file
without it: no scaling, as llama.cpp reads it); the fused projections split (attn_gate, attn_q/k/v, ffn_gate/up);
blk.N the L stack's layer N, then blk.(layers_per_stack + i) the H stack's layer i; z_L_init as `hrm.z_l_init` (no
".weight"). llama.cpp's gate, output and MLP projections have no biases: attention_bias and mlp_bias are refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, Linear, Rotary, embedding
from ..nn.checkpoint import CheckpointRules, GGUFLayout, Rename, Split
from .base import CausalLM, DecoderModel
from .interop import device_map_of
from .llama import LlamaConfig, LlamaDecoderLayer
from .nanochat import WeightlessRMSNorm


@dataclass(repr=False)
class HrmTextConfig(LlamaConfig):
    """transformers' HrmTextConfig: Llama's fields (no num_key_value_heads: multi-head attention) with the cycles.
    num_hidden_layers is the cache's layer count; a config without num_layers_per_stack gives the per-stack count
    there, rewritten as transformers does."""

    model_type: ClassVar[str] = "hrm_text"
    absent_keys: ClassVar[tuple[str, ...]] = (*LlamaConfig.absent_keys, "num_key_value_heads")
    bool_fields: ClassVar[tuple[str, ...]] = (*LlamaConfig.bool_fields, "prefix_lm")
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("L_bp_cycles",)  # training only: in no GGUF file

    vocab_size: int = 151808
    hidden_size: int = 1536
    intermediate_size: int = 4096
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    head_dim: int | None = 128
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    H_cycles: int = 2
    L_cycles: int = 3
    L_bp_cycles: list[int] | None = None
    embedding_scale: float | None = None
    prefix_lm: bool = True
    num_layers_per_stack: int | None = None

    def __post_init__(self) -> None:
        positive_ints(self, ("H_cycles", "L_cycles"))
        if self.L_bp_cycles is None:
            self.L_bp_cycles = [2]
        if self.embedding_scale is None:
            self.embedding_scale = 1.0 / float(self.extra.get("initializer_range", 0.02))
        if self.num_layers_per_stack is None and _is_int(self.num_hidden_layers):
            self.num_layers_per_stack = self.num_hidden_layers
            self.num_hidden_layers = self.num_layers_per_stack * self.H_cycles * (self.L_cycles + 1)
        super().__post_init__()

    def _implied(self, f) -> Any:
        return self.num_attention_heads if f.name == "num_key_value_heads" else super()._implied(f)

    @property
    def checkpoint_layers(self) -> int:
        """The decoder layers the checkpoint holds in each stack (autolm.load's size check)."""
        return self.num_layers_per_stack

    def validate(self) -> None:
        super().validate()
        src, n = self.source, self.num_layers_per_stack
        if not _is_int(n) or n < 1:
            raise ConfigError(f"{src}: num_layers_per_stack must be a positive integer, found {n!r}")
        if self.num_hidden_layers != n * self.H_cycles * (self.L_cycles + 1):
            raise ConfigError(f"{src}: num_hidden_layers ({self.num_hidden_layers}) must be num_layers_per_stack * "
                              f"H_cycles * (L_cycles + 1) = {n * self.H_cycles * (self.L_cycles + 1)}")  # fmt: skip
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(f"{src}: num_key_value_heads: HRM-Text's attention is multi-head "
                              f"({self.num_attention_heads} heads), found {self.num_key_value_heads!r}")  # fmt: skip
        bp = self.L_bp_cycles
        if not isinstance(bp, list) or not all(_is_int(b) and b >= 0 for b in bp):
            raise ConfigError(f"{src}: L_bp_cycles must be a list of non-negative integers, found {bp!r}")
        if not _is_number(self.embedding_scale) or not self.embedding_scale > 0:
            raise ConfigError(
                f"{src}: embedding_scale must be a positive number, found {self.embedding_scale!r}"
            )
        if self.layer_types is not None and "sliding_attention" in self.layer_types:
            raise ConfigError(f"{src}: layer_types: HRM-Text has no sliding-window attention")

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' HRM-Text builds a causal mask whatever the config says

    @property
    def prefix_token_type(self) -> int | None:
        """The token type of the prefix attended both ways (image_text.prompt_blocks): 1 under prefix_lm."""
        return 1 if self.prefix_lm else None


class HrmTextAttention(Attention):
    """Multi-head attention with RoPE, its output gated by sigmoid(gate_proj(x)) (biases where attention_bias)."""

    def __init__(self, config: HrmTextConfig, layer_idx: int):
        nh, hd = config.num_attention_heads, config.head_dim
        super().__init__(config.hidden_size, nh, nh, hd, layer_idx, bias=config.attention_bias)
        self.gate_proj = Linear(config.hidden_size, nh * hd, bias=config.attention_bias)

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate_proj(x)) * y


class HrmTextDecoderLayer(LlamaDecoderLayer):
    """Llama's layer (its forward) with the gated attention and weightless norms."""

    def __init__(self, config: HrmTextConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.self_attn = HrmTextAttention(config, layer_idx)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias
        )
        self.input_layernorm = WeightlessRMSNorm(config.rms_norm_eps)
        self.post_attention_layernorm = WeightlessRMSNorm(config.rms_norm_eps)


class _Shifted:
    """A forward context whose layers' cache slots are shifted by `offset` (one invocation of a stack)."""

    def __init__(self, ctx, offset: int):
        self.ctx, self.offset = ctx, offset

    def attend(self, layer_idx: int, *args, **kwargs) -> torch.Tensor:
        return self.ctx.attend(layer_idx + self.offset, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ctx, name)


class HrmTextStack(nn.Module):
    """num_layers_per_stack decoder layers and a weightless final norm (transformers' HrmTextStack)."""

    def __init__(self, config: HrmTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            HrmTextDecoderLayer(config, i) for i in range(config.num_layers_per_stack)
        )
        self.final_norm = WeightlessRMSNorm(config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx, checkpointed: bool = False) -> torch.Tensor:
        for layer in self.layers:
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return self.final_norm(x)


class HrmTextModel(DecoderModel):
    """The embeddings (scaled), the L and H stacks and z_L_init; `run` is the nested recurrence."""

    def __init__(self, config: HrmTextConfig):
        nn.Module.__init__(self)
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.gradient_checkpointing = False
        self.rotary = Rotary(config.rope_kinds(), config.head_dim, config.max_position_embeddings)
        self.L_module = HrmTextStack(config)
        self.H_module = HrmTextStack(config)
        self.z_L_init = nn.Parameter(torch.zeros(config.hidden_size), requires_grad=False)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return x * self.config.embedding_scale

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        """The H/L cycles over input vectors x (B, T, h); hidden_states gets the input and the output."""
        c = self.config
        n, L = c.num_layers_per_stack, c.L_cycles
        bp = [1] * max(0, c.H_cycles - len(c.L_bp_cycles)) + list(c.L_bp_cycles)
        ckpt = self.gradient_checkpointing and self.training
        if hidden_states is not None:
            hidden_states.append(x)
        z_h, z_l = x, self.z_L_init.to(x.device, x.dtype).expand_as(x)
        for h in range(c.H_cycles):
            grad_from = L - (bp[h] if h < len(bp) else 1)
            for low in range(L):
                with contextlib.nullcontext() if low >= grad_from else torch.no_grad():
                    z_l = self.L_module(z_l + z_h, _Shifted(ctx, (h * (L + 1) + low) * n), ckpt)
            z_h = self.H_module(z_h + z_l, _Shifted(ctx, (h * (L + 1) + L) * n), ckpt)
        if hidden_states is not None:
            hidden_states.append(z_h)
        return z_h


# transformers' base_model_tp_plan inside each stack's layers: q/k/v, the attention gate, gate/up split by output
# features, o/down by input
_TP_LAYER = {
    **{f"self_attn.{p}_proj": "colwise" for p in ("q", "k", "v", "gate")},
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def _gguf_block(n: int, get) -> str | None:
    """blk.N's layer: the L stack's first (layers_per_stack blocks), then the H stack's."""
    per = get("hrm.layers_per_stack")
    if not _is_int(per) or not 0 <= n < 2 * per:
        return None
    return f"model.{'L' if n < per else 'H'}_module.layers.{n % per}"


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp scales the embeddings only by a file's embedding_scale (none: by 1)."""
    d.setdefault("embedding_scale", 1.0)


def _gguf_write_config(m: dict[str, Any], c: HrmTextConfig) -> None:
    m["hrm.prefix_lm"] = bool(c.prefix_lm)  # a bool: the plan writes no config bools of itself


_GGUF = GGUFLayout(
    "hrm_text",
    config=(
        ("embedding_scale", "embedding_scale"),
        ("hrm.layers_per_stack", "num_layers_per_stack"),
        ("hrm.h_cycles", "H_cycles"),
        ("hrm.l_cycles", "L_cycles"),
        ("hrm.prefix_lm", "prefix_lm"),
    ),
    layer=(("attn_gate", "self_attn.gate_proj"),),
    top=(("hrm.z_l_init", "model.z_L_init"),),
    fixed=(("attention_bias", False), ("mlp_bias", False)),  # llama.cpp's gate, o_proj and MLP have none
    bare=("z_l_init",),
    derive=_gguf_derive,
    write_config=_gguf_write_config,
    block_prefix=_gguf_block,
)


class HrmTextForCausalLM(CausalLM):
    """transformers' HrmTextForCausalLM."""

    config_class = HrmTextConfig
    # transformers' conversion: the checkpoint (upstream's layout) fuses gate/q/k/v and gate/up, names attn.o_proj
    checkpoint_rules: ClassVar[CheckpointRules] = CheckpointRules([
        Rename(r"\.attn\.o_proj\.", ".self_attn.o_proj.", r"\.self_attn\.o_proj\.", ".attn.o_proj."),
        Split(".attn.gqkv_proj.weight", tuple(f".self_attn.{p}_proj.weight" for p in ("gate", "q", "k", "v"))),
        Split(".mlp.gate_up_proj.weight", (".mlp.gate_proj.weight", ".mlp.up_proj.weight")),
        Rename(r"^model\.z_L_init\.weight$", "model.z_L_init", r"(?!)", ""),  # GGUF's hrm.z_l_init
    ])  # fmt: skip
    gguf = _GGUF
    layers_prefix: ClassVar[str] = (
        "model"  # the stacks' layers: model.L_module.layers.*, model.H_module.layers.*
    )
    checkpoint_stack: ClassVar[str] = "model.L_module.layers"  # autolm.load's size check counts one stack's
    compiled_graphs: ClassVar[bool] = False  # a layer runs at several cache slots (see the module docstring)
    tp_patterns: ClassVar[dict[str, str]] = {
        f"{stack}.layers.*.{module}": style
        for stack in ("L_module", "H_module")
        for module, style in _TP_LAYER.items()
    }
    _no_split_modules: ClassVar[list[str]] = ["HrmTextDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, HrmTextModel(config))

    def _stack_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"model.{s}.layers.{i}", layer) for s in ("L_module", "H_module")
                for i, layer in enumerate(getattr(self.model, s).layers)]  # fmt: skip

    def blocks(self) -> list[str]:
        """The embeddings, each stack's layers, the body's own z_L_init ("model": what its other blocks leave), the
        head."""
        return ["model.embed_tokens", *(name for name, _ in self._stack_layers()), "model", "lm_head"]

    def _slot_stacks(self) -> list[str]:
        """Per cache slot, the name of the stack layer that fills it."""
        c = self.config
        n, L = c.num_layers_per_stack, c.L_cycles
        return [f"model.{'H' if (s // n) % (L + 1) == L else 'L'}_module.layers.{s % n}"
                for s in range(c.num_hidden_layers)]  # fmt: skip

    def attention_shapes(self) -> list[tuple[int, int]]:
        attn = self.model.L_module.layers[0].self_attn
        return [(attn.num_kv_heads, attn.head_dim)] * self.config.num_hidden_layers

    def layer_devices(self) -> list[torch.device]:
        device_map = device_map_of(self)
        if not device_map:
            return [self.model.embed_tokens.weight.device] * self.config.num_hidden_layers
        return [
            torch.device("cpu" if d == "disk" else d) for d in (device_map[s] for s in self._slot_stacks())
        ]
