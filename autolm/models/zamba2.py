"""Zamba2 (Zyphra's Zamba2-1.2B, 2.7B, 7B and their instruct versions): a stack of Mamba-2 layers, some of which
("hybrid" in `layers_block_type`) first run a shared transformer block whose output joins their input:

    mamba layer:   x = x + mamba(input_layernorm(x))
    hybrid layer:  t = linear(shared_transformer(x, e))                  e: the input embeddings, unchanged
                   x = x + mamba(input_layernorm(x + t))                 (module `mamba_decoder`)
    shared block:  h = input_layernorm(cat(x, e))                        width 2 * hidden_size
                   h = self_attn(h)                                      back to hidden_size through o_proj
                   t = feed_forward(pre_ff_layernorm(h))                 no residual inside the block

- The mixer is autolm.nn.mamba2's Mamba2Mixer: `n_mamba_heads` heads of mamba_expand * hidden_size /
  n_mamba_heads channels, B and C in `mamba_ngroups` groups, chunks of `chunk_size`; as transformers builds it:
  always a conv bias (use_conv_bias is written back and changes nothing), SiLU, the gated norm at epsilon 1e-5,
  time steps clamped below at `time_step_min`; in_proj and out_proj biases where `add_bias_linear`.
- The shared block's attention reads 2 * hidden_size (the norm's width) in `num_attention_heads` heads of
  2 * hidden_size / num_attention_heads, scores scaled by (head size / 2) ** -0.5, RoPE only where `use_mem_rope`,
  no biases; its MLP is one `gate_up_proj` ([gate | up], GELU by default, biases where add_bias_linear).
- There are `num_mem_blocks` shared blocks, used in turn by the hybrid layers (the k-th hybrid layer uses block
  k % num_mem_blocks). As in transformers 5, each hybrid layer holds its own block whose parameters are the
  first user's (tied, so LoRA adapts each use on its own as peft does); checkpoints hold each block once, under
  its first user. transformers 5 ties them only where `tie_word_embeddings` is true (its tying of all weights
  hangs on that switch): with an untied head each hybrid layer has a block of its own, read from the checkpoint,
  as there; a later use the checkpoint does not hold is tied to its first use (transformers would leave it
  random). Per use, the block's MLP adds a low-rank adapter (`gate_up_proj_adapter_list.<k>`: two
  bias-free Linear layers of rank `adapter_rank`) to gate_up_proj's output, and where
  `use_shared_attention_adapter` q, k and v get theirs (`linear_{q,k,v}_adapter_list.<k>`); the lists hold the
  adapters of all the block's uses (Identity, without weights, at the other blocks' places).
- The head is tied by default. The cache holds the hybrid layers' keys and values and every layer's Mamba-2
  state. llama.cpp has no Zamba2 architecture: no GGUF layout.

config.json: transformers writes the values it derives (attention_hidden_size, attention_head_dim, mamba_headdim,
kv_channels, num_query_groups, hybrid_layer_ids); autolm derives them too, and writes those that were read,
recomputed. `layers_block_type` is written as read ("mamba", transformers 4's name, or "linear_attention").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, Linear, RMSNorm
from ..nn.mamba2 import Mamba2Mixer
from .base import CausalLM, DecoderModel
from .phi3 import Phi3MLP

MAMBA, HYBRID = ("mamba", "linear_attention"), "hybrid"  # layers_block_type's names (transformers 4's, 5's)
# (Zyphra/Zamba2-2.7B's layer pattern, transformers' default)
DEFAULT_BLOCKS = [
    "linear_attention",
    *(["linear_attention"] * 5 + [HYBRID]) * 7,
    *["linear_attention"] * 4,
    HYBRID,
    *["linear_attention"] * 3,
    HYBRID,
    *["linear_attention"] * 2,
]
MIXER_EPS = 1e-5  # transformers' Zamba2MambaMixer fixes its gated norm's epsilon
_BOOLS = ("use_mamba_kernels", "use_conv_bias", "use_mem_eff_path", "add_bias_linear",
          "use_shared_attention_adapter", "use_mem_rope", "use_long_context")  # fmt: skip


@dataclass(repr=False)
class Zamba2Config(PretrainedConfig):
    """transformers' Zamba2Config and its defaults."""

    model_type: ClassVar[str] = "zamba2"
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, *_BOOLS)
    # what transformers derives and writes: recomputed, written where config.json had it
    derived: ClassVar[tuple[str, ...]] = ("attention_hidden_size", "attention_head_dim", "mamba_headdim",
                                          "kv_channels", "num_query_groups", "hybrid_layer_ids")  # fmt: skip

    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    hidden_size: int = 2560
    num_hidden_layers: int = 54
    layers_block_type: list[str] | None = None
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_ngroups: int = 1
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    n_mamba_heads: int = 8
    use_mamba_kernels: bool = True
    use_conv_bias: bool = True
    chunk_size: int = 256
    use_mem_eff_path: bool = False
    add_bias_linear: bool = False
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    num_attention_heads: int = 32
    num_mem_blocks: int = 1
    use_shared_attention_adapter: bool = False
    adapter_rank: int = 128
    use_mem_rope: bool = False
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    num_logits_to_keep: int = 1
    pad_token_id: int | None = 0
    use_long_context: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        h, heads = self.hidden_size, self.num_attention_heads
        if self.intermediate_size is None and _is_int(h):
            self.intermediate_size = 4 * h
        if self.use_long_context is True:
            self.max_position_embeddings = 16384  # as transformers' config sets it
        if self.layers_block_type is None:
            self.layers_block_type = list(DEFAULT_BLOCKS)
        self.head_dim = 2 * h // heads if _is_int(h) and _is_int(heads) and heads > 0 else None
        super().__post_init__()

    @property
    def hybrid_layer_ids(self) -> list[int]:
        """The layers that run a shared block, in order."""
        return [i for i, kind in enumerate(self.layers_block_type) if kind == HYBRID]

    @property
    def mamba_headdim(self) -> int:
        return self.mamba_expand * self.hidden_size // self.n_mamba_heads

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {"default": self.rope_parameters} if self.use_mem_rope else {}

    def validate(self) -> None:
        super().validate()
        src, kinds = self.source, self.layers_block_type
        if not (isinstance(kinds, list) and len(kinds) == self.num_hidden_layers
                and all(k in (*MAMBA, HYBRID) for k in kinds)):  # fmt: skip
            raise ConfigError(f"{src}: layers_block_type must list {self.num_hidden_layers} entries, each 'mamba', "
                              f"'linear_attention' or 'hybrid', found {str(kinds)[:200]}")  # fmt: skip
        positive_ints(self, ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_ngroups", "n_mamba_heads",
                             "chunk_size", "num_mem_blocks", "adapter_rank", "num_logits_to_keep"), 1 << 16)  # fmt: skip
        width, heads = self.mamba_expand * self.hidden_size, self.n_mamba_heads
        if width % heads or heads % self.mamba_ngroups:
            raise ConfigError(f"{src}: n_mamba_heads ({heads}) must divide mamba_expand * hidden_size ({width}) "
                              f"and be a multiple of mamba_ngroups ({self.mamba_ngroups})")  # fmt: skip
        if (2 * self.hidden_size) % self.num_attention_heads:
            raise ConfigError(f"{src}: num_attention_heads ({self.num_attention_heads}) must divide the shared "
                              f"attention's width 2 * hidden_size ({2 * self.hidden_size})")  # fmt: skip
        if self.use_shared_attention_adapter and self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(f"{src}: use_shared_attention_adapter needs num_key_value_heads "
                              f"({self.num_key_value_heads}) equal to num_attention_heads (the adapters of k and v "
                              f"are as wide as q's)")  # fmt: skip
        t = self.time_step_min
        if not (_is_number(t) and 0 <= t < math.inf):
            raise ConfigError(f"{src}: time_step_min must be a non-negative number, found {t!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in (
            "head_dim",
            "sliding_window",
        ):  # the attention's head size is written as attention_head_dim
            out.pop(key, None)
        h, heads = self.hidden_size, self.num_attention_heads
        values = {"attention_hidden_size": 2 * h, "attention_head_dim": self.head_dim,
                  "mamba_headdim": self.mamba_headdim, "kv_channels": h // heads, "num_query_groups": heads,
                  "hybrid_layer_ids": self.hybrid_layer_ids}  # fmt: skip
        out.update({k: values[k] for k in self.derived if k in self.extra})
        return out


def adapter_list(config: Zamba2Config, d_in: int, d_out: int, block: int) -> nn.ModuleList:
    """One low-rank adapter per hybrid layer that uses shared block `block` (Identity at the others' places)."""
    r, uses = config.adapter_rank, len(config.hybrid_layer_ids)
    return nn.ModuleList(
        nn.Sequential(Linear(d_in, r, bias=False), Linear(r, d_out, bias=False))
        if k % config.num_mem_blocks == block
        else nn.Identity()
        for k in range(uses)
    )


class Zamba2Attention(Attention):
    """Attention over the concatenated 2 * hidden_size input, o_proj back to hidden_size; the keys and values of
    hybrid layer `layer_idx` in the cache; this use's q/k/v adapters where the config has them."""

    def __init__(self, config: Zamba2Config, layer_idx: int, use: int, block: int):
        h, heads, hd = config.hidden_size, config.num_attention_heads, config.head_dim
        super().__init__(2 * h, heads, config.num_key_value_heads, hd, layer_idx, scale=(hd / 2) ** -0.5,
                         rope="default" if config.use_mem_rope else None)  # fmt: skip
        self.o_proj = Linear(heads * hd, h, bias=False)
        self.use = use  # the index of this use among the hybrid layers: its adapters
        if config.use_shared_attention_adapter:
            self.linear_q_adapter_list = adapter_list(config, 2 * h, 2 * h, block)
            self.linear_k_adapter_list = adapter_list(config, 2 * h, 2 * h, block)
            self.linear_v_adapter_list = adapter_list(config, 2 * h, 2 * h, block)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        if hasattr(self, "linear_q_adapter_list"):
            i = self.use
            q = q + self.linear_q_adapter_list[i](x)
            k = k + self.linear_k_adapter_list[i](x)
            v = v + self.linear_v_adapter_list[i](x)
        return q, k, v


class Zamba2MLP(Phi3MLP):
    """down_proj(act(gate) * up) where [gate | up] = gate_up_proj(x) + this use's adapter(x)."""

    def __init__(self, config: Zamba2Config, use: int, block: int):
        h, inter = config.hidden_size, config.intermediate_size
        super().__init__(h, inter, config.hidden_act)
        if config.add_bias_linear:
            self.gate_up_proj = Linear(h, 2 * inter, bias=True)
            self.down_proj = Linear(inter, h, bias=True)
        self.gate_up_proj_adapter_list = adapter_list(config, h, 2 * inter, block)
        self.use = use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.gate_up_proj(x) + self.gate_up_proj_adapter_list[self.use](x)).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class Zamba2AttentionDecoderLayer(nn.Module):
    """The shared transformer block as hybrid layer `layer_idx` uses it (see the module docstring)."""

    def __init__(self, config: Zamba2Config, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        use = config.hybrid_layer_ids.index(layer_idx)
        block = use % config.num_mem_blocks
        self.self_attn = Zamba2Attention(config, layer_idx, use, block)
        self.feed_forward = Zamba2MLP(config, use, block)
        self.input_layernorm = RMSNorm(2 * h, eps)
        self.pre_ff_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, embeddings: torch.Tensor, ctx) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(torch.cat([x, embeddings], dim=-1)), ctx)
        return self.feed_forward(self.pre_ff_layernorm(h))


class Zamba2MambaDecoderLayer(nn.Module):
    """x + mamba(input_layernorm(x + t)), t the shared block's contribution (none in a plain Mamba layer)."""

    def __init__(self, config: Zamba2Config, layer_idx: int):
        super().__init__()
        c = config
        self.mamba = Mamba2Mixer(c.hidden_size, c.n_mamba_heads, c.mamba_headdim, c.mamba_d_state, c.mamba_ngroups,
                                 c.mamba_d_conv, c.chunk_size, layer_idx, eps=MIXER_EPS, conv_bias=True,
                                 proj_bias=c.add_bias_linear, time_step_limit=(c.time_step_min, math.inf))  # fmt: skip
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx, shared: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.mamba(self.input_layernorm(x if shared is None else x + shared), ctx)


class Zamba2HybridLayer(nn.Module):
    """The shared block (`shared_transformer`), `linear` into the residual width, then the Mamba layer
    (`mamba_decoder`) over the input plus that."""

    def __init__(self, config: Zamba2Config, layer_idx: int):
        super().__init__()
        self.shared_transformer = Zamba2AttentionDecoderLayer(config, layer_idx)
        self.linear = Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mamba_decoder = Zamba2MambaDecoderLayer(config, layer_idx)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        shared = self.linear(self.shared_transformer(x, ctx.embeddings, ctx))
        return self.mamba_decoder(x, ctx, shared)


def make_layer(config: Zamba2Config, i: int) -> nn.Module:
    return (Zamba2HybridLayer if config.layers_block_type[i] == HYBRID else Zamba2MambaDecoderLayer)(
        config, i
    )


class Zamba2Model(DecoderModel):
    """embed_tokens, layers, final_layernorm; the input embeddings reach the hybrid layers through the forward's
    context (`ctx.embeddings`)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "final_layernorm"}

    def __init__(self, config: Zamba2Config):
        super().__init__(config, make_layer, RMSNorm(config.hidden_size, config.rms_norm_eps))

    def context_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What every shared block reads from the context beside its layer's input: the input embeddings (the
        compiled step's graphs take them as one more input)."""
        return {"embeddings": x}

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        for name, t in self.context_inputs(x).items():
            setattr(ctx, name, t)
        return super().run(x, ctx, hidden_states)


class _Under(tuple):
    """Names under any of these prefixes (`name in _Under(prefixes)`)."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.startswith(tuple(self))


class Zamba2ForCausalLM(CausalLM):
    """transformers' Zamba2ForCausalLM."""

    config_class = Zamba2Config
    recurrent: ClassVar[bool] = True  # the Mamba-2 layers' states
    tp_patterns: ClassVar[dict[str, str]] = {}  # none in transformers
    _no_split_modules: ClassVar[list[str]] = ["Zamba2HybridLayer", "Zamba2MambaDecoderLayer"]
    shared_name: ClassVar[str] = "shared_transformer"  # the hybrid layers' module holding the shared block

    def __init__(self, config: Zamba2Config, body: Zamba2Model | None = None):  # body: Zamba's
        super().__init__(config, Zamba2Model(config) if body is None else body)
        # the later uses tied to their block's first (all of them where transformers ties them)
        self.tied_uses = {i for i, _ in self.shared_uses()} if config.tie_word_embeddings else set()
        self.tie_weights()

    def shared_uses(self) -> list[tuple[int, int]]:
        """(hybrid layer, the earlier hybrid layer whose block it uses) for every use after a block's first."""
        ids, n = self.config.hybrid_layer_ids, self.config.num_mem_blocks
        return [(i, ids[k % n]) for k, i in enumerate(ids) if k >= n]

    def tie_weights(self) -> None:
        """The tied head, and each tied later use of a shared block holding its first use's parameters and
        buffers (module by module, whatever they became: quantized layers; LoRA's own weights stay each use's)."""
        super().tie_weights()
        for i, first in self.shared_uses():
            if i not in self.tied_uses:
                continue
            source = dict(getattr(self.model.layers[first], self.shared_name).named_modules())
            for name, m in getattr(self.model.layers[i], self.shared_name).named_modules():
                s = source.get(name)
                if s is None or type(s) is not type(m) or "lora_" in name:
                    continue
                m._parameters.update({k: v for k, v in s._parameters.items() if k in m._parameters})
                m._buffers.update({k: v for k, v in s._buffers.items() if k in m._buffers})
                if hasattr(s, "packed"):  # an int4 layer's weight in the CPU kernel's layout
                    m.packed = s.packed

    def before_merge(self) -> None:
        """Before LoRA adapters merge into the weights: where a shared block's modules carry adapters, the tied
        uses get parameters of their own (each use's adapter merges into its own weights). The merged model then
        holds untied blocks, which transformers 5 reads only with an untied head: the head becomes a copy of the
        embeddings and tie_word_embeddings false."""
        blocks = [getattr(self.model.layers[i], self.shared_name) for i in self.config.hybrid_layer_ids]
        if not self.tied_uses or not any("lora_" in n for b in blocks for n, _ in b.named_parameters()):
            return
        for i in self.tied_uses:
            for name, m in getattr(self.model.layers[i], self.shared_name).named_modules():
                for k, p in m._parameters.items() if "lora_" not in name else ():
                    if p is not None:
                        m._parameters[k] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        self.tied_uses = set()
        if self.config.tie_word_embeddings:
            w = self.model.embed_tokens.weight
            self.lm_head.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            self.config.tie_word_embeddings = False

    @property
    def new_if_missing(self) -> _Under:
        """The later uses' copies of the shared blocks, which checkpoints do not hold (tied after loading)."""
        return _Under(f"{self.layers_prefix}.{i}.{self.shared_name}." for i, _ in self.shared_uses())

    def init_new(self, names: list[str]) -> str:
        """Tie the later uses the checkpoint does not hold to their first use."""
        prefix = self.layers_prefix + "."
        self.tied_uses |= {int(n.removeprefix(prefix).split(".")[0]) for n in names}
        self.tie_weights()
        return f"{len(names)} tensors of the shared blocks' later uses tied to their first use's"
