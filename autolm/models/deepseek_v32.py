"""DeepSeek-V3.2-Exp (transformers' deepseek_v32): DeepSeek-V3 (models.deepseek_v3: Multi-head Latent Attention,
always with the low-rank query and RoPE over interleaved pairs; the grouped sigmoid-routed experts with shared
experts) in GLM-4.7-Flash's layers (models.glm4_moe_lite: which layers are dense is `mlp_layer_types`, by default
the first `first_k_dense_replace`), plus DeepSeek Sparse Attention: each attention layer's lightning indexer keeps
the top `index_topk` keys of each query, and the attention sees only those.

The indexer (transformers' DeepseekV32Indexer): `index_n_heads` queries wq_b(q_resid) per token (q_resid the
attention's q_a_layernorm(q_a_proj(x))) and one key k_norm(wk(x)) (a LayerNorm), both of `index_head_dim` with RoPE
(rotate-half, not interleaved) on their first qk_rope_head_dim features. A key scores sum over the heads of
weights_proj(x)_h * n_heads ** -0.5 * relu(q_h . k * index_head_dim ** -0.5); among the keys a query may see (causal,
not padding) it keeps the best index_topk, and attends to them only.

The keys the indexer scores are kept in the KV cache (one extra one-head layer per attention layer, slot
num_hidden_layers + layer index, written and read as models.qwen4_exp_qsa does for Qwen4-Exp's indexer), so the
one-token step selects as the whole forward does. Its compiled graphs (one layer's buffers each) do not serve a
layer that reads a second cache layer: the one-token step runs eagerly.

GGUF: llama.cpp's DeepseekV32Model converter writes "deepseek32": DeepSeek-V3's deepseek2 layout and keys
(models.deepseek_v3) plus the indexer's blk.N.indexer.{attn_q_b, attn_k, k_norm (weight and bias), proj} and its
attention.indexer.{head_count, key_length, top_k}; the dense layers as leading_dense_block_count. llama.cpp's
deepseek32 always reads q_lora_rank and expert_gating_func (written as the sigmoid, which the model computes, whether
or not config.json names the scoring function). Its indexer is this one (rotate-half RoPE on the first
qk_rope_head_dim features, a LayerNorm of eps 1e-6 on the key, the same scales), with a Hadamard rotation of queries
and keys that leaves their products as they are; its size is index_head_dim's, which must be a power of two from 64
(GGUF out refuses another: llama.cpp aborts on it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Ignored, Linear, apply_rotary
from .base import CausalLM
from .deepseek_v3 import SIGMOID_GATING, DeepseekV3Attention, DeepseekV3ForCausalLM, GGUFMla
from .deepseek_v3 import _gguf_write_config as _v3_gguf_write_config
from .glm4_moe import GROUPED_MOE_RULES
from .glm4_moe_lite import Glm4MoeLiteConfig, Glm4MoeLiteDecoderLayer
from .glm4_moe_lite import _gguf_config as _lite_gguf_config
from .mixtral import MixtralModel
from .qwen4_exp_qsa import MaskedContext, indexer_history

INDEXER_NORM_EPS = 1e-6  # the indexer's k_norm (a LayerNorm), whatever rms_norm_eps says


@dataclass(repr=False)
class DeepseekV32Config(Glm4MoeLiteConfig):
    """transformers' DeepseekV32Config: its fields and defaults (DeepSeek-V3.2-Exp's sizes). mlp_layer_types
    defaults to first_k_dense_replace dense layers, then sparse ones; layer_types is "indexed_attention" for every
    layer; RoPE always turns interleaved pairs (transformers' config has no rope_interleave)."""

    model_type: ClassVar[str] = "deepseek_v32"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window", "rope_interleave")
    layer_kinds: ClassVar[tuple[str, ...]] = ("indexed_attention",)

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    mlp_bias: bool = False  # transformers' field, unused by its model
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 64

    def __post_init__(self) -> None:
        n, first = self.num_hidden_layers, self.first_k_dense_replace
        if self.mlp_layer_types is None and _is_int(n) and _is_int(first):
            dense = min(max(first, 0), n)
            self.mlp_layer_types = ["dense"] * dense + ["sparse"] * (n - dense)
        if self.layer_types is None and _is_int(n) and n > 0:
            self.layer_types = ["indexed_attention"] * n
        self.rope_interleave = True  # transformers' DeepSeek-V3.2 ignores the key
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["head_dim"] = self.head_dim  # transformers writes it (GLM-4.7-Flash's config does not)
        return out

    def validate(self) -> None:
        src = self.source
        if self.q_lora_rank is None:
            raise ConfigError(f"{src}: q_lora_rank must be a positive integer (the indexer reads the low-rank "
                              "query), found null")  # fmt: skip
        positive_ints(self, ("index_topk", "index_head_dim", "index_n_heads"), 1 << 20)
        super().validate()
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(f"{src}: index_head_dim ({self.index_head_dim}) must be at least qk_rope_head_dim "
                              f"({self.qk_rope_head_dim}): the indexer turns that many features")  # fmt: skip


class DSAIndexer(nn.Module):
    """One attention layer's lightning indexer: (x (B, T, h), q_resid (B, T, q_lora_rank), ctx) -> the mask
    (B, 1, T, S) of the keys each query keeps. Its keys (normed, turned) go to cache layer `slot`. `interleaved`:
    RoPE over interleaved pairs (GLM-MoE-DSA's indexer) rather than rotate-half."""

    interleaved: ClassVar[bool] = False

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__()
        self.layer_idx, self.slot = layer_idx, slot
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim, self.index_topk = config.qk_rope_head_dim, config.index_topk
        self.wq_b = Linear(self.query_width(config), self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=INDEXER_NORM_EPS)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, bias=False)

    def turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE over the first rope_dim features (pairs de-interleaved first where `interleaved`: the same order for
        queries and keys, so their products are unchanged), the rest as they are."""
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim :]
        if self.interleaved:
            rot = torch.cat((rot[..., 0::2], rot[..., 1::2]), dim=-1)
        return torch.cat((apply_rotary(rot, cos, sin), rest), dim=-1)

    @staticmethod
    def query_width(config: Any) -> int:
        """wq_b's input width: the attention's low-rank query's (q_lora_rank)."""
        return config.q_lora_rank

    def queries(self, q_resid: torch.Tensor, ctx) -> torch.Tensor:
        """The heads' queries (B, nh, T, d), turned, from q_resid (B, T, query_width)."""
        B, T, _ = q_resid.shape
        cos, sin = ctx.rope["default"]
        return self.turn(self.wq_b(q_resid).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, ctx) -> torch.Tensor:
        q = self.queries(q_resid, ctx)
        cos, sin = ctx.rope["default"]
        k = self.turn(self.k_norm(self.wk(x)).unsqueeze(1), cos, sin)  # (B, 1, T, d)
        keys, real, slots = indexer_history(ctx, self.slot, k)
        scores = (q.float() @ keys.float().transpose(-1, -2) * self.head_dim**-0.5).relu()  # (B, nh, T, S)
        weights = self.weights_proj(x).float() * self.n_heads**-0.5  # (B, T, nh)
        index = torch.einsum("btn,bnts->bts", weights, scores)
        S = keys.shape[2]
        kv = torch.arange(S, device=x.device)
        allowed = (kv[None, :] <= slots[:, None])[None] & real[:, None, :]  # (B, T, S)
        top = index.masked_fill(~allowed, float("-inf")).topk(min(self.index_topk, S), dim=-1).indices
        kept = allowed & torch.zeros_like(allowed).scatter_(-1, top, True)
        itself = (kv[None, :] == slots[:, None])[None] & ~real.index_select(1, slots)[..., None]
        return (kept | itself)[:, None]  # a padding query sees itself only


class DeepseekV32Attention(DeepseekV3Attention):
    """Multi-head Latent Attention over the keys its indexer keeps (transformers' DeepseekV32Attention)."""

    indexer_class: ClassVar[type[DSAIndexer]] = DSAIndexer

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__(config, layer_idx)
        self.indexer = self.indexer_class(config, layer_idx, slot)

    def keep(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """The mask of the keys kept: the indexer's, on the low-rank query (recomputed here: the MLA forward's is
        its own)."""
        return self.indexer(x, self.q_a_layernorm(self.q_a_proj(x)), ctx)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return super().forward(x, MaskedContext(ctx, self.keep(x, ctx)))


class DeepseekV32DecoderLayer(Glm4MoeLiteDecoderLayer):
    """Pre-norm indexed MLA, then a pre-norm dense MLP or the mixture, as mlp_layer_types says."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return DeepseekV32Attention(config, layer_idx, config.num_hidden_layers + layer_idx)


class IndexedCausalLM(CausalLM):
    """A causal LM whose attention layers' indexers keep their keys in extra cache layers (one head each)."""

    compiled_graphs: ClassVar[bool] = False  # a layer reads its indexer's cache layer too

    def indexers(self) -> list[nn.Module]:
        return [ix for ix in self.modules() if isinstance(ix, DSAIndexer)]

    def attention_shapes(self) -> list[tuple[int, int]]:
        """The layers' own, then one head per layer for its indexer's keys (zero wide where a layer has none)."""
        extra = {ix.slot: (1, ix.head_dim) for ix in self.indexers()}
        n = len(self.model.layers)
        return [*super().attention_shapes(), *(extra.get(n + i, (1, 0)) for i in range(n))]

    def layer_devices(self) -> list[torch.device]:
        devices = super().layer_devices()
        return [*devices, *devices]


# ---- GGUF: llama.cpp's DeepseekV32Model converter (arch "deepseek32") -----------------------------------------------


def gguf_config(d: dict[str, Any], get) -> None:
    """DeepSeek-V3's reading as GLM-4.7-Flash's (models.glm4_moe_lite: mlp_layer_types from
    leading_dense_block_count, the next-token-prediction layers off the block count), the gating function required
    (llama.cpp's deepseek32 reads it always) and q_lora_rank whatever the layer count (deepseek2's "lite" rule is not
    deepseek32's)."""
    if get("expert_gating_func") != SIGMOID_GATING:
        raise ConfigError(f"expert_gating_func {get('expert_gating_func')!r}: llama.cpp's deepseek32 needs it, and "
                          f"DeepSeek-V3.2 routes with the sigmoid ({SIGMOID_GATING})")  # fmt: skip
    _lite_gguf_config(d, get)
    d["q_lora_rank"] = get("attention.q_lora_rank")


def gguf_write_config(m: dict[str, Any], c: DeepseekV32Config) -> None:
    """DeepSeek-V3's keys (models.deepseek_v3), the sigmoid gating function always, the leading dense layers of
    mlp_layer_types (refused where a dense layer follows a mixture: llama.cpp's are leading only) and the
    next-token-prediction layers counted, as the converter counts them."""
    d = c.index_head_dim
    if d < 64 or d & (d - 1):
        raise ConfigError(f"index_head_dim {d}: llama.cpp's {c.model_type} GGUF turns the indexer's queries and keys "
                          "by a Hadamard rotation of their size, a power of two from 64")  # fmt: skip
    types = c.mlp_layer_types[: c.num_hidden_layers]
    dense = types.index("sparse") if "sparse" in types else len(types)
    if "dense" in types[dense:]:
        raise ConfigError(f"mlp_layer_types {types}: llama.cpp's {c.model_type} GGUF has dense layers only before "
                          "the first mixture (leading_dense_block_count)")  # fmt: skip
    _v3_gguf_write_config(m, c)
    m["expert_gating_func"] = SIGMOID_GATING
    m["leading_dense_block_count"] = dense
    nextn = getattr(c, "num_nextn_predict_layers", 0) or 0
    if nextn:
        m["block_count"] = c.num_hidden_layers + nextn
        m["nextn_predict_layers"] = nextn


INDEXER_GGUF_CONFIG = (
    ("attention.indexer.head_count", "index_n_heads"),
    ("attention.indexer.key_length", "index_head_dim"),
    ("attention.indexer.top_k", "index_topk"),
)
INDEXER_GGUF_LAYER = (("indexer.attn_q_b", "self_attn.indexer.wq_b"), ("indexer.attn_k", "self_attn.indexer.wk"),
                      ("indexer.k_norm", "self_attn.indexer.k_norm"), ("indexer.proj", "self_attn.indexer.weights_proj"))  # fmt: skip


class DeepseekV32ForCausalLM(IndexedCausalLM):
    """transformers' DeepseekV32ForCausalLM."""

    config_class = DeepseekV32Config
    # per-expert tensors on disk (GLM-4.5's rules); the released files' multi-token prediction layer 61 skipped, as
    # transformers skips it; llama.cpp's attn_k_b / attn_v_b assembled (GGUFMla)
    checkpoint_rules = CheckpointRules(
        [*GROUPED_MOE_RULES.rules, Ignored(r"model\.layers\.61\..*"), GGUFMla()]
    )
    # DeepSeek-V3's layout with the indexer's tensors and keys (module docstring)
    gguf = dataclasses.replace(
        DeepseekV3ForCausalLM.gguf,
        arch="deepseek32",
        config=DeepseekV3ForCausalLM.gguf.config + INDEXER_GGUF_CONFIG,
        layer=DeepseekV3ForCausalLM.gguf.layer + INDEXER_GGUF_LAYER,
        derive=gguf_config,
        write_config=gguf_write_config,
        claim=None,
    )
    # DeepSeek-V3's plan; the indexers stay whole on every rank (each rank selects the same keys)
    tp_patterns: ClassVar[dict[str, str]] = DeepseekV3ForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["DeepseekV32DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: DeepseekV32Config):
        super().__init__(config, MixtralModel(config, DeepseekV32DecoderLayer))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        rules = type(self).checkpoint_rules.rules
        self.checkpoint_rules = CheckpointRules([mla if isinstance(r, GGUFMla) else r for r in rules])
