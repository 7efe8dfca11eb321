"""dots3 Note (transformers' dots3_note; text model_type "dots3_note_text"): DeepSeek-V3's layers (models.deepseek_v3:
Multi-head Latent Attention with the low-rank query, RoPE over interleaved pairs; the grouped sigmoid-routed experts
with shared experts, dense layers by `mlp_layer_types`) with three kinds of attention layer by `layer_types`:
"indexed_attention" (DeepSeek Sparse Attention: GLM-5's lightning indexer, models.glm_moe_dsa, keeps the top
`index_topk` keys of each query), "sliding_attention" (a window of `sliding_window` keys, no indexer) and
"full_attention" (plain causal; the released files' use_dsa=false).

The attention differs from DeepSeek-V3's in four ways: the normed low-rank query and key/value latents are scaled by
sqrt(hidden_size / rank) (q_lora_rank, kv_lora_rank; the indexer reads the scaled query latent too), the shared RoPE
key is RMS-normed (`k_rope_only_layernorm`) before it turns, the heads' outputs are gated per head by
sigmoid(`g_proj`(x)) before o_proj, and the scores are scaled by qk_head_dim ** -0.5 only. Every RMSNorm (the two
latent norms included) uses rms_norm_eps. The sliding layers have MLA sizes of their own (`per_layer_config`: heads,
ranks, head sizes) and RoPE tables of their own (rope_parameters by layer type, each turning that kind's
qk_rope_head_dim features). The shared experts are `shared_experts_intermediate_size` * n_shared_experts wide.

config.json as the released files spell it (swa_* sizes, sliding_window_size, use_dsa, use_sliding_window,
first_k_dense_replace / moe_layer_freq, moe_shared_expert_intermediate_size, rope_theta / swa_rope_theta) is read as
transformers reads it: layer_types (layers 0, 1 and every fourth from 1 full / indexed, the rest sliding),
per_layer_config for the sliding layers, rope_parameters by type. The image-text wrapper ("dots3_note") holds the
language model's settings at its top level (or as text_config); its files' vision and audio towers and multi-token
prediction layer are skipped. GGUF as llama.cpp's "dots3note" (models.dots3_note_gguf).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, Experts, GatedMLP, GroupedRouter, Ignored, Linear, RMSNorm, SparseMoeBlock
from . import dots3_note_gguf
from .deepseek_v3 import DeepseekV3Attention, DeepseekV3Config, DeepseekV3ForCausalLM
from .deepseek_v32 import IndexedCausalLM
from .gemma4 import Gemma4Rotary
from .glm4_moe import GROUPED_MOE_RULES
from .glm_moe_dsa import GlmMoeDsaIndexer
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .mixtral import MixtralDecoderLayer, MixtralModel
from .qwen4_exp_qsa import MaskedContext

KINDS = ("indexed_attention", "sliding_attention", "full_attention")
MLA_KEYS = ("num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "head_dim",
            "qk_nope_head_dim", "v_head_dim", "qk_rope_head_dim")  # fmt: skip
# the released files' sliding-layer sizes (swa_<key>) where they leave them out, as transformers
SWA_DEFAULTS = dict(num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1024, kv_lora_rank=1024,
                    head_dim=256, qk_nope_head_dim=192, v_head_dim=128)  # fmt: skip
DEFAULT_THETA, SWA_THETA = 80_000_000.0, 50_000.0


def _released(d: dict[str, Any]) -> dict[str, Any]:
    """The released files' spelling read as transformers' Dots3NoteTextConfig reads it (module docstring)."""
    d = dict(d)
    n = d.get("num_hidden_layers", 46)
    first, freq = d.pop("first_k_dense_replace", 1), d.pop("moe_layer_freq", 1)
    use_dsa = d.pop("use_dsa", None if "per_layer_config" in d else True)
    use_swa = d.pop("use_sliding_window", True)
    if "moe_shared_expert_intermediate_size" in d:
        d["shared_experts_intermediate_size"] = d.pop("moe_shared_expert_intermediate_size")
    if d.get("sliding_window") is None:
        d["sliding_window"] = d.pop("sliding_window_size", 512)
    if not (_is_int(n) and _is_int(first) and (_is_int(freq) or isinstance(freq, list))):
        return d
    if d.get("mlp_layer_types") is None:
        sparse = [bool(freq[i]) if isinstance(freq, list) else i % freq == 0 for i in range(n)]
        d["mlp_layer_types"] = ["sparse" if i >= first and sparse[i] else "dense" for i in range(n)]
    if d.get("layer_types") is None:
        full = "full_attention" if use_dsa is False else "indexed_attention"
        d["layer_types"] = [full if not use_swa or i < 2 or i % 4 == 1 else "sliding_attention"
                            for i in range(n)]  # fmt: skip
    types = list(d["layer_types"])
    if use_dsa is not None:
        old, new = ("full_attention", "indexed_attention") if use_dsa else ("indexed_attention", "full_attention")  # fmt: skip
        types = [new if t == old else t for t in types]
    d["layer_types"] = types
    swa = {k: d.pop(f"swa_{k}", v) for k, v in SWA_DEFAULTS.items()}
    swa["qk_rope_head_dim"] = d.pop("swa_qk_rope_head_dim", swa["head_dim"] - swa["qk_nope_head_dim"])
    if d.get("per_layer_config") is None:
        d["per_layer_config"] = {str(i): dict(swa) for i, t in enumerate(types) if t == "sliding_attention"}
    _rope_by_type(d, types)
    return d


def _rope_by_type(d: dict[str, Any], types: list) -> None:
    """rope_parameters by layer type, as transformers' convert_rope_params_to_dict (partial_rotary_factor set later
    from each kind's sizes)."""
    swa_theta, theta = d.pop("swa_rope_theta", SWA_THETA), d.pop("rope_theta", DEFAULT_THETA)
    rope = d.get("rope_parameters")
    if rope is None:
        rope = d.pop("rope_scaling", None) or {t: {"rope_type": "default", "rope_theta": swa_theta if
                                                    t == "sliding_attention" else theta} for t in set(types) if t in KINDS}  # fmt: skip
    else:
        d.pop("rope_scaling", None)
    if isinstance(rope, dict) and not any(isinstance(v, dict) for v in rope.values()):
        rope = {t: dict(rope) for t in set(types) if t in KINDS}
    for params in rope.values() if isinstance(rope, dict) else ():
        if isinstance(params, dict):
            params.setdefault("rope_type", params.pop("type", "default"))
            params.setdefault("rope_theta", theta)
    d["rope_parameters"] = rope


@dataclass(repr=False)
class Dots3NoteTextConfig(DeepseekV3Config, dots3_note_gguf.GGUFCompared):
    """transformers' Dots3NoteTextConfig: its fields and defaults (dots3 Note's sizes); `layer_config(i)` is layer
    i's MLA sizes (per_layer_config over the top-level ones)."""

    model_type: ClassVar[str] = "dots3_note_text"
    absent_keys: ClassVar[tuple[str, ...]] = ("first_k_dense_replace", "rope_interleave")
    layer_kinds: ClassVar[tuple[str, ...]] = KINDS
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("first_k_dense_replace", "head_dim", "per_layer_config")

    vocab_size: int = 152064
    hidden_size: int = 5120
    intermediate_size: int = 13824
    moe_intermediate_size: int = 1536
    num_hidden_layers: int = 46
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1024
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 524288
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 151659
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151668
    mlp_layer_types: list[str] | None = None
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 64
    mlp_bias: bool = False  # transformers' field, unused by its model
    head_dim: int | None = 256
    sliding_window: int | None = 512
    shared_experts_intermediate_size: int = 1536
    per_layer_config: dict[str, dict[str, Any]] | None = None
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {
        "indexed_attention": {"rope_type": "default", "rope_theta": DEFAULT_THETA},
        "sliding_attention": {"rope_type": "default", "rope_theta": SWA_THETA}})  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Dots3NoteTextConfig:  # fmt: skip
        if not isinstance(d, dict):
            return super().from_dict(d, source, **overrides)
        return super().from_dict(_released({**d, **overrides}), source)

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        given = d.get("rope_parameters")
        if not isinstance(given, dict) or not given or set(given) - set(KINDS):
            raise ConfigError(f"{source}: rope_parameters must be an object by layer type ({', '.join(KINDS)}), "
                              f"found {str(given)[:100]}")  # fmt: skip
        kinds = {}
        for kind, params in given.items():
            if not isinstance(params, dict):
                raise ConfigError(f"{source}: rope_parameters[{kind!r}] must be an object, found {params!r}")
            inner = {"rope_parameters": params, "max_position_embeddings": d.get("max_position_embeddings")}
            kinds[kind], _ = super().read_rope(inner, source)
        return kinds, "v5"

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if _is_int(n) and n > 0 and (self.layer_types is None or self.mlp_layer_types is None):
            filled = _released({"num_hidden_layers": n, "first_k_dense_replace": self.first_k_dense_replace,
                                "layer_types": self.layer_types, "mlp_layer_types": self.mlp_layer_types,
                                "per_layer_config": self.per_layer_config, "use_dsa": None})  # fmt: skip
            self.layer_types, self.mlp_layer_types = filled["layer_types"], filled["mlp_layer_types"]
            if self.per_layer_config is None:
                self.per_layer_config = filled["per_layer_config"]
        self.per_layer_config = self.per_layer_config or {}
        if isinstance(self.rope_parameters, dict) and isinstance(self.layer_types, list):
            present = set(self.layer_types) & set(self.rope_parameters)
            if present == set(self.layer_types):  # the kinds no layer has dropped, as transformers keeps them
                self.rope_parameters = {k: v for k, v in self.rope_parameters.items() if k in present}
        self.extra.pop("qk_head_dim", None)
        self.rope_interleave = True
        PretrainedConfig.__post_init__(self)

    def layer_config(self, i: int) -> SimpleNamespace:
        """Layer i's MLA sizes: per_layer_config's entry for it over the top-level fields."""
        entry = self.per_layer_config.get(str(i), self.per_layer_config.get(i, {}))
        return SimpleNamespace(**{k: entry.get(k, getattr(self, k)) for k in MLA_KEYS})

    def layer_overrides(self) -> dict[str, dict[str, Any]]:
        """per_layer_config as transformers writes it: each layer's sizes that differ from the top-level ones, keyed
        by the layer index zero-padded to the widest one's digits."""
        entries = {int(k): {n: v for n, v in e.items() if v != getattr(self, n)}
                   for k, e in self.per_layer_config.items()}  # fmt: skip
        entries = {i: e for i, e in sorted(entries.items()) if e}
        width = len(str(max(entries, default=0)))
        return {str(i).zfill(width): e for i, e in entries.items()}

    def kind_layers(self) -> dict[str, int]:
        """Each layer kind present -> its first layer (whose sizes the kind's RoPE takes, as transformers')."""
        types = self.layer_types[: self.num_hidden_layers]
        return {t: types.index(t) for t in dict.fromkeys(types)}

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        """The RoPE tables by kind ("default" for the indexed layers, which the indexer reads by that name)."""
        return {rope_name(t): self.rope_parameters[t] for t in self.kind_layers() if t in self.rope_parameters}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("qk_head_dim")
        if "num_nextn_predict_layers" not in self.extra:
            out.pop("num_nextn_predict_layers")
        out["per_layer_config"] = self.layer_overrides()
        rope = {}
        for kind, params in self.rope_parameters.items():
            i = self.kind_layers().get(kind)
            c = self.layer_config(i) if i is not None else self
            rope[kind] = {**params, "partial_rotary_factor": c.qk_rope_head_dim / c.head_dim}
        out["rope_parameters"] = rope
        return out

    def validate(self) -> None:
        src, n, plc = self.source, self.num_hidden_layers, self.per_layer_config
        if not isinstance(plc, dict) or any(not isinstance(v, dict) or set(v) - set(MLA_KEYS) or not str(k).isdigit()
                                            or int(k) >= n for k, v in plc.items()):  # fmt: skip
            raise ConfigError(f"{src}: per_layer_config must map layer indices below {n} to objects of "
                              f"{MLA_KEYS}, found {str(plc)[:200]}")  # fmt: skip
        super().validate()
        types = self.mlp_layer_types
        if not isinstance(types, list) or len(types) < n or set(types[:n]) - {"dense", "sparse"}:
            raise ConfigError(f"{src}: mlp_layer_types must list 'dense' or 'sparse' for each of the {n} layers, "
                              f"found {str(types)[:200]}")  # fmt: skip
        if set(self.kind_layers()) - set(self.rope_parameters):
            raise ConfigError(
                f"{src}: rope_parameters has no entry for the {self.kind_layers()} layers' kinds"
            )
        for i in range(n):
            self._validate_layer(i)
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ConfigError(f"{src}: sliding_window must be a positive integer with sliding_attention layers")  # fmt: skip

    def _validate_layer(self, i: int) -> None:
        src, c, kind = self.source, self.layer_config(i), self.layer_types[i]
        for k in MLA_KEYS:
            v = getattr(c, k)
            if not _is_int(v) or not 0 < v <= 1 << 17:
                raise ConfigError(f"{src}: per_layer_config: layer {i}'s {k} must be a positive integer, found {v!r}")  # fmt: skip
        if c.num_key_value_heads != c.num_attention_heads:
            raise ConfigError(f"{src}: per_layer_config: layer {i}'s num_key_value_heads must equal its "
                              "num_attention_heads (MLA)")  # fmt: skip
        if c.qk_rope_head_dim % 2:
            raise ConfigError(f"{src}: per_layer_config: layer {i}'s qk_rope_head_dim must be even")
        first = self.kind_layers()[kind]
        if vars(c) != vars(self.layer_config(first)):
            raise ConfigError(f"{src}: per_layer_config: layer {i}'s sizes must be those of layer {first}, the first "
                              f"{kind} layer (transformers' layers of a kind share them)")  # fmt: skip
        if kind == "sliding_attention" and c.head_dim != c.qk_nope_head_dim + c.qk_rope_head_dim:
            raise ConfigError(f"{src}: per_layer_config: sliding layer {i}'s head_dim must equal qk_nope_head_dim + "
                              "qk_rope_head_dim")  # fmt: skip
        if kind == "indexed_attention" and c.qk_rope_head_dim > self.index_head_dim:
            raise ConfigError(f"{src}: index_head_dim ({self.index_head_dim}) must be at least qk_rope_head_dim "
                              f"({c.qk_rope_head_dim})")  # fmt: skip


def rope_name(kind: str) -> str:
    return "default" if kind == "indexed_attention" else kind


class Dots3NoteConfig(ImageTextConfig):
    """transformers' Dots3NoteConfig (image-text-audio): its language model's, Dots3NoteTextConfig, from text_config
    or (the released files) from the top-level keys; the head untied unless the outer config says otherwise."""

    model_type: ClassVar[str] = "dots3_note"
    text_class: ClassVar[type] = Dots3NoteTextConfig
    tie_default: ClassVar[bool | None] = False
    OUTER: ClassVar[tuple[str, ...]] = ("vision_config", "audio_config", "image_token_id", "video_token_id",
                                        "audio_token_id", "model_type", "architectures", "text_config")  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        if isinstance(d, dict) and d.get("text_config") is None:
            d = {**d, "text_config": {k: v for k, v in d.items() if k not in cls.OUTER}}
        return super().from_dict(d, source, **overrides)


class Dots3NoteAttention(DeepseekV3Attention):
    """dots3 Note's latent attention (module docstring): indexed, sliding or full by the layer's kind."""

    def __init__(self, config: Dots3NoteTextConfig, layer_idx: int):
        nn.Module.__init__(self)
        c, h, kind = config.layer_config(layer_idx), config.hidden_size, config.layer_types[layer_idx]
        nh, bias = c.num_attention_heads, config.attention_bias
        self.nope, self.rope_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_dim, self.kv_rank = c.v_head_dim, c.kv_lora_rank
        self.qk_dim = self.nope + self.rope_dim
        self.layer_idx, self.num_heads, self.num_kv_heads = layer_idx, nh, nh
        self.head_dim = max(self.qk_dim, self.v_dim)
        self.scaling = self.qk_dim**-0.5
        self.sliding_window = config.sliding_window if kind == "sliding_attention" else None
        self.rope, self.softcap, self.qk_norm, self.rope_interleaved = rope_name(kind), None, None, True
        self.q_lora_rank, eps = c.q_lora_rank, config.rms_norm_eps
        self.q_scale, self.kv_scale = (h / c.q_lora_rank) ** 0.5, (h / c.kv_lora_rank) ** 0.5
        self.q_a_proj = Linear(h, c.q_lora_rank, bias=bias)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps)
        self.q_b_proj = Linear(c.q_lora_rank, nh * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, c.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(nh * self.v_dim, h, bias=bias)
        self.k_rope_only_layernorm = RMSNorm(self.rope_dim, eps)
        self.g_proj = Linear(h, nh, bias=False)
        indexed = SimpleNamespace(hidden_size=h, q_lora_rank=c.q_lora_rank, qk_rope_head_dim=self.rope_dim,
                                  index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim,
                                  index_topk=config.index_topk)  # fmt: skip
        slot = config.num_hidden_layers + layer_idx
        self.indexer = GlmMoeDsaIndexer(indexed, layer_idx, slot) if kind == "indexed_attention" else None

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hd = self.num_heads, self.head_dim
        q_resid = self.q_a_layernorm(self.q_a_proj(x)) * self.q_scale
        q = self.q_b_proj(q_resid).view(B, T, nh, self.qk_dim).transpose(1, 2)
        q_nope, q_pe = q.split((self.nope, self.rope_dim), dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split((self.kv_rank, self.rope_dim), dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent) * self.kv_scale)
        kv = kv.view(B, T, nh, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)
        cos, sin = ctx.rope[self.rope]
        k_pe = self.k_rope_only_layernorm(k_pe.view(B, 1, T, self.rope_dim))
        q_pe, k_pe = self.turn(q_pe, cos, sin), self.turn(k_pe, cos, sin)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(B, nh, T, self.rope_dim)), dim=-1)
        if hd > self.qk_dim:
            q, k = F.pad(q, (0, hd - self.qk_dim)), F.pad(k, (0, hd - self.qk_dim))
        if hd > self.v_dim:
            v = F.pad(v, (0, hd - self.v_dim))
        if self.indexer is not None:
            ctx = MaskedContext(ctx, self.indexer(x, q_resid, ctx))
        y = ctx.attend(self.layer_idx, q, k, v, self.sliding_window, self.scaling)  # (B, T, nh, hd)
        y = y[..., : self.v_dim] * torch.sigmoid(self.g_proj(x)).unsqueeze(-1).to(y.dtype)
        return self.o_proj(y.reshape(B, T, nh * self.v_dim))


class Dots3NoteDecoderLayer(MixtralDecoderLayer):
    """Pre-norm latent attention, then a pre-norm dense MLP or the grouped mixture with shared experts."""

    def make_attention(self, config: Any, layer_idx: int) -> nn.Module:
        return Dots3NoteAttention(config, layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act = config.hidden_size, config.hidden_act
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(h, config.intermediate_size, act)
        router = GroupedRouter(h, config.n_routed_experts, config.num_experts_per_tok, n_group=config.n_group,
                               topk_group=config.topk_group, normalize=config.norm_topk_prob,
                               scaling=float(config.routed_scaling_factor))  # fmt: skip
        experts = Experts(config.n_routed_experts, h, config.moe_intermediate_size, act)
        shared = GatedMLP(h, config.shared_experts_intermediate_size * config.n_shared_experts, act)
        return SparseMoeBlock(router, experts, shared_experts=shared)


class Dots3NoteModel(MixtralModel):
    """The body; RoPE tables by kind, each as wide as that kind's qk_rope_head_dim."""

    def __init__(self, config: Dots3NoteTextConfig):
        super().__init__(config, Dots3NoteDecoderLayer)
        layers = config.kind_layers()
        kinds = {rope_name(k): {**config.rope_parameters[k], "partial_rotary_factor": 1.0} for k in layers}
        dims = {rope_name(k): config.layer_config(i).qk_rope_head_dim for k, i in layers.items()}
        self.rotary = Gemma4Rotary(kinds, dims, config.max_position_embeddings)


class Dots3NoteForCausalLM(IndexedCausalLM):
    """transformers' Dots3NoteForCausalLM."""

    config_class = Dots3NoteTextConfig
    # per-expert tensors on disk (GLM-4.5's rules); the image-text files' towers (transformers' names and the
    # released ones), the multi-token prediction layer (model.mtp, model.layers.46) skipped, as transformers
    checkpoint_rules = CheckpointRules(
        [*IMAGE_TEXT_RULES, *GROUPED_MOE_RULES.rules,
         Ignored(r"(model\.)?(audio_tower|audio_encoder|audio_adapter|vision_encoder)\..+"),
         Ignored(r"model\.(language_model\.)?mtp\..+"), Ignored(r"model\.layers\.46\..*")]
    )  # fmt: skip
    # DeepSeek-V3's plan, the gates' rows by head; the indexers stay whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = {**DeepseekV3ForCausalLM.tp_patterns, "layers.*.self_attn.g_proj": "colwise"}  # fmt: skip
    _no_split_modules: ClassVar[list[str]] = ["Dots3NoteDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers
    gguf = dots3_note_gguf.LAYOUT  # llama.cpp's; its per-layer rules below

    def __init__(self, config: Dots3NoteTextConfig):
        super().__init__(config, Dots3NoteModel(config))
        self.checkpoint_rules = CheckpointRules([*self.checkpoint_rules.rules, *dots3_note_gguf.rules(config)])  # fmt: skip
