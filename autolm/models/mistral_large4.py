"""Mistral Large 4 (transformers' mistral_large4; its language model, text_config's model_type mistral_large4_text):
GLM-5's layers (models.glm_moe_dsa: latent attention over the keys a lightning indexer keeps, `indexer_types` "full" /
"shared") without the low-rank query, with Mistral 4's mixture (models.mistral4: softmax router over groups, stacked
experts, shared experts) and these differences.

- The query is q_proj(x) (no q_lora_rank); the indexer's queries are wq_b(q_input_norm(x)) (a LayerNorm of eps 1e-6).
- Softmax scaling: after RoPE, each head's query (the attention's and the indexer's) is multiplied by
  scale_h * log(position + 1) + bias_h (`softmax_scaling.scale` / `.bias`, per head).
- LeRoPE: the rotary frequencies are YaRN's (transformers' default: factor 2048 over 512 tokens, attention_factor 1)
  times exp(`model.rotary_emb.alpha`), a learned buffer (kept in float32).
- NoPE layers: where no_rope_layers[i] is 0 (by default every fourth layer, from `no_rope_layer_interval`), neither
  the attention nor the indexer turns anything: qk_rope_head_dim's features join the nope part (kv_a_proj_with_mqa
  gives the latent alone, kv_b_proj the wider keys).
- KV sharing: a layer whose kv_source_layers entry is an earlier layer has no kv_a_proj_with_mqa / kv_a_layernorm and
  expands that layer's (normed) latent and rotary key with its own kv_b_proj. transformers hands the latent on by
  kind (RoPE or NoPE), the last sharing layer of the kind before it: kv_source_layers must name that layer.
- The router takes its softmax in float32 and always renormalises; the dense MLPs are Qwen 2 MoE's (mlp_layer_types,
  by default first_k_dense_replace = 1 dense layer); the logits are soft-capped at final_logit_softcapping (30).

Each layer's expanded keys and values sit in its own cache layer (as models.deepseek_v3 runs MLA), so a sharing layer
caches what it computes from its source's latent. The released checkpoints are image-text (mistral_large4: a Pixtral
tower, skipped); Mistral's own tensor names (`layers.N.attention.wq`, `experts.E.w1`, `lerope.alpha`, ...) read as
transformers' conversion mapping renames them. llama.cpp has no architecture for it (no GGUF).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GatedMLP,
    Ignored,
    Linear,
    Rename,
    RMSNorm,
    Rotary,
    SparseMoeBlock,
    Stacked,
)
from ..nn.rope import cos_sin, inv_freq_and_scale
from .deepseek_v32 import DSAIndexer, IndexedCausalLM
from .gemma2 import softcap
from .glm4_moe import GROUPED_MOE_TP
from .glm_moe_dsa import GlmMoeDsaAttention, GlmMoeDsaConfig, GlmMoeDsaDecoderLayer
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .ministral3 import rope_as_given
from .mistral4 import Mistral4TopkRouter
from .mixtral import MixtralModel

LOG_POS = "log_position"  # the rope tables' entry of log(position + 1), (B, 1, T, 1)
_FORCED = {
    "q_lora_rank": None,
    "norm_topk_prob": True,
    "mlp_bias": False,
}  # fields transformers' config drops


# Mistral's names (as transformers 5 writes the image-text checkpoint: its conversion mapping's) -> transformers'
_TOP = (
    ("tok_embeddings.", "model.embed_tokens."),
    ("lerope.alpha", "model.rotary_emb.alpha"),
    ("norm.", "model.norm."),
    ("output.", "lm_head."),
)
_LAYER = (("attention.wq.", "self_attn.q_proj."), ("attention.wkv_a_with_mqa.", "self_attn.kv_a_proj_with_mqa."),
          ("attention.wkv_b.", "self_attn.kv_b_proj."), ("attention.wo.", "self_attn.o_proj."),
          ("attention.kv_a_norm.", "self_attn.kv_a_layernorm."),
          ("attention.ssmax_scaling.s", "self_attn.softmax_scaling.scale"),
          ("attention.ssmax_scaling.b", "self_attn.softmax_scaling.bias"),
          ("attention.indexer.ssmax_scaling.s", "self_attn.indexer.softmax_scaling.scale"),
          ("attention.indexer.ssmax_scaling.b", "self_attn.indexer.softmax_scaling.bias"),
          ("attention.indexer.", "self_attn.indexer."), ("attention_norm.", "input_layernorm."),
          ("ffn_norm.", "post_attention_layernorm."), ("feed_forward.w1.", "mlp.gate_proj."),
          ("feed_forward.w2.", "mlp.down_proj."), ("feed_forward.w3.", "mlp.up_proj."),
          ("shared_experts.w1.", "mlp.shared_experts.gate_proj."), ("shared_experts.w2.", "mlp.shared_experts.down_proj."),
          ("shared_experts.w3.", "mlp.shared_experts.up_proj."), ("gate.", "mlp.gate."), ("experts.", "mlp.experts."))  # fmt: skip


def _rename(ours: str, theirs: str, layer: bool) -> Rename:
    """Mistral's name `ours` <-> transformers' `theirs`, both ways (a whole name where it ends without a dot)."""
    end = "" if ours.endswith(".") else "$"
    if not layer:
        return Rename(f"^{re.escape(ours)}{end}", theirs, f"^{re.escape(theirs)}{end}", ours)
    return Rename(rf"^layers\.(\d+)\.{re.escape(ours)}{end}", rf"model.layers.\1.{theirs}",
                  rf"^model\.layers\.(\d+)\.{re.escape(theirs)}{end}", rf"layers.\1.{ours}")  # fmt: skip


ORIGINAL_RULES = (
    *(_rename(a, b, False) for a, b in _TOP),
    *(_rename(a, b, True) for a, b in _LAYER),
    Stacked("gate_up_proj", ("w1.weight", "w3.weight")),
    Stacked("down_proj", ("w2.weight",)),
    Ignored(r"(patch_merger|pre_mm_projector_norm|vision_language_adapter)\..+"),
)


def _default_rope(max_position_embeddings: int) -> dict[str, Any]:
    """transformers' MistralLarge4TextConfig RoPE where the config gives none."""
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2048.0, "original_max_position_embeddings": 512,
            "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}  # fmt: skip


@dataclass(repr=False)
class MistralLarge4TextConfig(GlmMoeDsaConfig):
    """transformers' MistralLarge4TextConfig: GLM-5's fields without q_lora_rank, mlp_bias and norm_topk_prob (kept as
    given, unused), plus no_rope_layers, kv_source_layers and final_logit_softcapping (module docstring)."""

    model_type: ClassVar[str] = "mistral_large4_text"
    absent_keys: ClassVar[tuple[str, ...]] = (*GlmMoeDsaConfig.absent_keys, *_FORCED)

    vocab_size: int = 204800
    hidden_size: int = 6144
    intermediate_size: int = 24576
    moe_intermediate_size: int = 6144
    num_hidden_layers: int = 72
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 64
    n_routed_experts: int = 128
    routed_scaling_factor: float = 1.0
    q_lora_rank: int | None = None
    v_head_dim: int = 128
    qk_nope_head_dim: int = 64
    num_experts_per_tok: int = 4
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 1048576
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    index_n_heads: int = 32
    no_rope_layers: list[int] | None = None
    kv_source_layers: list[int] | None = None
    final_logit_softcapping: float = 30.0
    rope_parameters: dict[str, Any] = field(default_factory=lambda: _default_rope(1048576))

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        base = super().read_rope
        return rope_as_given(d, cls.max_position_embeddings, _default_rope, lambda: base(d, source))

    def __post_init__(self) -> None:
        for name, value in _FORCED.items():  # transformers' model never reads them: kept as given, unused
            if getattr(self, name) != value:
                self.extra[name] = getattr(self, name)
            setattr(self, name, value)
        n = self.num_hidden_layers
        interval = self.extra.pop("no_rope_layer_interval", 4)
        if self.no_rope_layers is None and _is_int(n) and _is_int(interval) and interval > 0:
            self.no_rope_layers = [int((i + 1) % interval != 0) for i in range(n)]
        if self.kv_source_layers is None and _is_int(n):
            self.kv_source_layers = list(range(n))
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if "num_nextn_predict_layers" not in self.extra:
            out.pop("num_nextn_predict_layers", None)  # DeepSeek-V3's, not transformers' Mistral Large 4's
        return out

    def kv_source(self, i: int) -> int | None:
        """The layer whose latent layer i expands (None: its own)."""
        return None if self.kv_source_layers[i] == i else self.kv_source_layers[i]

    def validate(self) -> None:
        self.q_lora_rank = 1  # GLM-5's checks ask for the low-rank query, which this model has not
        try:
            super().validate()
        finally:
            self.q_lora_rank = None
        src, n = self.source, self.num_hidden_layers
        cap = self.final_logit_softcapping
        if not _is_number(cap) or cap <= 0:
            raise ConfigError(f"{src}: final_logit_softcapping must be a positive number, found {cap!r}")
        rope = self.no_rope_layers
        if not isinstance(rope, list) or len(rope) < n or any(r not in (0, 1) for r in rope[:n]):
            raise ConfigError(f"{src}: no_rope_layers must give 1 (RoPE) or 0 (NoPE) for each of the {n} layers, "
                              f"found {rope!r}")  # fmt: skip
        self._validate_sharing()

    def _validate_sharing(self) -> None:
        """kv_source_layers: one entry per layer, each its own or an earlier owning layer, the last sharing layer of
        its kind (RoPE / NoPE) before it (the one whose latent transformers hands on)."""
        src, n, kv = self.source, self.num_hidden_layers, self.kv_source_layers
        if not isinstance(kv, list) or len(kv) != n or not all(_is_int(s) for s in kv):
            raise ConfigError(f"{src}: kv_source_layers must give a layer index for each of the {n} layers, found "
                              f"{kv!r}")  # fmt: skip
        producers = [j for j in range(n) if j in kv[j + 1 :]]
        for i, s in enumerate(kv):
            if not 0 <= s <= i or kv[s] != s:
                raise ConfigError(f"{src}: kv_source_layers[{i}] is {s}: a layer shares the latent KV of an "
                                  "earlier layer that owns its own")  # fmt: skip
            kind = [j for j in producers if j < i and self.no_rope_layers[j] == self.no_rope_layers[i]]
            if s != i and kind[-1:] != [s]:
                raise ConfigError(f"{src}: kv_source_layers[{i}] is {s}, but layer {i} reads the latent of the last "
                                  f"sharing layer of its kind (RoPE or NoPE, no_rope_layers) before it, "
                                  f"{kind[-1] if kind else None}")  # fmt: skip


class MistralLarge4Config(ImageTextConfig):
    """transformers' MistralLarge4Config (MistralLarge4ForConditionalGeneration): its language model's; the head
    untied unless the outer config ties it."""

    model_type: ClassVar[str] = "mistral_large4"
    text_class: ClassVar[type] = MistralLarge4TextConfig
    tie_default: ClassVar[bool | None] = False


class LeRotary(Rotary):
    """The RoPE tables with the frequencies times exp(alpha) (the body's `rotary_emb.alpha`), plus LOG_POS."""

    def __init__(self, config: MistralLarge4TextConfig, alpha: nn.Module):
        super().__init__(config.rope_kinds(), config.head_dim, config.max_position_embeddings)
        self.holder = [alpha]  # unregistered: the body registers it as rotary_emb
        self.kinds = {**self.kinds, LOG_POS: {}}

    def tables(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        inv_freq, scale = inv_freq_and_scale(self.kinds["default"], self.head_dim, self.max_pos, None)
        alpha = self.holder[0].alpha.to(position_ids.device, torch.float32)
        cos, sin = cos_sin(position_ids, inv_freq.to(position_ids.device) * alpha.exp(), scale, dtype)
        log = (position_ids + 1).float().log()[:, None, :, None].to(dtype)
        return {"default": (cos.unsqueeze(1), sin.unsqueeze(1)), LOG_POS: (log, log)}


class RotaryAlpha(nn.Module):
    """transformers' rotary_emb: only its learned `alpha` (rotary_dim / 2) is a tensor of the checkpoint."""

    def __init__(self, half: int):
        super().__init__()
        self.register_buffer("alpha", torch.zeros(half, dtype=torch.float32))


class SoftmaxScaling(nn.Module):
    """Each head's queries times scale_h * log(position + 1) + bias_h (in the queries' dtype)."""

    def __init__(self, heads: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(heads))
        self.bias = nn.Parameter(torch.ones(heads))

    def forward(self, q: torch.Tensor, ctx) -> torch.Tensor:
        """q (B, heads, T, d)."""
        log = ctx.rope[LOG_POS][0].to(q.dtype)  # (B, 1, T, 1)
        return q * (self.scale.to(q.dtype)[:, None, None] * log + self.bias.to(q.dtype)[:, None, None])


class MistralLarge4Indexer(DSAIndexer):
    """GLM-5's indexer on wq_b(q_input_norm(x)), its queries softmax-scaled; no RoPE in a NoPE layer."""

    interleaved: ClassVar[bool] = True

    def __init__(self, config: MistralLarge4TextConfig, layer_idx: int, slot: int):
        super().__init__(config, layer_idx, slot)
        self.q_input_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.softmax_scaling = SoftmaxScaling(self.n_heads)
        self.use_rope = bool(config.no_rope_layers[layer_idx])

    @staticmethod
    def query_width(config: Any) -> int:
        return config.hidden_size

    def turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return super().turn(x, cos, sin) if self.use_rope else x

    def queries(self, q_resid: torch.Tensor, ctx) -> torch.Tensor:
        return self.softmax_scaling(super().queries(self.q_input_norm(q_resid), ctx), ctx)


class MistralLarge4Attention(GlmMoeDsaAttention):
    """GLM-5's indexed latent attention with q_proj, softmax scaling, NoPE layers and KV sharing (`kv_source` holds
    the source layer's attention, unregistered; a source keeps its last latent in `latent` for the layers after)."""

    indexer_class: ClassVar[type[DSAIndexer]] = MistralLarge4Indexer

    def __init__(self, config: MistralLarge4TextConfig, layer_idx: int, slot: int):
        super().__init__(config, layer_idx, slot)
        c, h, nh = config, config.hidden_size, config.num_attention_heads
        if not c.no_rope_layers[layer_idx]:
            self.nope, self.rope_dim = self.qk_dim, 0
        self.kv_b_proj = Linear(c.kv_lora_rank, nh * (self.nope + self.v_dim), bias=False)
        shared = c.kv_source(layer_idx) is not None
        self.kv_a_proj_with_mqa = (
            None if shared else Linear(h, c.kv_lora_rank + self.rope_dim, bias=c.attention_bias)
        )
        self.kv_a_layernorm = None if shared else RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.softmax_scaling = SoftmaxScaling(nh)
        self.kv_source: list[MistralLarge4Attention] = []
        self.latent: tuple[torch.Tensor, torch.Tensor] | None = None
        self.keeps_latent = False  # whether a later layer reads this one's latent

    def keep(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.indexer is None:
            return self.source[0].kept.to(x.device)
        self.kept = self.indexer(x, x, ctx)
        return self.kept

    def compressed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normed latent (B, T, kv_lora_rank), the rotary key (B, 1, T, rope_dim), unturned): this layer's, or
        its source's."""
        if self.kv_source:
            latent, k_pe = self.kv_source[0].latent
            return latent.to(x.device), k_pe.to(x.device)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split((self.kv_rank, self.rope_dim), dim=-1)
        out = self.kv_a_layernorm(latent), k_pe.unsqueeze(1)
        self.latent = out if self.keeps_latent else None
        return out

    def heads(self, x: torch.Tensor, q: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hd = self.num_heads, self.head_dim
        q_nope, q_pe = q.view(B, T, nh, self.qk_dim).transpose(1, 2).split((self.nope, self.rope_dim), dim=-1)
        latent, k_pe = self.compressed(x)
        kv = self.kv_b_proj(latent).view(B, T, nh, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)
        if self.rope_dim:
            cos, sin = ctx.rope[self.rope]
            q_pe, k_pe = self.turn(q_pe, cos, sin), self.turn(k_pe, cos, sin)
        q = self.softmax_scaling(torch.cat((q_nope, q_pe), dim=-1), ctx)
        k = torch.cat((k_nope, k_pe.expand(B, nh, T, self.rope_dim)), dim=-1)
        q, k, v = (nn.functional.pad(t, (0, hd - t.shape[-1])) for t in (q, k, v))
        y = ctx.attend(self.layer_idx, q, k, v, None, self.scaling)  # (B, T, nh, hd)
        return y[..., : self.v_dim].reshape(B, T, nh * self.v_dim)


class MistralLarge4Router(Mistral4TopkRouter):
    """Mistral 4's router in float32, always renormalised (transformers' MistralLarge4TextTopkRouter)."""

    def __init__(self, config: MistralLarge4TextConfig):
        super().__init__(config)
        self.normalize = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x.float())


class MistralLarge4DecoderLayer(GlmMoeDsaDecoderLayer):
    """Pre-norm indexed (or sharing) MLA, then a pre-norm dense MLP or Mistral 4's mixture (mlp_layer_types)."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return MistralLarge4Attention(config, layer_idx, config.num_hidden_layers + layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act = config.hidden_size, config.hidden_act
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(h, config.intermediate_size, act)
        experts = Experts(config.n_routed_experts, h, config.moe_intermediate_size, act)
        shared = GatedMLP(h, config.moe_intermediate_size * config.n_shared_experts, act)
        return SparseMoeBlock(MistralLarge4Router(config), experts, shared_experts=shared)


class MistralLarge4Model(MixtralModel):
    def __init__(self, config: MistralLarge4TextConfig):
        super().__init__(config, MistralLarge4DecoderLayer)
        self.rotary_emb = RotaryAlpha(config.head_dim // 2)
        self.rotary = LeRotary(config, self.rotary_emb)


class MistralLarge4ForCausalLM(IndexedCausalLM):
    """The language model of transformers' MistralLarge4ForConditionalGeneration (transformers has no causal LM class
    of the text model: its MistralLarge4TextModel is the body, without the head)."""

    config_class = MistralLarge4TextConfig
    # the image-text checkpoints' language model under transformers' names or Mistral's (ORIGINAL_RULES: as
    # transformers writes it, and as autolm saves it); the multi-token prediction draft head skipped, as transformers
    checkpoint_rules = CheckpointRules([*IMAGE_TEXT_RULES, *ORIGINAL_RULES, Ignored(r"mtp_dspark\..*")])
    # transformers' plan: the dense and shared MLPs split as Llama's (nn.Experts cuts the routed experts' rows itself);
    # the attention runs whole on every rank (its per-head softmax scaling and the shared latents are not split)
    tp_patterns: ClassVar[dict[str, str]] = {k: s for k, s in GROUPED_MOE_TP.items() if ".mlp." in k}
    tp_divides: ClassVar[tuple[str, ...]] = ("intermediate_size", "moe_intermediate_size")
    _no_split_modules: ClassVar[list[str]] = ["MistralLarge4DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["rotary_emb", "mlp.gate.weight"]  # as transformers

    def __init__(self, config: MistralLarge4TextConfig):
        super().__init__(config, MistralLarge4Model(config))
        attns = [layer.self_attn for layer in self.model.layers]
        full = None
        for i, attn in enumerate(attns):
            if attn.indexer is None:
                attn.source.append(full)
            else:
                full = attn
            s = config.kv_source(i)
            if s is not None:
                attns[s].keeps_latent = True
                attn.kv_source.append(attns[s])

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap(logits, self.config.final_logit_softcapping)

    def shard_heads(self, world: int) -> None:
        """Every rank runs every head (the attention is kept whole): nothing to shard."""
