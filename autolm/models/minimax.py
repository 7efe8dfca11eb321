"""MiniMax (MiniMax-Text-01, MiniMax-M1; transformers' model_type "minimax", not MiniMax-M2's "minimax_m2"): Mixtral's
attention and mixture of experts, with most layers' attention replaced by lightning attention.

- `layer_types` says which layers are "full_attention" (Mixtral's attention, RoPE, `sliding_window` when set) and
  which "linear_attention"; without it, as transformers derives it, the even layers are full attention.
- Lightning attention (`self_attn` of a linear layer): qkv_proj and the activation (hidden_act) give each head's
  q, k, v (per head [q; k; v]); a causal linear attention whose head h decays by exp(-s_h) a token,
  y_t = sum_{j<=t} exp(-s_h (t - j)) (q_t . k_j) v_j, computed in blocks of `block_size` tokens (within a block
  through the decay matrix, across blocks through the state sum_j exp(-s_h (t - j)) k_j v_j^T, which the cache
  keeps in fp32). The slopes s_h = 2^(-8 (h + 1) / H) * (1 - i / (L - 1) + 1e-5) shrink with the layer index i;
  they and the block decay tables are persistent buffers (the checkpoint holds them as transformers writes them).
  The output is RMS-normed over all heads (`norm`, epsilon 1e-6), times sigmoid(output_gate(x)), then out_proj.
- Post-norm residuals: with h = input_layernorm(x), a layer's attention gives h * alpha + attn(h) * beta (alpha and
  beta `full_attn_*` or `linear_attn_*_factor` by layer type); with g = post_attention_layernorm of that, the layer's
  output is g * mlp_alpha_factor + moe(g) * mlp_beta_factor.

Checkpoints name the mixture `block_sparse_moe` with one w1/w2/w3 per expert, as Mixtral's (its rules).

GGUF: llama.cpp's "minimax-01" (its MiniMaxText01Model converter). Its graph scales every residual by one
`residual_scale` (the alphas equal, the betas 1; others refused on GGUF out), runs full attention on every
`full_attention_interval`-th layer (8 by default: the converter writes no pattern) or where
`attention.recurrent_layers` says not (written for other patterns), rotates rope.dimension_count dimensions (the
released files' 64 of 128 are refused on reading: transformers' MiniMax rotates whole heads) and computes the decay
tables itself (left out of the file; computed on reading). Its lightning norm takes rms_norm_eps (here 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, CheckpointRules, GGUFLayout, Linear, Rename, RMSNorm
from .base import CausalLM
from .mixtral import GGUF_EXPERTS, MixtralConfig, MixtralDecoderLayer, MixtralForCausalLM, MixtralModel

LAYER_TYPES = ("full_attention", "linear_attention")
DECAYS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")  # a lightning layer's buffers
FACTORS = ("full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor",
           "linear_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor")  # fmt: skip


@dataclass(repr=False)
class MiniMaxConfig(MixtralConfig):
    """transformers' MiniMaxConfig (Mixtral's fields, the block size and the residual factors)."""

    model_type: ClassVar[str] = "minimax"
    layer_kinds: ClassVar[tuple[str, ...]] = LAYER_TYPES
    sliding_window: int | None = None
    block_size: int = 256
    full_attn_alpha_factor: float = 1
    full_attn_beta_factor: float = 1
    linear_attn_alpha_factor: float = 1
    linear_attn_beta_factor: float = 1
    mlp_alpha_factor: float = 1
    mlp_beta_factor: float = 1

    def __post_init__(self) -> None:
        self._head_dim_given = self.head_dim is not None
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:  # transformers' default: even layers full
            self.layer_types = [LAYER_TYPES[i % 2] for i in range(n)]
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not self.__dict__.get("_head_dim_given", True):
            out["head_dim"] = None  # as transformers keeps it: derived from the sizes where used
        return out

    # GGUF out compares the layer kinds (below); the block size only changes how the same sums are grouped
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("block_size",)

    def gguf_compared(self) -> dict[str, Any]:
        return {"layer kinds": self.layer_types}

    def layer_window(self, i: int) -> int | None:
        """Full-attention layers attend over `sliding_window` when set (as transformers' mask does)."""
        return self.sliding_window if self.layer_types[i] == "full_attention" else None

    def linear(self, i: int) -> bool:
        return self.layer_types[i] == "linear_attention"

    def validate(self) -> None:
        super().validate()
        src = self.source
        if not _is_int(self.block_size) or not 0 < self.block_size <= 4096:
            raise ConfigError(f"{src}: block_size must be an integer in [1, 4096], found {self.block_size!r}")
        for name in FACTORS:
            v = getattr(self, name)
            if not _is_number(v):
                raise ConfigError(f"{src}: {name} must be a finite number, found {v!r}")


def lightning_attention(q, k, v, slope, tables, block: int, state=None):
    """q, k, v (B, H, T, d), slope (H, 1, 1), tables: the (query, key, diagonal) decays of a block (see
    LightningAttention.decay_tables), state (B, H, d, d) after the earlier tokens or None -> y (B, H, T, d) and
    the state after these tokens, in fp32. Token by token it is state = exp(-slope) state + k_t^T v_t,
    y_t = q_t state; here a block at a time."""
    q, k, v, slope = q.float(), k.float(), v.float(), slope.float()
    query_decay, key_decay, diagonal_decay = (t.float() for t in tables)
    B, H, T, d = q.shape
    if state is None:
        state = q.new_zeros(B, H, d, v.shape[-1])
    out = []
    for start in range(0, T, block):
        c = min(block, T - start)
        qb, kb, vb = (t[:, :, start : start + c] for t in (q, k, v))
        intra = ((qb @ kb.transpose(-1, -2)) * diagonal_decay[:, :, :c, :c]) @ vb
        out.append((qb * query_decay[:, :c]) @ state + intra)
        state = state * torch.exp(-slope * c) + (kb * key_decay[:, block - c :]).transpose(-1, -2) @ vb
    return torch.cat(out, dim=2), state


class LightningAttention(nn.Module):
    """transformers' MiniMaxLightningAttention (see the module docstring); its state in the cache: (B, H, d, d)."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.block_size = config.block_size
        width = self.heads * self.head_dim
        self.act = ACTIVATIONS[config.hidden_act]
        self.norm = RMSNorm(width, 1e-6)
        self.qkv_proj = Linear(config.hidden_size, 3 * width, bias=False)
        self.out_proj = Linear(width, config.hidden_size, bias=False)
        self.output_gate = Linear(config.hidden_size, width, bias=False)
        slope = self.slope_rate_of(config.num_hidden_layers)
        self.register_buffer("slope_rate", slope)
        for name, table in zip(("query_decay", "key_decay", "diagonal_decay"), self.decay_tables(slope)):
            self.register_buffer(name, table)

    def slope_rate_of(self, num_layers: int) -> torch.Tensor:
        """(H, 1, 1): each head's decay rate in this layer, as transformers computes it."""
        base = 1 / (2 ** (8 / self.heads))
        factor = 1 - self.layer_idx / (num_layers - 1 + 1e-5) + 1e-5
        return (base ** (torch.arange(self.heads) + 1) * factor)[:, None, None]

    def decay_tables(self, slope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A block's decays: of the state to each query (H, n, 1), of each key to the block's end (H, n, 1), and
        between a query and an earlier key of the block (1, H, n, n; 0 above the diagonal)."""
        n = torch.arange(self.block_size) + 1
        query = torch.exp(-slope * n[:, None])
        key = torch.exp(-slope * (self.block_size - n[:, None]))
        gap = slope * (n[:, None] - n[None, :])[None, None]
        return query, key, torch.exp(torch.where(gap >= 0, -gap, float("-inf")))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.act(self.qkv_proj(x))
        real = ctx.real_tokens()  # padding adds nothing to the state: a left-padded row's is its unpadded one
        if real is not None:
            qkv = (qkv * real[:, :, None]).to(qkv.dtype)
        q, k, v = qkv.view(B, T, self.heads, 3 * self.head_dim).transpose(1, 2).split(self.head_dim, dim=-1)
        state = ctx.state(self.layer_idx)
        tables = (self.query_decay, self.key_decay, self.diagonal_decay)
        y, state = lightning_attention(q, k, v, self.slope_rate, tables, self.block_size,
                                       None if state is None else state[0])  # fmt: skip
        ctx.keep_state(self.layer_idx, (state,))
        y = self.norm(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * y)


class MiniMaxDecoderLayer(MixtralDecoderLayer):
    """Mixtral's layer with lightning attention on linear layers and the post-norm residuals (module docstring)."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        kind = "linear_attn" if config.linear(layer_idx) else "full_attn"
        self.attn_alpha, self.attn_beta = (getattr(config, f"{kind}_{w}_factor") for w in ("alpha", "beta"))
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor

    def make_attention(self, config: Any, layer_idx: int) -> nn.Module:
        if config.linear(layer_idx):
            return LightningAttention(config, layer_idx)
        return super().make_attention(config, layer_idx)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.post_attention_layernorm(h * self.attn_alpha + self.self_attn(h, ctx) * self.attn_beta)
        return h * self.mlp_alpha + self.mlp(h) * self.mlp_beta


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's "minimax-01" keys -> the config: the layer kinds (attention.recurrent_layers, else every
    full_attention_interval-th layer, 8 by default, full attention), one residual scale as the three alpha factors
    (the betas fixed at 1), the head size from attention.key_length, which the rotary dimensions must equal."""
    n, rotary, head = d.get("num_hidden_layers"), get("rope.dimension_count"), get("attention.key_length")
    if head is not None:
        d["head_dim"] = head
    if rotary is not None and head is not None and rotary != head:
        raise ConfigError(f"a 'minimax-01' GGUF rotating {rotary} of its {head} head dimensions: transformers' "
                          "MiniMax (head_dim) rotates whole heads")  # fmt: skip
    recurrent = get("attention.recurrent_layers")
    if recurrent is None and _is_int(n):
        every = get("full_attention_interval", 8)
        recurrent = [(i + 1) % every != 0 for i in range(n)]
    if isinstance(recurrent, list):
        d["layer_types"] = [LAYER_TYPES[bool(r)] for r in recurrent]
    scale = get("residual_scale")
    if scale is not None:
        d.update((f"{kind}_alpha_factor", scale) for kind in ("full_attn", "linear_attn", "mlp"))


def _gguf_write_config(m: dict[str, Any], c: MiniMaxConfig) -> None:
    """_gguf_derive's inverse: the alpha factors (llama.cpp's graph scales every residual by one) as residual_scale;
    the layer kinds as attention.recurrent_layers where they are not llama.cpp's default of full attention on every
    8th layer (the converter writes no pattern); no window (llama.cpp's graph has none)."""
    m.pop("attention.sliding_window", None)
    m["residual_scale"] = float(c.mlp_alpha_factor)
    kinds = [c.linear(i) for i in range(c.num_hidden_layers)]
    if kinds != [(i + 1) % 8 != 0 for i in range(c.num_hidden_layers)]:
        m["attention.recurrent_layers"] = kinds


class _DecayTables:
    """Checkpoint rule: the lightning layers' decay buffers are no tensors of llama.cpp's (it computes them): left
    out of GGUF out (`split`); reading, the model computes them (MiniMaxForCausalLM.init_new)."""

    def piece(self, name: str) -> None:
        return None

    def split(self, name: str, t: torch.Tensor) -> list | None:
        return [] if name.rpartition(".")[2] in DECAYS else None


def _full_layers_out_proj(config: MiniMaxConfig) -> list[Rename]:
    """llama.cpp names both attentions' output projections attn_output (read as the lightning layers'
    self_attn.out_proj): on full-attention layers that is o_proj. One way only: the model's names are saved."""
    full = "|".join(str(i) for i in range(config.num_hidden_layers) if not config.linear(i))
    if not full:
        return []
    return [Rename(rf"^model\.layers\.({full})\.self_attn\.out_proj\.", r"model.layers.\1.self_attn.o_proj.",
                   r"(?!)", "")]  # fmt: skip


class MiniMaxForCausalLM(MixtralForCausalLM):
    """transformers' MiniMaxForCausalLM."""

    config_class = MiniMaxConfig
    # llama.cpp's MiniMaxText01Model converter: Mixtral's experts, the lightning layers' qkv_proj, output_gate and
    # norm as attn_qkv, attn_gate and attn_norm_2, both attentions' output as attn_output; NeoX RoPE (no permutation)
    gguf = GGUFLayout(
        "minimax-01",
        config=(("expert_count", "num_local_experts"), ("expert_used_count", "num_experts_per_tok")),
        layer=(
            *GGUF_EXPERTS,
            ("attn_qkv", "self_attn.qkv_proj"),
            ("attn_gate", "self_attn.output_gate"),
            ("attn_norm_2", "self_attn.norm"),
            ("attn_output", "self_attn.out_proj"),
        ),
        fixed=(
            ("sliding_window", None),
            ("full_attn_beta_factor", 1),
            ("linear_attn_beta_factor", 1),
            ("mlp_beta_factor", 1),
        ),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    _no_split_modules: ClassVar[list[str]] = ["MiniMaxDecoderLayer"]
    recurrent: ClassVar[bool] = True  # the lightning layers keep their states in the cache
    # the decay tables stay in fp32 under a bf16 / fp16 model (transformers rounds them, decays near 1, to its dtype)
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = list(DECAYS)

    def __init__(self, config: Any):
        CausalLM.__init__(self, config, MixtralModel(config, MiniMaxDecoderLayer))
        rules = type(self).checkpoint_rules.rules
        self.checkpoint_rules = CheckpointRules([*rules, *_full_layers_out_proj(config), _DecayTables()])

    @property
    def new_if_missing(self) -> tuple[str, ...]:
        """The decay buffers, which a GGUF file does not hold: computed from the config (init_new)."""
        return tuple(f"model.layers.{i}.self_attn.{name}" for i in range(self.config.num_hidden_layers)
                     if self.config.linear(i) for name in DECAYS)  # fmt: skip

    def init_new(self, names: list[str]) -> str:
        for layer in self.model.layers:
            attn = layer.self_attn
            if isinstance(attn, LightningAttention):
                device = attn.qkv_proj.weight.device
                slope = attn.slope_rate_of(self.config.num_hidden_layers).to(device)
                for name, t in zip(DECAYS, (slope, *attn.decay_tables(slope))):
                    attn._buffers[name] = t
        return "the lightning layers' decay tables computed"
