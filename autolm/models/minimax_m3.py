"""MiniMax-M3's language model (transformers' minimax_m3_vl: MiniMaxM3VLForCausalLM, text model_type
"minimax_m3_vl_text"; the image-text MiniMaxM3SparseForConditionalGeneration, model_type "minimax_m3_vl", read as
its language model). MiniMax-M2's layers (models.minimax_m2: sigmoid routing steered by a correction bias, GQA with
q/k norms) with these differences:

- every RMSNorm is Gemma's (times 1 + weight, the weight starting at zero), the q/k norms per head;
- RoPE turns all of head_dim unless the RoPE parameters give a partial_rotary_factor (transformers reads the
  config's `rotary_dim` nowhere, and neither does autolm: kept as read);
- the feed-forward block is, by `mlp_layer_types`, a dense MLP ("dense", `dense_intermediate_size`) or a mixture
  ("sparse": the router `mlp.gate` holds `e_score_correction_bias`; the chosen experts' renormalised weights are
  scaled by `routed_scaling_factor`; plus an ungated shared MLP `mlp.shared_experts` of `shared_intermediate_size`);
  all of them gpt-oss's clamped SwiGLU ((clamp(up) + 1) * g * sigmoid(swiglu_alpha * g), g the gate clamped from
  above at swiglu_limit, up to +-swiglu_limit) over [gate | up] halves of one `gate_up_proj`;
- the layers `layer_types` names "minimax_m3_sparse" attend block-sparsely: a lightning indexer (`self_attn.indexer`:
  q_proj to index_n_heads heads and k_proj to one key of index_head_dim, Gemma-normed per head, turned by the first
  index_head_dim features of the layer's RoPE tables) scores each query against every key slot up to the query's
  position (q . k, unscaled, fp32), max-pools the scores over blocks of `index_block_size` key slots, forces the
  `index_local_blocks` blocks ending at the query's position's block, and keeps per indexer head the top
  `index_topk_blocks` blocks (a block no key of which it may score never kept); each group of
  num_attention_heads / index_n_heads attention heads sees its indexer head's blocks, causally, not the padding.

As transformers, the blocks are key *slots* and a query's reach for scoring is its *position*: over a left-padded
batch the position is the query's rank among its row's real tokens (what generate and the tests pass; autolm
derives it so from the padding), and padding keys score too. The indexer's keys stay in the KV cache (one extra
one-head layer per sparse layer, as models.deepseek_v32 keeps its indexer's), so the one-token step selects as the
whole forward does; the compiled graphs do not serve such layers (they read a second cache layer): the step runs
eagerly.

The released files name the mixture `block_sparse_moe` (per-expert w1/w3/w2, the bias on the block) and the
indexer's tensors self_attn.index_{q,k}_{proj,norm}; the multi-token-prediction tensors (mtp.*) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    Linear,
    Rename,
    RMSNorm,
    SparseMoeBlock,
    Stacked,
    apply_rotary,
)
from ..nn.expert_formats import GGUFExperts
from .deepseek_v32 import IndexedCausalLM
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .minimax_m2 import MiniMaxM2Config, MiniMaxM2TopKRouter
from .minimax_m3_gguf import GGUF, SPARSE, GateUpGGUF
from .mixtral import MixtralDecoderLayer, MixtralModel
from .qwen4_exp_qsa import MaskedContext, indexer_history

_LEGACY_INDEX = {"index_n_heads": "sparse_num_index_heads", "index_head_dim": "sparse_index_dim",
                 "index_block_size": "sparse_block_size", "index_topk_blocks": "sparse_topk_blocks",
                 "index_local_blocks": "sparse_local_block"}  # fmt: skip


@dataclass(repr=False)
class MiniMaxM3VLTextConfig(MiniMaxM2Config):
    """transformers' MiniMaxM3VLTextConfig: its fields and defaults. layer_types defaults to full attention
    everywhere, mlp_layer_types to mixtures everywhere; the released config.json's `sparse_attention_config`
    (sparse_* keys, sparse_attention_freq) and `moe_layer_freq` are read into them as transformers reads them.
    hidden_act is always silu (transformers' rule: the activation is the clamped SwiGLU whatever it says)."""

    model_type: ClassVar[str] = "minimax_m3_vl_text"
    layer_kinds: ClassVar[tuple[str, ...]] = ("full_attention", SPARSE)
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("rotary_dim",)  # read nowhere (GGUF out compares)

    hidden_size: int = 6144
    intermediate_size: int = 3072
    num_hidden_layers: int = 60
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 524288
    num_experts_per_tok: int = 4
    num_local_experts: int = 128
    dense_intermediate_size: int = 12288
    shared_intermediate_size: int = 3072
    routed_scaling_factor: float = 2.0
    rotary_dim: int = 64
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    mlp_layer_types: list[str] | None = None
    index_n_heads: int = 4
    index_head_dim: int = 128
    index_block_size: int = 128
    index_topk_blocks: int = 16
    index_local_blocks: int = 1

    def __post_init__(self) -> None:
        self.hidden_act = "silu"
        sparse = self.extra.pop("sparse_attention_config", None) or {}
        freq = self.extra.pop("moe_layer_freq", None)
        if isinstance(sparse, dict):
            for name, legacy in _LEGACY_INDEX.items():
                if legacy in sparse:
                    setattr(self, name, sparse[legacy])
            if self.layer_types is None and isinstance(sparse.get("sparse_attention_freq"), list):
                self.layer_types = [
                    SPARSE if f else "full_attention" for f in sparse["sparse_attention_freq"]
                ]
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n):
            self.layer_types = ["full_attention"] * n
        if self.mlp_layer_types is None and isinstance(freq, list):
            self.mlp_layer_types = ["sparse" if f else "dense" for f in freq]
        if self.mlp_layer_types is None and _is_int(n):
            self.mlp_layer_types = ["sparse"] * n
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return PretrainedConfig.read_rope.__func__(cls, {"rope_theta": 5e6, **d}, source)

    def validate(self) -> None:
        super().validate()
        src, n = self.source, self.num_hidden_layers
        for name in ("dense_intermediate_size", "shared_intermediate_size", "rotary_dim", *_LEGACY_INDEX):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= 1 << 20 or (v == 0 and name != "index_local_blocks"):
                raise ConfigError(f"{src}: {name} must be a positive integer, found {v!r}")
        for name in ("routed_scaling_factor", "swiglu_alpha", "swiglu_limit"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"{src}: {name} must be a positive number, found {getattr(self, name)!r}")
        types = self.mlp_layer_types
        if not isinstance(types, list) or len(types) < n or set(types[:n]) - {"dense", "sparse"}:
            raise ConfigError(f"{src}: mlp_layer_types must list 'dense' or 'sparse' for each of the {n} layers, "
                              f"found {str(types)[:200]}")  # fmt: skip
        if self.num_attention_heads % self.index_n_heads:
            raise ConfigError(f"{src}: index_n_heads ({self.index_n_heads}) must divide num_attention_heads "
                              f"({self.num_attention_heads}): each indexer head selects for a group of heads")  # fmt: skip


class M3Router(MiniMaxM2TopKRouter):
    """MiniMax-M2's sigmoid routing with the correction bias on the router, the weights scaled by
    routed_scaling_factor (transformers scales the experts' sum: the same)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, scale: float):
        super().__init__(hidden, num_experts, top_k)
        self.scale = scale
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = super().forward(x, self.e_score_correction_bias)
        return ids, weights * self.scale


class SwigluMLP(nn.Module):
    """A dense MLP: down(glu(gate_up_proj(x))), glu the experts' clamped SwiGLU (nn.Experts.glu, gpt-oss's)."""

    glu, gated = Experts.glu, Experts.gated
    interleaved = False

    def __init__(self, config: Any, intermediate: int):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, config.hidden_size, bias=False)
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.glu(self.gate_up_proj(x)))


class M3Indexer(nn.Module):
    """One sparse layer's lightning indexer: (x (B, T, h), ctx) -> the mask (B, num_attention_heads, T, S) of the
    key slots each head of each query sees (module docstring). Its keys go to cache layer `slot`."""

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__()
        self.layer_idx, self.slot = layer_idx, slot
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.block, self.topk, self.local = (
            config.index_block_size,
            config.index_topk_blocks,
            config.index_local_blocks,
        )
        self.groups = config.num_attention_heads // self.n_heads
        self.q_proj = Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(config.hidden_size, self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        d = self.head_dim
        cos, sin = ctx.rope["default"]
        cos, sin = cos[..., :d], sin[..., :d]
        q = apply_rotary(self.q_norm(self.q_proj(x).view(B, T, -1, d)).transpose(1, 2), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(B, T, 1, d)).transpose(1, 2), cos, sin)
        keys, real, slots = indexer_history(ctx, self.slot, k)
        S, nb = keys.shape[2], -(-keys.shape[2] // self.block)
        at = real.long().cumsum(-1) - 1  # (B, S): each slot's position among its row's real tokens
        pos = at.index_select(1, slots).clamp(min=0)  # (B, T): the queries'
        allowed = (at[:, None, :] <= pos[..., None]) & real[
            :, None, :
        ]  # (B, T, S): real keys up to the query
        scores = (q.float() @ keys.float().transpose(-1, -2)).masked_fill(~allowed[:, None], float("-inf"))
        bins = torch.where(real, at // self.block, nb)[:, None, None, :].expand_as(scores)  # padding: bin nb
        blocks = scores.new_full((*scores.shape[:3], nb + 1), float("-inf"))
        blocks = blocks.scatter_reduce(-1, bins, scores, "amax")[..., :nb]  # (B, nh, T, nb): max over a block
        if self.local > 0:
            local = (pos[..., None] // self.block - torch.arange(self.local, device=x.device)).clamp(min=0)
            blocks.scatter_(-1, local[:, None].expand(-1, self.n_heads, -1, -1), float("inf"))
        top, ids = blocks.topk(min(self.topk, nb), dim=-1)
        chosen = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, ids, top > float("-inf"))
        kept = chosen.gather(-1, bins.clamp(max=nb - 1)).repeat_interleave(self.groups, dim=1)
        kv = torch.arange(S, device=x.device)
        itself = (kv[None, :] == slots[:, None])[None] & ~real.index_select(1, slots)[..., None]
        return (kept & allowed[:, None]) | itself[:, None]  # a padding query sees itself only


class M3Attention(Attention):
    """Attention with per-head Gemma q/k norms, over the blocks its indexer keeps where the layer has one."""

    def __init__(self, config: Any, layer_idx: int, norm):
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, layer_idx, qk_norm="head", norm=norm)  # fmt: skip
        sparse = config.layer_types[layer_idx] == SPARSE
        self.indexer = M3Indexer(config, layer_idx, config.num_hidden_layers + layer_idx) if sparse else None

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.indexer is None:
            return super().forward(x, ctx)
        return super().forward(x, MaskedContext(ctx, self.indexer(x, ctx)))


class MiniMaxM3DecoderLayer(MixtralDecoderLayer):
    """Pre-norm (Gemma norms) attention, dense or block-sparse; then a pre-norm dense MLP or the mixture."""

    @staticmethod
    def norm(config: Any, dim: int) -> nn.Module:
        return RMSNorm(dim, config.rms_norm_eps, offset=1.0)

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return M3Attention(config, layer_idx, lambda dim: self.norm(config, dim))

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if config.mlp_layer_types[layer_idx] == "dense":
            return SwigluMLP(config, config.dense_intermediate_size)
        h, n = config.hidden_size, config.num_local_experts
        router = M3Router(h, n, config.num_experts_per_tok, config.routed_scaling_factor)
        experts = Experts(
            n, h, config.intermediate_size, limit=config.swiglu_limit, alpha=config.swiglu_alpha
        )
        shared = SwigluMLP(config, config.shared_intermediate_size)
        return SparseMoeBlock(router, experts, jitter_noise=config.router_jitter_noise, shared_experts=shared)


class ReleasedLayout(CheckpointRules):
    """The released files' names read (the per-expert tensors stacked); saved, the model's own names, as
    transformers saves this model (the experts stacked)."""

    def to_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._back(name): t for name, t in state_dict.items()}


class MiniMaxM3VLForCausalLM(IndexedCausalLM):
    """transformers' MiniMaxM3VLForCausalLM."""

    config_class = MiniMaxM3VLTextConfig
    checkpoint_rules = ReleasedLayout(
        [
            *IMAGE_TEXT_RULES,
            Rename(r"\.block_sparse_moe\.(experts|gate|shared_experts)\.", r".mlp.\1.", r"(?!)", ""),
            Rename(
                r"\.block_sparse_moe\.e_score_correction_bias$",
                ".mlp.gate.e_score_correction_bias",
                r"(?!)",
                "",
            ),
            Rename(r"\.self_attn\.index_(q|k)_(proj|norm)\.", r".self_attn.indexer.\1_\2.", r"(?!)", ""),
            Stacked("gate_up_proj", ("w1.weight", "w3.weight")),
            Stacked("down_proj", ("w2.weight",)),
            Rename(
                r"\.mlp\.gate\.e_score_correction\.bias$", ".mlp.gate.e_score_correction_bias", r"(?!)", ""
            ),
            GGUFExperts(),
            GateUpGGUF(),
        ]
    )
    gguf = GGUF  # llama.cpp's "minimax-m3" (models.minimax_m3_gguf)
    # transformers' base_model_tp_plan: q/k/v gathered whole on every rank (every rank runs every head, so the
    # indexers select over whole heads), o_proj split again; the experts cut their own intermediate rows
    # (Experts.shard). Here also the dense and shared MLPs as GLM's: the packed gate_up output gathered, down_proj
    # split again. The indexers, the per-head norms and the routers whole.
    tp_patterns: ClassVar[dict[str, str]] = {
        **{f"layers.*.self_attn.{p}_proj": "colwise_gather" for p in "qkv"},
        "layers.*.self_attn.o_proj": "rowwise_split",
        **{f"layers.*.mlp.{m}gate_up_proj": "colwise_gather" for m in ("", "shared_experts.")},
        **{f"layers.*.mlp.{m}down_proj": "rowwise_split" for m in ("", "shared_experts.")},
    }
    _no_split_modules: ClassVar[list[str]] = ["MiniMaxM3DecoderLayer"]

    def __init__(self, config: MiniMaxM3VLTextConfig):
        super().__init__(config, MixtralModel(config, MiniMaxM3DecoderLayer))

    def indexers(self) -> list[nn.Module]:
        return [ix for ix in self.modules() if isinstance(ix, M3Indexer)]

    def shard_heads(self, world: int) -> None:
        """Every rank runs every head (q/k/v are gathered): nothing to shard."""


class MiniMaxM3VLConfig(ImageTextConfig):
    """transformers' MiniMaxM3VLConfig (MiniMaxM3SparseForConditionalGeneration): its language model's; the head
    tied by the outer config or text_config (transformers' rule), untied by default."""

    model_type: ClassVar[str] = "minimax_m3_vl"
    text_class: ClassVar[type] = MiniMaxM3VLTextConfig

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool:
        return bool(outer.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
