"""Kimi Linear (Kimi-Linear-48B-A3B): a hybrid of Kimi Delta Attention (KDA) layers and DeepSeek-V3's Multi-head
Latent Attention without RoPE, by `layer_types` (by default every fourth layer from the fifth is
"full_attention", the rest "linear_attention"), each followed by a dense gated MLP or DeepSeek-V3's mixture of
experts, by `mlp_layer_types` ("dense" below `first_k_dense_replace` by default, else "sparse").

- MLA (`self_attn` in full-attention layers): DeepSeek-V3's (models.deepseek_v3), with no position encoding at
  all: the qk_rope_head_dim part of the keys, which every head shares, is never turned; scale qk_head_dim ** -0.5.
- KDA (`self_attn` in linear-attention layers): Gated DeltaNet (models.qwen3_next, autolm.nn.gated_delta) with
  the decay per key channel instead of per head. Separate q/k/v projections (linear_num_heads heads of
  linear_head_dim, keys and values alike) pass the causal depthwise conv (kernel `linear_conv_kernel_dim`, no
  bias) and SiLU; beta = sigmoid(b_proj(x)); the log decay g = -exp(A_log[h]) * softplus(f_b_proj(f_a_proj(x)) +
  dt_bias) per channel (`forget_gate`); the delta rule with L2-normed q/k; each head's output RMS-normed and gated
  by sigmoid(g_b_proj(g_a_proj(x))) (`o_norm`), then o_proj. Its state in the cache: the conv's last K - 1 inputs
  and the rule's fp32 state.
- The mixture: DeepSeek-V3's grouped sigmoid routing with the e_score_correction_bias, the top k renormalised
  (`moe_renormalize`) and scaled by routed_scaling_factor, plus shared experts.

transformers keeps the checkpoint's own names (as Moonshot's files): `block_sparse_moe` for every feed-forward
block, the experts' w1 / w2 / w3, the forget gate's tensors on `self_attn`, the conv as q_conv1d / k_conv1d /
v_conv1d; config.json in its attribute_map's names (num_experts, num_expert_group, moe_renormalize, ...). The
Hub's `linear_attn_config` (head size, heads, kernel, 1-based kda_layers / full_attn_layers) is read as transformers
reads it. The compiled one-token step is not used (recurrent layers), as for the other hybrids. GGUF: llama.cpp's
"kimi-linear" (autolm.models.kimi_linear_gguf).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import GatedMLP, GGUFLayout, Linear, Rename, Stacked
from ..nn.expert_formats import GGUFExperts
from ..nn.gated_delta import GatedRMSNorm
from ..nn.linear import packed
from . import kimi_linear_gguf
from .base import CausalLM
from .deepseek_v3 import DeepseekV3Attention, DeepseekV3Config, DeepseekV3DecoderLayer, GGUFMla
from .glm4_moe import GGUF_GROUPED_LAYER, GROUPED_MOE_TP, ExpProbsBias, grouped_moe_mlp
from .mixtral import MixtralModel
from .olmo_hybrid import ConvPieces, OlmoHybridRules
from .qwen3_next import Qwen3NextGatedDeltaNet

_LINEAR_KEYS = ("linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim")
_NOT_KIMI = ("rope_parameters", "rope_theta", "rope_scaling")  # Kimi Linear has no RoPE settings


@dataclass(repr=False)
class KimiLinearConfig(DeepseekV3Config):
    """transformers' KimiLinearConfig: DeepSeek-V3's fields (n_routed_experts written as num_experts, the other
    renamed ones as its attribute_map says) with Kimi Linear's defaults, layer_types, mlp_layer_types and the
    linear layers' sizes."""

    model_type: ClassVar[str] = "kimi_linear"
    attribute_map: ClassVar[dict[str, str]] = {
        "max_position_embeddings": "model_max_length",
        "norm_topk_prob": "moe_renormalize",
        "n_group": "num_expert_group",
        "n_routed_experts": "num_experts",
        "num_experts_per_tok": "num_experts_per_token",
        "n_shared_experts": "num_shared_experts",
    }
    layer_kinds: ClassVar[tuple[str, ...]] = ("full_attention", "linear_attention")
    # DeepSeek-V3's fields transformers' KimiLinearConfig does not have (written only where they say something)
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window", "rope_interleave", "first_k_dense_replace")

    vocab_size: int = 163840
    hidden_size: int = 2304
    intermediate_size: int = 9216
    moe_intermediate_size: int = 1024
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.446
    q_lora_rank: int | None = None
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 163839
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163586
    mlp_layer_types: list[str] | None = None
    linear_head_dim: int = 128
    linear_num_heads: int = 32
    linear_conv_kernel_dim: int = 4

    def __post_init__(self) -> None:
        self._read_linear_attn_config()
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:
            self.layer_types = [
                "full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)
            ]
        k = self.first_k_dense_replace
        if self.mlp_layer_types is None and _is_int(n) and n > 0 and _is_int(k):
            self.mlp_layer_types = ["dense" if i < k else "sparse" for i in range(n)]
        super().__post_init__()

    def _read_linear_attn_config(self) -> None:
        """The Hub's `linear_attn_config` (kept as it is): its sizes, and its 1-based layer lists where
        layer_types is not given."""
        cfg = self.extra.get("linear_attn_config")
        if not isinstance(cfg, dict):
            return
        for ours, theirs in zip(
            _LINEAR_KEYS, ("head_dim", "num_heads", "short_conv_kernel_size"), strict=True
        ):
            setattr(self, ours, cfg.get(theirs, getattr(self, ours)))
        full, kda, n = cfg.get("full_attn_layers"), cfg.get("kda_layers"), self.num_hidden_layers
        if self.layer_types is None and isinstance(full, list) and isinstance(kda, list) and _is_int(n):
            if not all(_is_int(i) and 1 <= i <= n for i in (*full, *kda)):
                raise ConfigError(f"{self.source}: linear_attn_config's full_attn_layers and kda_layers must "
                                  f"number layers 1 to {n}, found {full} and {kda}")  # fmt: skip
            types: list[Any] = [None] * n
            for kind, layers in (("full_attention", full), ("linear_attention", kda)):
                for i in layers:
                    types[i - 1] = kind
            self.layer_types = types

    def validate(self) -> None:
        src = self.source
        for name in _LINEAR_KEYS:
            v = getattr(self, name)
            if not _is_int(v) or not 0 < v <= 1 << 14:
                raise ConfigError(f"{src}: {name} must be a positive integer, found {v!r}")
        super().validate()
        kinds = self.mlp_layer_types
        if (
            not isinstance(kinds, list)
            or len(kinds) != self.num_hidden_layers
            or set(kinds) - {"dense", "sparse"}
        ):
            raise ConfigError(f"{src}: mlp_layer_types must list {self.num_hidden_layers} entries, each 'dense' or "
                              f"'sparse', found {str(kinds)[:200]}")  # fmt: skip
        if self.hidden_act != "silu":  # the linear layers' conv activation is SiLU in autolm
            raise ConfigError(f"{src}: hidden_act must be 'silu' for Kimi Linear, found {self.hidden_act!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_KIMI:
            out.pop(key, None)
        if "num_nextn_predict_layers" not in self.extra:  # DeepSeek-V3's default, not a Kimi Linear key
            out.pop("num_nextn_predict_layers", None)
        return out


class KimiLinearAttention(DeepseekV3Attention):
    """DeepSeek-V3's latent attention with no position encoding: the shared key part is not turned."""

    def turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x


class KimiLinearForgetGate(nn.Module):
    """The per-channel log decay -exp(A_log[h]) * softplus(f_b_proj(f_a_proj(x)) + dt_bias), (B, T, H, d), fp32."""

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        h, d, heads = config.hidden_size, config.linear_head_dim, config.linear_num_heads
        self.head_dim = d
        self.f_a_proj = Linear(h, d, bias=False)
        self.f_b_proj = Linear(d, heads * d, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(heads * d))
        self.A_log = nn.Parameter(torch.zeros(1, 1, heads, 1))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """a: f_a_proj(x) (B, T, d) -> the log decay (B, T, H, d)."""
        g = (self.f_b_proj(a).float() + self.dt_bias.float()).unflatten(-1, (-1, self.head_dim))
        return -self.A_log.float().exp() * F.softplus(g)


class KimiDeltaAttention(Qwen3NextGatedDeltaNet):
    """Qwen3-Next's mixer (its forward: padding zeroed, the conv and its state, the chunked / one-token rule) with
    Kimi's projections, the per-channel decay of `forget_gate` and the sigmoid-gated `o_norm` before `o_proj`."""

    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        nn.Module.__init__(self)
        h, d, heads = config.hidden_size, config.linear_head_dim, config.linear_num_heads
        self.layer_idx = layer_idx
        self.num_k_heads = self.num_v_heads = heads
        self.head_k_dim = self.head_v_dim = d
        self.key_dim = self.value_dim = heads * d
        self.conv_dim = 3 * self.key_dim
        K = config.linear_conv_kernel_dim
        self.q_proj = Linear(h, self.key_dim, bias=False)
        self.k_proj = Linear(h, self.key_dim, bias=False)
        self.v_proj = Linear(h, self.value_dim, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, K, groups=self.conv_dim, bias=False, padding=K - 1
        )
        self.forget_gate = KimiLinearForgetGate(config)
        self.b_proj = Linear(h, heads, bias=False)
        self.g_a_proj = Linear(h, d, bias=False)
        self.g_b_proj = Linear(d, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(d, config.rms_norm_eps, "sigmoid", fp32_weight=True)
        self.o_proj = Linear(self.value_dim, h, bias=False)

    norm = property(lambda self: self.o_norm)  # Qwen3NextGatedDeltaNet.forward's names for them
    out_proj = property(lambda self: self.o_proj)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x -> the conv's input [q; k; v], the output gate (B, T, H, d), b (B, T, H), f_a_proj(x)."""
        B, T, _ = x.shape
        q, k, v, b, ga, fa = packed(
            x, (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.g_a_proj, self.forget_gate.f_a_proj)
        )
        gate = self.g_b_proj(ga).reshape(B, T, -1, self.head_v_dim)
        return torch.cat([q, k, v], dim=-1), gate, b, fa

    def decay(self, a: torch.Tensor) -> torch.Tensor:
        return self.forget_gate(a)


class KimiLinearDecoderLayer(DeepseekV3DecoderLayer):
    """Pre-norm MLA or KDA (`self_attn`, by layer type), then a pre-norm dense MLP or mixture (mlp_layer_types)."""

    def make_attention(self, config: Any, layer_idx: int) -> nn.Module:
        if config.layer_types[layer_idx] == "linear_attention":
            return KimiDeltaAttention(config, layer_idx)
        return KimiLinearAttention(config, layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        return grouped_moe_mlp(config, config.first_k_dense_replace)  # past the dense ones: the mixture


class KimiConvPieces(ConvPieces):
    """The KDA layers' q_conv1d / k_conv1d / v_conv1d pieces of `self_attn.conv1d`."""

    pattern: ClassVar[re.Pattern] = re.compile(r"(.+\.self_attn\.)([qkv])_conv1d\.weight")


class KimiLinearRules(OlmoHybridRules):
    conv: ClassVar[str] = ".self_attn.conv1d.weight"


class KimiLinearForCausalLM(CausalLM):
    """transformers' KimiLinearForCausalLM."""

    config_class = KimiLinearConfig
    recurrent: ClassVar[bool] = True
    checkpoint_rules = KimiLinearRules(
        [
            Rename(r"\.block_sparse_moe\.", ".mlp.", r"\.mlp\.", ".block_sparse_moe."),
            Stacked("gate_up_proj", ("w1.weight", "w3.weight")),
            Stacked("down_proj", ("w2.weight",)),
            Rename(
                r"\.self_attn\.(f_a_proj|f_b_proj|dt_bias|A_log)\b",
                r".self_attn.forget_gate.\1",
                r"\.self_attn\.forget_gate\.",
                ".self_attn.",
            ),
            KimiConvPieces(),
            # llama.cpp's files: stacked experts, exp_probs_b, attn_k_b / attn_v_b, the KDA tensors' transforms
            GGUFExperts(),
            Rename(r"\.gate\.e_score_correction\.bias$", ".gate.e_score_correction_bias", r"(?!)", ""),
            ExpProbsBias(),
            GGUFMla(),
            kimi_linear_gguf.KimiLinearGGUF(),
        ]
    )
    gguf = GGUFLayout(
        "kimi-linear",
        config=kimi_linear_gguf.GGUF_KDA_KEYS,
        layer=(*kimi_linear_gguf.GGUF_KDA, ("attn_q_a", "self_attn.q_a_proj"),
               ("attn_q_a_norm", "self_attn.q_a_layernorm"), ("attn_q_b", "self_attn.q_b_proj"),
               ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"), ("attn_kv_a_norm", "self_attn.kv_a_layernorm"),
               ("attn_k_b", "self_attn.k_b_proj"), ("attn_v_b", "self_attn.v_b_proj"), *GGUF_GROUPED_LAYER),
        fixed=(("attention_bias", False),),
        derive=kimi_linear_gguf.derive,
        write_config=kimi_linear_gguf.write_config,
        bare=("ssm_a",),
    )  # fmt: skip
    # transformers' plan: the dense MLPs, shared experts and experts split; both kinds of attention (MLA and KDA, both
    # `self_attn`: the KDA's gated norm and state run over all its heads) and the router stay whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = {k: v for k, v in GROUPED_MOE_TP.items() if ".mlp." in k}
    _no_split_modules: ClassVar[list[str]] = ["KimiLinearDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def shard_heads(self, world: int) -> None:
        """Every rank runs every head of both kinds of attention (kept whole): nothing to shard."""

    def __init__(self, config: KimiLinearConfig):
        super().__init__(config, MixtralModel(config, KimiLinearDecoderLayer))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        rules = type(self).checkpoint_rules
        self.checkpoint_rules = KimiLinearRules([mla if isinstance(r, GGUFMla) else r for r in rules.rules])
