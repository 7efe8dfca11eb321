"""GGUF for MiniMax-M3's language model (models.minimax_m3): llama.cpp's MiniMaxM3Model converter writes
"minimax-m3": MiniMax-M2's keys and tensors (the experts stacked, the router's correction bias as
exp_probs_b.bias, the per-head q/k norms whole, NeoX RoPE over rope.dimension_count) with 1 added to every norm
weight (llama.cpp runs plain RMSNorm), the shared MLP (ffn_{gate,up,down}_shexp, expert_shared_count of
expert_feed_forward_length), the routed weights' scale (expert_weights_scale), leading_dense_block_count, and the
indexer's keys (attention.indexer.{head_count,key_length,top_k,block_size,local_blocks}) and tensors
(blk.N.indexer.{q,k}_{proj,norm}, kept in f32). The fused gate_up_proj of the dense and shared MLPs is split into
its gate and up halves.

llama.cpp's graph hard-codes what the file does not say, so GGUF out refuses, naming the field, what it would
compute differently: the layers past the leading dense ones are the sparse ones, each with a mixture (layer_types
and mlp_layer_types must agree, dense layers leading); gpt-oss's SwiGLU constants (swiglu_alpha 1.702,
swiglu_limit 7); one indexer head per key/value head (index_n_heads == num_key_value_heads); the indexer turned by
the layer's RoPE over all its features (index_head_dim == the rotary dimensions); a shared MLP a whole number of
experts wide; an untied head (llama.cpp requires `output`). Its dense layers read feed_forward_length (written as
dense_intermediate_size). llama.cpp runs the sparse selection only with flash attention on.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..nn import GGUFLayout
from .glm4 import gguf_config
from .glm4_moe import SIGMOID_GATING
from .minimax_m2 import _gguf_write_config as _m2_gguf_write_config
from .mixtral import GGUF_EXPERTS

SPARSE = "minimax_m3_sparse"
_MLP = r"(.+\.mlp(?:\.shared_experts)?)"


class GateUpGGUF:
    """Checkpoint rule for llama.cpp's names: the dense and shared MLPs' ffn_gate / ffn_up (as the reader names
    them, mlp[.shared_experts].{gate,up}_proj) joined into the model's gate_up_proj ([gate | up]), and back (GGUF
    out); the router's e_score_correction_bias written as exp_probs_b.bias."""

    def piece(self, name: str) -> tuple[str, str] | None:
        m = re.fullmatch(_MLP + r"\.(gate|up)_proj\.weight", name)
        return None if m is None else (f"{m.group(1)}.gate_up_proj.weight", m.group(2))

    def pieces(self, name: str) -> int:
        return 2

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        t = torch.cat([got["gate"], got["up"]], 0)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: {name!r} from llama.cpp's gate and up {tuple(t.shape)} does not fit "
                                  f"the model's {tuple(shape)}")  # fmt: skip
        return t.contiguous()

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if name.endswith(".mlp.gate.e_score_correction_bias"):
            return [(name.removesuffix("_bias") + ".bias", t)]
        m = re.fullmatch(_MLP + r"\.gate_up_proj\.weight", name)
        if m is None:
            return None
        half = t.shape[0] // 2
        return [(f"{m.group(1)}.gate_proj.weight", t[:half]), (f"{m.group(1)}.up_proj.weight", t[half:])]


def gguf_derive(d: dict[str, Any], get) -> None:
    """The config off a "minimax-m3" file: MiniMax-M2's head size and rotary dimensions; the layers past
    leading_dense_block_count sparse (attention and mixture), the dense ones of feed_forward_length; the shared
    MLP expert_shared_count experts wide. Refused: another gating than the sigmoid, unrenormalised routed
    weights (autolm renormalises)."""
    gguf_config(d, get)
    d["rotary_dim"] = get("rope.dimension_count")  # the converter writes rotary_dim there
    if get("expert_gating_func") != SIGMOID_GATING:
        raise ConfigError(f"expert_gating_func {get('expert_gating_func')!r}: MiniMax-M3 routes with the sigmoid "
                          f"({SIGMOID_GATING})")  # fmt: skip
    if not get("expert_weights_norm"):
        raise ConfigError("expert_weights_norm: MiniMax-M3 renormalises the chosen experts' weights")
    n, lead = d.get("num_hidden_layers"), get("leading_dense_block_count") or 0
    d["mlp_layer_types"] = ["dense"] * lead + ["sparse"] * (n - lead)
    d["layer_types"] = ["full_attention"] * lead + [SPARSE] * (n - lead)
    if lead:
        d["dense_intermediate_size"] = get("feed_forward_length")
    d["shared_intermediate_size"] = d.get("intermediate_size") * (get("expert_shared_count") or 0)


def _refuse(field: str, value: Any, why: str) -> None:
    raise ConfigError(f"{field} {value!r}: llama.cpp's minimax-m3 {why}")


def gguf_write_config(m: dict[str, Any], c: Any) -> None:
    """The inverse of gguf_derive, as the converter writes it (module docstring), refusing what llama.cpp would
    compute differently by the field's name."""
    n = c.num_hidden_layers
    types, kinds = c.mlp_layer_types[:n], c.layer_types[:n]
    lead = types.index("sparse") if "sparse" in types else n
    if types != ["dense"] * lead + ["sparse"] * (n - lead):
        _refuse("mlp_layer_types", types, "has dense layers only before the first mixture")
    if kinds != ["full_attention"] * lead + [SPARSE] * (n - lead):
        _refuse("layer_types", kinds, "attends block-sparsely exactly in the layers with a mixture")
    if (c.swiglu_alpha, c.swiglu_limit) != (1.702, 7.0):
        _refuse(
            "swiglu_alpha, swiglu_limit",
            (c.swiglu_alpha, c.swiglu_limit),
            "hard-codes gpt-oss's (1.702, 7.0)",
        )
    if c.index_n_heads != c.num_key_value_heads:
        _refuse("index_n_heads", c.index_n_heads, "selects with one indexer head per key/value head")
    rotary = int(c.head_dim * c.rope_parameters.get("partial_rotary_factor", 1.0))
    if c.index_head_dim != rotary:
        _refuse(
            "index_head_dim", c.index_head_dim, f"turns the indexer by the layer's {rotary} rotary dimensions"
        )
    if c.shared_intermediate_size % c.intermediate_size:
        _refuse(
            "shared_intermediate_size", c.shared_intermediate_size, "needs whole experts of intermediate_size"
        )
    if c.tie_word_embeddings:
        _refuse("tie_word_embeddings", True, "reads an output tensor of its own")
    _m2_gguf_write_config(m, c)
    m["expert_shared_count"] = c.shared_intermediate_size // c.intermediate_size
    m["expert_weights_norm"] = True
    m["leading_dense_block_count"] = lead
    if lead:
        m["feed_forward_length"] = c.dense_intermediate_size


GGUF = GGUFLayout(
    "minimax-m3",
    config=(
        ("attention.key_length", "head_dim"),
        ("expert_count", "num_local_experts"),
        ("expert_used_count", "num_experts_per_tok"),
        ("expert_feed_forward_length", "intermediate_size"),
        ("expert_weights_scale", "routed_scaling_factor"),
        ("attention.indexer.head_count", "index_n_heads"),
        ("attention.indexer.key_length", "index_head_dim"),
        ("attention.indexer.top_k", "index_topk_blocks"),
        ("attention.indexer.block_size", "index_block_size"),
        ("attention.indexer.local_blocks", "index_local_blocks"),
    ),
    layer=(
        *GGUF_EXPERTS,
        ("exp_probs_b", "mlp.gate.e_score_correction"),
        ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
        ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
        ("ffn_down_shexp", "mlp.shared_experts.down_proj"),
        ("indexer.q_proj", "self_attn.indexer.q_proj"),
        ("indexer.k_proj", "self_attn.indexer.k_proj"),
        ("indexer.q_norm", "self_attn.indexer.q_norm"),
        ("indexer.k_norm", "self_attn.indexer.k_norm"),
    ),
    norm_shift=1.0,
    derive=gguf_derive,
    write_config=gguf_write_config,
)
