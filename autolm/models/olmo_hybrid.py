"""OLMo Hybrid (AI2's Olmo-Hybrid-7B): OLMo 3's attention layers (models/olmo3.py: q/k RMSNorms over the whole
projections, norms after attention and MLP, fp32 norm weights; no sliding window, plain RoPE) between Gated
DeltaNet linear-attention layers (`layer_types`; by default every 4th layer is full attention, the last one where
none would be), as transformers builds it from OLMo 3 and Qwen3-Next pieces.

- A linear-attention layer is pre-norm (`input_layernorm`, `post_attention_layernorm`, OLMo's fp32-weight
  RMSNorms) around Qwen3-Next's mixer (models/qwen3_next.py, autolm.nn.gated_delta) with separate projections:
  q_proj / k_proj (linear_num_key_heads x linear_key_head_dim), v_proj and the output gate g_proj
  (linear_num_value_heads x linear_value_head_dim), a_proj / b_proj (one per value head); a causal depthwise
  conv (`conv1d`, no bias, linear_conv_kernel_dim taps) over [q; k; v] then SiLU; beta = sigmoid(b), times 2
  with `linear_allow_neg_eigval` (the default); each value head's output normed (eps 1e-5) and gated by SiLU(g)
  (`o_norm`), then `o_proj`. The MLP is SiLU-gated (gate_proj, up_proj, down_proj).
- Checkpoints (and transformers' save_pretrained) name the layers' pre-mixer norm `attention_layer_norm` and the
  pre-MLP norm `feedforward_layer_norm` (on every layer: the attention layers' post_attention_layernorm too), and
  keep the conv's weight as three tensors q_conv1d / k_conv1d / v_conv1d, read as transformers reads them
  (renamed, concatenated). autolm saves the pieces at the projections' sizes, as the Hub's files hold them
  (transformers 5.23 splits the weight into three equal parts when saving; it reads both back alike).

NoPE (a config whose rope_theta is null) is not supported. llama.cpp has no OLMo Hybrid architecture: no GGUF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import CheckpointError, ConfigError
from ..nn import CheckpointRules, GatedMLP, Linear, Rename
from ..nn.gated_delta import GatedRMSNorm
from ..nn.linear import packed
from .base import CausalLM, DecoderModel
from .llama import LlamaConfig
from .olmo2 import _norm
from .olmo3 import Olmo3DecoderLayer, Olmo3ForCausalLM
from .qwen3_next import Qwen3NextGatedDeltaNet, check_linear_sizes

_KINDS = ("linear_attention", "full_attention")


@dataclass(repr=False)
class OlmoHybridConfig(LlamaConfig):
    """transformers' OlmoHybridConfig: Llama's fields (no head_dim or mlp_bias written) and the linear layers'."""

    model_type: ClassVar[str] = "olmo_hybrid"
    layer_kinds: ClassVar[tuple[str, ...]] = _KINDS
    absent_keys: ClassVar[tuple[str, ...]] = (*LlamaConfig.absent_keys, "head_dim", "mlp_bias")
    bool_fields: ClassVar[tuple[str, ...]] = (*LlamaConfig.bool_fields, "linear_allow_neg_eigval")

    vocab_size: int = 100352
    hidden_size: int = 3840
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 30
    max_position_embeddings: int = 65536
    pad_token_id: int | None = 100277
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 100257
    rms_norm_eps: float = 1e-6
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_a_log_min: float = 0.0  # the rest: transformers' initialization only, kept for the round trip
    linear_a_log_max: float = 16.0
    linear_dt_min: float = 0.001
    linear_dt_max: float = 0.1
    linear_dt_init_floor: float = 1e-4
    linear_conv_kernel_dim: int = 4
    linear_allow_neg_eigval: bool = True

    def __post_init__(self) -> None:
        n, heads = self.num_hidden_layers, self.num_attention_heads
        if self.layer_types is None and _is_int(n) and n > 0:
            self.layer_types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]
            if "full_attention" not in self.layer_types:
                self.layer_types[-1] = "full_attention"
        if _is_int(heads) and heads > 0 and _is_int(self.hidden_size):
            if self.linear_num_key_heads is None:
                self.linear_num_key_heads = heads
            if self.linear_num_value_heads is None:
                self.linear_num_value_heads = heads
            if self.linear_key_head_dim is None and _is_int(self.linear_num_key_heads):
                self.linear_key_head_dim = int(0.75 * self.hidden_size / self.linear_num_key_heads)
            if self.linear_value_head_dim is None and _is_int(self.linear_key_head_dim):
                self.linear_value_head_dim = 2 * self.linear_key_head_dim
        super().__post_init__()

    def layer_rope(self, i: int) -> str:
        return "default"

    def validate(self) -> None:
        super().validate()
        src, types = self.source, self.layer_types
        if set(types) != set(_KINDS):
            raise ConfigError(f"{src}: layer_types must hold at least one of each of {_KINDS}, found {types}")
        check_linear_sizes(self)
        if self.hidden_act != "silu":  # the linear layers' conv activation is SiLU in autolm
            raise ConfigError(f"{src}: hidden_act must be 'silu' for OLMo Hybrid, found {self.hidden_act!r}")


class OlmoHybridGatedDeltaNet(Qwen3NextGatedDeltaNet):
    """Qwen3-Next's mixer with separate q/k/v/a/b projections, the gate g_proj, the gated norm o_norm (eps 1e-5),
    the output o_proj and beta doubled with linear_allow_neg_eigval."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        self.neg_eigval = config.linear_allow_neg_eigval
        del self._modules["norm"]
        self.o_norm = GatedRMSNorm(self.head_v_dim, 1e-5)
        self.o_proj = self._modules.pop("out_proj")

    norm = property(lambda self: self.o_norm)  # Qwen3NextGatedDeltaNet.forward's names for them
    out_proj = property(lambda self: self.o_proj)

    def make_projections(self, hidden: int) -> None:
        self.q_proj = Linear(hidden, self.key_dim, bias=False)
        self.k_proj = Linear(hidden, self.key_dim, bias=False)
        self.v_proj = Linear(hidden, self.value_dim, bias=False)
        self.a_proj = Linear(hidden, self.num_v_heads, bias=False)
        self.b_proj = Linear(hidden, self.num_v_heads, bias=False)
        self.g_proj = Linear(hidden, self.value_dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, _ = x.shape
        q, k, v, g, b, a = packed(
            x, (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.b_proj, self.a_proj)
        )
        return torch.cat([q, k, v], dim=-1), g.reshape(B, T, -1, self.head_v_dim), b, a

    def beta(self, b: torch.Tensor) -> torch.Tensor:
        return b.sigmoid() * 2.0 if self.neg_eigval else b.sigmoid()


class OlmoHybridLinearAttentionDecoderLayer(nn.Module):
    """input_layernorm, the Gated DeltaNet, post_attention_layernorm, the gated MLP (pre-norm residuals)."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, norm = config.hidden_size, _norm(config)
        self.linear_attn = OlmoHybridGatedDeltaNet(config, layer_idx)
        self.input_layernorm = norm(h)
        self.post_attention_layernorm = norm(h)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.linear_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


def _layer(config: Any, i: int) -> nn.Module:
    if config.layer_types[i] == "linear_attention":
        return OlmoHybridLinearAttentionDecoderLayer(config, i)
    return Olmo3DecoderLayer(config, i)


class OlmoHybridModel(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, _layer, _norm(config)(config.hidden_size))


_CONV_PIECE = re.compile(r"(.+\.linear_attn\.)([qkv])_conv1d\.weight")
_CONV = ".linear_attn.conv1d.weight"


class ConvPieces:
    """Checkpoint rule: the linear layers' conv weight from its q_conv1d / k_conv1d / v_conv1d pieces, concatenated
    in that order (transformers' WeightConverter). `pattern`: the pieces' names (the mixer's module name)."""

    pattern: ClassVar[re.Pattern] = _CONV_PIECE

    def piece(self, name: str) -> tuple[str, str] | None:
        m = self.pattern.fullmatch(name)
        return (f"{m.group(1)}conv1d.weight", m.group(2)) if m else None

    def pieces(self, name: str) -> int:
        return 3

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        t = torch.cat([got[p] for p in "qkv"])
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: the q/k/v_conv1d pieces of {name!r} make {tuple(t.shape)}; the "
                                  f"model expects {tuple(shape)}")  # fmt: skip
        return t


class OlmoHybridRules(CheckpointRules):
    """The renames and ConvPieces; saving splits the conv weight (names ending in `conv`) at the q/k/v
    projections' widths."""

    conv: ClassVar[str] = _CONV

    def to_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().to_checkpoint(state_dict)
        for name in [n for n in out if n.endswith(self.conv)]:
            prefix, t = name[: -len("conv1d.weight")], out.pop(name)
            sizes = [state_dict[f"{prefix}{p}_proj.weight"].shape[0] for p in "qkv"]
            out.update(
                {f"{prefix}{p}_conv1d.weight": piece for p, piece in zip("qkv", t.split(sizes), strict=True)}
            )
        return out


class OlmoHybridForCausalLM(CausalLM):
    """transformers' OlmoHybridForCausalLM."""

    config_class = OlmoHybridConfig
    recurrent: ClassVar[bool] = True
    checkpoint_rules = OlmoHybridRules(
        [
            Rename(
                r"\.attention_layer_norm\.",
                ".input_layernorm.",
                r"\.input_layernorm\.",
                ".attention_layer_norm.",
            ),
            Rename(
                r"\.feedforward_layer_norm\.",
                ".post_attention_layernorm.",
                r"\.post_attention_layernorm\.",
                ".feedforward_layer_norm.",
            ),
            ConvPieces(),
        ]
    )
    # OLMo 3's plan for the attention layers and the MLPs; the linear-attention mixers run whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = Olmo3ForCausalLM.tp_patterns
    shard_heads = Olmo3ForCausalLM.shard_heads
    _no_split_modules: ClassVar[list[str]] = ["Olmo3DecoderLayer", "OlmoHybridLinearAttentionDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, OlmoHybridModel(config))
