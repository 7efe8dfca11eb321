"""DeepSeek-V4 (transformers' deepseek_v4): the attention of models.deepseek_v4_layers (one shared key-value head,
the low-rank query, sliding-window attention with sinks on every layer, plus the compressed entries of the
"heavily_compressed_attention" (HCA) and "compressed_sparse_attention" (CSA, with its lightning indexer) layers by
`layer_types`; a grouped output projection) with:

- hyper-connections (as models.hy_v4's: `hc_mult` residual streams carried as one (B, T, hc_mult * h) tensor, `attn_hc`
  / `ffn_hc` around each block and `hc_head` before the final norm), whose streams also mix: mixes = fn(flat streams)
  / rms(flat streams) split into pre (hc_mult), post (hc_mult) and comb (hc_mult x hc_mult); pre = sigmoid(.) + hc_eps
  weighs the streams into the block, post = 2 * sigmoid(.) spreads its output, comb = softmax(.) + hc_eps made doubly
  stochastic by hc_sinkhorn_iters Sinkhorn-Knopp steps mixes the streams: out = post y + comb^T streams;
- a mixture on every layer: routed experts with SwiGLU clamped by swiglu_limit (as Hy v4's) and one shared expert
  clamped alike; the router scores sqrt(softplus(logits)) (or sigmoid, `scoring_func`), picks the top
  num_experts_per_tok by score + e_score_correction_bias ("moe" layers) or by a fixed table `tid2eid[token id]`
  ("hash_moe" layers, by `mlp_layer_types`: they need input_ids), weights renormalised times routed_scaling_factor.

RoPE: "main" (rope_theta, default) on sliding layers, "compress" (compress_rope_theta, YaRN where rope_parameters
says so, attention factor 1) on the compressed ones and their entries; config.json's rope_parameters nests the two.
The checkpoint keeps DeepSeek's names (transformers saves them so: `attn.wq_a`, `ffn.experts.N.w1`, `hc_attn_fn`,
...); the multi-token prediction layers are skipped. GGUF as llama.cpp's "deepseek4" (models.deepseek_v4_gguf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..config_fields import _is_number, positive_ints, validate_rope
from ..errors import ConfigError
from ..nn import CheckpointRules, GGUFLayout, Ignored, Rename, RMSNorm, Rotary, Stacked
from ..nn.expert_formats import GGUFExperts
from . import deepseek_v4_gguf
from .base import CausalLM, DecoderModel
from .deepseek_v4_layers import DeepseekV4Attention, DeepseekV4HyperConnection, DeepseekV4MoE
from .hy_v4 import HyperStreams, HYV4HyperHead

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_TYPES = ("hash_moe", "moe")
SCORING = ("sqrtsoftplus", "sigmoid")
_RATIO_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


@dataclass(repr=False)
class DeepseekV4Config(PretrainedConfig):
    """transformers' DeepseekV4Config: its fields and defaults (DeepSeek-V4-Flash's sizes), its legacy keys
    (compress_ratios, compress_rate_csa / _hca, num_hash_layers, qk_rope_head_dim) folded in as it folds them."""

    model_type: ClassVar[str] = "deepseek_v4"
    layer_kinds: ClassVar[tuple[str, ...]] = LAYER_TYPES
    partial_rotary_default: ClassVar[bool] = True
    absent_keys: ClassVar[tuple[str, ...]] = ("intermediate_size",)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "norm_topk_prob", "attention_bias",
                                              "mlp_bias", "output_router_logits")  # fmt: skip

    vocab_size: int = 129280
    hidden_size: int = 4096
    intermediate_size: int | None = None  # transformers' alias of moe_intermediate_size
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 1
    head_dim: int | None = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    compress_rates: dict | None = None
    compress_rope_theta: float = 160000.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: list[str] | None = None
    swiglu_limit: float = 10.0
    sliding_window: int | None = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    partial_rotary_factor: float | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """rope_parameters nested by RoPE kind ("main", "compress") as transformers writes them, or one flat
        setting (YaRN for the compressed layers) built into them in __post_init__."""
        given = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, found {str(given)[:100]}")
        if isinstance(given.get("main"), dict) and isinstance(given.get("compress"), dict):
            return {"main": dict(given["main"]), "compress": dict(given["compress"])}, "v5"
        flat = {k: v for k, v in given.items() if k not in ("main", "compress")}
        if "type" in flat:
            flat.setdefault("rope_type", flat.pop("type"))
        return {"flat": flat, "rope_theta": d.get("rope_theta", flat.get("rope_theta", 10000.0))}, "v5"

    def __post_init__(self) -> None:
        self._fold_legacy()
        n = self.num_hidden_layers
        if self.compress_rates is None:
            self.compress_rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        if _is_int(n) and n >= 0:
            if self.layer_types is None:
                mix = ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                       for i in range(max(n - 2, 0))]  # fmt: skip
                self.layer_types = ["heavily_compressed_attention"] * min(n, 2) + mix
            if self.mlp_layer_types is None:
                hashed = self.extra.pop("num_hash_layers", 3)
                self.mlp_layer_types = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
            if isinstance(self.mlp_layer_types, list):
                self.mlp_layer_types = list(self.mlp_layer_types[:n])
        if self.intermediate_size is None:
            self.intermediate_size = self.moe_intermediate_size
        self._nest_rope()
        super().__post_init__()

    def _fold_legacy(self) -> None:
        """transformers' legacy keys (older configs' V3-flavoured names) into the fields they set."""
        ratios = self.extra.pop("compress_ratios", None)
        if self.layer_types is None and isinstance(ratios, list):
            bad = [r for r in ratios if r not in _RATIO_TYPES]
            if bad:
                raise ConfigError(f"{self.source}: compress_ratios must hold 0, 4 or 128, found {bad}")
            self.layer_types = [_RATIO_TYPES[r] for r in ratios]
        for key, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                          ("compress_rate_hca", "heavily_compressed_attention")):  # fmt: skip
            if key in self.extra:
                rates = dict(self.compress_rates or {"compressed_sparse_attention": 4,
                                                     "heavily_compressed_attention": 128})  # fmt: skip
                rates[kind] = self.extra.pop(key)
                self.compress_rates = rates
        rope_dims = self.extra.pop("qk_rope_head_dim", None)
        if self.partial_rotary_factor is None:
            given = _is_int(rope_dims) and _is_int(self.head_dim) and self.head_dim > 0
            self.partial_rotary_factor = rope_dims / self.head_dim if given else 64 / 512

    def _nest_rope(self) -> None:
        """rope_parameters as transformers builds them: "main" the default RoPE at rope_theta, "compress" the flat
        setting (default or YaRN, attention_factor 1) at compress_rope_theta, both with partial_rotary_factor."""
        rope = self.rope_parameters
        if isinstance(rope.get("main"), dict) and isinstance(rope.get("compress"), dict):
            self.rope_parameters = {"main": rope["main"], "compress": rope["compress"]}
            return
        flat = rope.get("flat", {k: v for k, v in rope.items() if k != "rope_theta"})
        theta = rope.get("rope_theta", 10000.0)
        share = self.partial_rotary_factor
        main = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": share}
        compress = {**flat, "rope_theta": self.compress_rope_theta, "partial_rotary_factor": share}
        compress.setdefault("rope_type", "default")
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
        self.rope_parameters = {"main": main, "compress": compress}

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["main"]["rope_theta"])

    @property
    def qk_rope_head_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return dict(self.rope_parameters)

    def _implied(self, f) -> Any:
        return self.moe_intermediate_size if f.name == "intermediate_size" else super()._implied(f)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["rope_theta"] = self.rope_theta  # transformers writes both, and the rope dims
        out["qk_rope_head_dim"] = self.qk_rope_head_dim
        return out

    def validate(self) -> None:
        super().validate()
        src, n = self.source, self.num_hidden_layers
        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_TYPES)):  # fmt: skip
            if not isinstance(types, list) or len(types) != n or set(types) - set(allowed):
                raise ConfigError(f"{src}: {name} must list {n} of {allowed}, found {str(types)[:200]}")
        positive_ints(self, ("moe_intermediate_size", "q_lora_rank", "num_experts_per_tok", "n_routed_experts",
                             "hc_mult", "hc_sinkhorn_iters", "o_groups", "o_lora_rank", "index_n_heads",
                             "index_head_dim", "index_topk", "sliding_window"), 1 << 20)  # fmt: skip
        self._validate_numbers()

    def _validate_numbers(self) -> None:
        src = self.source
        if self.scoring_func not in SCORING:
            raise ConfigError(f"{src}: scoring_func must be one of {SCORING}, found {self.scoring_func!r}")
        for name in ("hc_eps", "swiglu_limit", "routed_scaling_factor", "compress_rope_theta"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{src}: {name} must be a number, found {getattr(self, name)!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"{src}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                              f"({self.n_routed_experts})")  # fmt: skip
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ConfigError(f"{src}: o_groups ({self.o_groups}) must divide num_attention_heads * head_dim")
        rates = self.compress_rates
        if not isinstance(rates, dict) or any(
            not _is_int(rates.get(k)) or rates[k] < 1 for k in LAYER_TYPES[1:]
        ):
            raise ConfigError(f"{src}: compress_rates must give a positive integer for each of {LAYER_TYPES[1:]}, "
                              f"found {rates!r}")  # fmt: skip
        share = self.partial_rotary_factor
        dims = int(self.head_dim * share) if _is_number(share) else 0
        if not 0 < share <= 1 or dims % 2 or dims == 0 or dims > self.index_head_dim:
            raise ConfigError(f"{src}: partial_rotary_factor must leave an even number of rotary dimensions, at "
                              f"most index_head_dim, of the {self.head_dim} in a head, found {share!r}")  # fmt: skip
        for kind in ("main", "compress"):
            validate_rope(self.rope_parameters[kind], f"{src}: rope_parameters[{kind!r}]")


class DeepseekV4DecoderLayer(nn.Module):
    """The attention, then the mixture, each pre-normed inside its hyper-connection."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = DeepseekV4Attention(config, layer_idx, config.num_hidden_layers + layer_idx)
        self.mlp = DeepseekV4MoE(config, layer_idx)
        self.input_layernorm = RMSNorm(h, eps, weight_in_fp32=True)
        self.post_attention_layernorm = RMSNorm(h, eps, weight_in_fp32=True)
        self.attn_hc = DeepseekV4HyperConnection(config)
        self.ffn_hc = DeepseekV4HyperConnection(config)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        ids = ctx.rope.get("input_ids", (None,))[0]
        x = self.attn_hc(x, lambda y: self.self_attn(self.input_layernorm(y), ctx))
        return self.ffn_hc(x, lambda y: self.mlp(self.post_attention_layernorm(y), ids))


class PositionedRotary(Rotary):
    """The RoPE tables, plus the positions themselves ("positions": the compressed entries' causality)."""

    def tables(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = super().tables(position_ids, dtype)
        out["positions"] = (position_ids, position_ids)
        return out


class DeepseekV4Model(HyperStreams, DecoderModel):
    """The embeddings repeated into hc_mult streams, the layers, `hc_head`, the final norm; the token ids reach the
    hash-routed layers through the context."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__(config, DeepseekV4DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                                 weight_in_fp32=True))  # fmt: skip
        self.rotary = PositionedRotary(
            config.rope_kinds(), config.head_dim, config.max_position_embeddings, True
        )
        self.hc_head = HYV4HyperHead(config)
        self._input_ids: torch.Tensor | None = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._input_ids = input_ids
        return super().embed(input_ids)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.hc_head(x))

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        ids, self._input_ids = self._input_ids, None  # the ids embedded for this forward, if it embedded them
        if ids is not None and tuple(ids.shape) == tuple(x.shape[:2]):
            ctx.rope = {**ctx.rope, "input_ids": (ids, ids)}
        return super().run(x, ctx, hidden_states)


# transformers' conversion mapping for deepseek_v4 (the names its save_pretrained writes), in an order that maps
# both ways: the block names, the indexer moved under the compressor, then the leaf names
RENAMES = [
    # the released files' top-level names (read only: saved as transformers saves them)
    Rename(r"^(layers\.|norm\.weight$)", r"model.\1", r"(?!)", ""),
    Rename(r"^embed\.weight$", "model.embed_tokens.weight", r"(?!)", ""),
    Rename(r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1", r"(?!)", ""),
    Rename(r"^head\.weight$", "lm_head.weight", r"^lm_head\.weight$", "head.weight"),
    Rename(r"\.attn\.", ".self_attn.", r"\.self_attn\.", ".attn."),
    Rename(r"\.ffn\.", ".mlp.", r"\.mlp\.", ".ffn."),
    Rename(r"\.attn_norm\.", ".input_layernorm.", r"\.input_layernorm\.", ".attn_norm."),
    Rename(r"\.ffn_norm\.", ".post_attention_layernorm.", r"\.post_attention_layernorm\.", ".ffn_norm."),
    Rename(r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2", r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    Rename(r"\.attn_sink$", ".sinks", r"\.sinks$", ".attn_sink"),
    Rename(r"\.self_attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj.",
           r"\.attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    Rename(r"\.self_attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj.",
           r"\.attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    Rename(r"\.self_attn\.indexer\.compressor\.", ".self_attn.compressor.indexer.",
           r"\.attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    Rename(r"\.shared_experts\.w1\.", ".shared_experts.gate_proj.", r"\.shared_experts\.gate_proj\.",
           ".shared_experts.w1."),
    Rename(r"\.shared_experts\.w2\.", ".shared_experts.down_proj.", r"\.shared_experts\.down_proj\.",
           ".shared_experts.w2."),
    Rename(r"\.shared_experts\.w3\.", ".shared_experts.up_proj.", r"\.shared_experts\.up_proj\.",
           ".shared_experts.w3."),
    Rename(r"\.wkv\.", ".kv_proj.", r"\.kv_proj\.", ".wkv."),
    Rename(r"\.wgate\.", ".gate_proj.", r"\.gate_proj\.", ".wgate."),
    Rename(r"\.ape$", ".position_bias", r"\.position_bias$", ".ape"),
    Rename(r"\.(self_attn|compressor|indexer)\.norm\.", r".\1.kv_norm.", r"\.kv_norm\.", ".norm."),
    Rename(r"\.q_norm\.", ".q_a_norm.", r"\.q_a_norm\.", ".q_norm."),
    Rename(r"\.wq_a\.", ".q_a_proj.", r"\.q_a_proj\.", ".wq_a."),
    Rename(r"\.wq_b\.", ".q_b_proj.", r"\.q_b_proj\.", ".wq_b."),
    Rename(r"\.wo_a\.", ".o_a_proj.", r"\.o_a_proj\.", ".wo_a."),
    Rename(r"\.wo_b\.", ".o_b_proj.", r"\.o_b_proj\.", ".wo_b."),
    Rename(r"\.gate\.bias$", ".gate.e_score_correction_bias", r"\.gate\.e_score_correction_bias$", ".gate.bias"),
]  # fmt: skip


class DeepseekV4ForCausalLM(CausalLM):
    """transformers' DeepseekV4ForCausalLM."""

    config_class = DeepseekV4Config
    checkpoint_rules = CheckpointRules([
        *RENAMES,
        Stacked("gate_up_proj", ("w1.weight", "w3.weight")),
        Stacked("down_proj", ("w2.weight",)),
        Ignored(r"(^|.*\.)mtp\..*"),
        *deepseek_v4_gguf.GGUF_RULES,
        GGUFExperts(),
    ])  # fmt: skip
    # llama.cpp's DeepseekV4Model converter: the released names and keys as llama.cpp's (deepseek_v4_gguf)
    gguf = GGUFLayout(
        "deepseek4",
        config=deepseek_v4_gguf.GGUF_CONFIG,
        layer=deepseek_v4_gguf.GGUF_LAYER,
        top=deepseek_v4_gguf.GGUF_TOP,
        derive=deepseek_v4_gguf.derive,
        write_config=deepseek_v4_gguf.write_config,
    )
    compiled_graphs: ClassVar[bool] = False  # a layer reads its compressor's cache layer too
    # the compressors pool windows of cache slots, padding included (as transformers): padding moves a row's windows,
    # so served rows run alone (serve.rows)
    rows_apart: ClassVar[bool] = True
    # transformers' base_model_tp_plan shards only the experts: here too each expert's intermediate rows are cut
    # (Experts.shard), and the shared expert as Llama's MLP; the attention (its one shared KV head, compressors and
    # indexers), the routers and the hyper-connections run whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = {
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
    }
    tp_divides: ClassVar[tuple[str, ...]] = ("moe_intermediate_size",)
    _no_split_modules: ClassVar[list[str]] = ["DeepseekV4DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = [
        "attn_hc", "ffn_hc", "hc_head", "sinks", "position_bias", "e_score_correction_bias", "q_a_norm", "kv_norm",
        "input_layernorm", "post_attention_layernorm", "norm",
    ]  # fmt: skip

    def __init__(self, config: DeepseekV4Config):
        super().__init__(config, DeepseekV4Model(config))

    def shard_heads(self, world: int) -> None:
        """Every rank runs every head (attention kept whole): nothing to shard."""

    def attention_shapes(self) -> list[tuple[int, int]]:
        """The layers' one shared head, then one head per layer for its compressor's projections (zero wide on
        the sliding layers)."""
        extra = [(1, layer.self_attn.extra_width()) for layer in self.model.layers]
        return [*super().attention_shapes(), *extra]

    def layer_devices(self) -> list[torch.device]:
        devices = super().layer_devices()
        return [*devices, *devices]
