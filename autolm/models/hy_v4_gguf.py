"""GGUF in and out of Hy v4 as llama.cpp's "hy_v4" reads it (conversion/hy_v4.py: HYV4Model, a DeepseekV2Model;
src/models/hy-v4.cpp): DeepSeek-V3.2's layout and keys (models.deepseek_v32: MLA as MQA, kv_b_proj split into
attn_k_b / attn_v_b, the experts stacked, the indexers' blk.N.indexer.* in the "full" layers only) with the
hyper-connections (blk.N.hc_{attn,ffn}_{fn,base,scale}, output_hc_{fn,base,scale}: whole parameters under
".weight"; hyper_connection.count / epsilon / magnitude), the output gate (attn_gate), the sinks (attn_sinks), the
experts' SwiGLU limit per layer (swiglu_clamp_exp, absent where there is none) and attention.indexer.types.

RoPE: llama.cpp's hy_v4 turns consecutive pairs (LLAMA_ROPE_TYPE_NORM) of the rotated features where transformers'
Hy v4 turns halves, and its converter copies the rows as they are: its file of a transformers checkpoint runs in
llama.cpp otherwise than transformers runs the checkpoint. A file here means what llama.cpp computes of it: the
rotated rows (q_b's per head, kv_a's, the indexer's q_b per head, k and k_norm) are read from pairs into halves
and written back as pairs (`row_order`), so autolm computes as llama.cpp on any hy_v4 file, and llama.cpp computes as
autolm on autolm's. The converter's file of a checkpoint is thus the checkpoint with those rows reordered.

What llama.cpp's graph computes otherwise is refused by field name on GGUF out (and such files on reading): it has no
q_proj without q_lora_rank, no YaRN of its own (its attention scale ignores mscale_all_dim), dense layers only before
the first mixture, no tied head (output.weight is required), an indexer key longer than its rotated part, layer 0
"full". The layout itself is on models.hy_v4.HYV4ForCausalLM."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..nn import Rename
from .deepseek_v3 import SIGMOID_GATING
from .deepseek_v32 import INDEXER_GGUF_CONFIG, INDEXER_GGUF_LAYER
from .deepseek_v32 import gguf_config as _dsa_gguf_config

GGUF_CONFIG = (
    *INDEXER_GGUF_CONFIG,
    ("hyper_connection.count", "hc_mult"),
    ("hyper_connection.epsilon", "hc_eps"),
    ("hyper_connection.magnitude", "hc_magnitude"),
)
GGUF_LAYER = (
    *INDEXER_GGUF_LAYER,
    ("attn_sinks", "self_attn.sinks"),
    ("attn_gate", "self_attn.gate_proj"),
    *((f"hc_{gguf}_{p}", f"{ours}_hc.{p}") for gguf, ours in (("attn", "attn"), ("ffn", "ffn"))
      for p in ("fn", "base", "scale")),
)  # fmt: skip


class HeadWhole:
    """Checkpoint rule for GGUF out: hc_head's whole parameters go out as output_hc_*.weight (named as modules'
    weights, as GGUF_TOP names them); reading, GGUF_WHOLE takes the suffix off."""

    def piece(self, name: str) -> None:
        return None  # nothing to assemble while loading

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        return [(f"{name}.weight", t)] if name.startswith("model.hc_head.hc_") else None


GGUF_TOP = tuple((f"output_hc_{p}", f"model.hc_head.hc_{p}") for p in ("fn", "base", "scale"))
# the whole parameters llama.cpp names with ".weight" (sinks, hyper-connections) read back as the parameters
GGUF_WHOLE = (
    Rename(r"\.(sinks|attn_hc\.\w+|ffn_hc\.\w+)\.weight$", r".\1", r"(?!)", ""),
    Rename(r"^model\.hc_head\.(hc_\w+)\.weight$", r"model.hc_head.\1", r"(?!)", ""),  # GGUF_TOP's suffix too
    HeadWhole(),
)


SWIGLU_EPS = 1e-6  # llama.cpp clamps the experts' SwiGLU only where the limit is above this


def _paired(group: int, rope: int, groups: int) -> torch.Tensor:
    """For each model row of `groups` groups of `group` rows whose last `rope` rows are RoPE's (transformers'
    halves: features i and i + rope / 2 turn together), the file's row (llama.cpp's pairs: 2i and 2i + 1)."""
    keep, half = group - rope, torch.arange(rope // 2)
    row = torch.arange(group)
    row[keep : keep + rope // 2], row[keep + rope // 2 :] = keep + 2 * half, keep + 2 * half + 1
    return (row + group * torch.arange(groups)[:, None]).reshape(-1)


def row_order(stem: str, c: Any) -> torch.Tensor | None:
    """GGUFLayout.row_order: the rotated rows' pairs (module docstring) of q_b, kv_a and the indexer's q_b, k and
    k_norm; None for the other tensors."""
    rope = c.qk_rope_head_dim
    groups = {
        "attn_q_b": (c.qk_nope_head_dim + rope, c.num_attention_heads),
        "attn_kv_a_mqa": (c.kv_lora_rank + rope, 1),
        "indexer.attn_q_b": (c.index_head_dim, c.index_n_heads),
        "indexer.attn_k": (c.index_head_dim, 1),
        "indexer.k_norm": (c.index_head_dim, 1),
    }
    return _paired(groups[stem][0], rope, groups[stem][1]) if stem in groups else None


def derive(d: dict[str, Any], get) -> None:
    """DeepSeek-V3.2's reading (models.deepseek_v32.gguf_config: MLA, the sigmoid routing, mlp_layer_types from
    leading_dense_block_count, q_lora_rank), then the indexer types, the experts' SwiGLU limit; refused: files
    llama.cpp's hy_v4 runs as autolm cannot (no indexer, YaRN) or does not load (no q_lora_rank, no types)."""
    if "rope_type" in d["rope_parameters"]:
        raise ConfigError(f"rope.scaling.type {d['rope_parameters']['rope_type']!r}: llama.cpp's hy_v4 scales "
                          "neither its attention nor its RoPE tables as transformers' Hy v4 does (rope_parameters)")  # fmt: skip
    if get("attention.q_lora_rank") is None:
        raise ConfigError("attention.q_lora_rank absent: llama.cpp's hy_v4 needs it (q_lora_rank)")
    if not get("attention.indexer.top_k"):
        raise ConfigError("attention.indexer.top_k absent: a hy_v4 file without DSA is not transformers' Hy v4, "
                          "whose every layer has or shares an indexer (index_topk)")  # fmt: skip
    _dsa_gguf_config(d, get)
    d.pop("first_k_dense_replace", None)  # not a Hy v4 field: mlp_layer_types says it
    types = get("attention.indexer.types")
    if not isinstance(types, list):
        raise ConfigError("attention.indexer.types absent: llama.cpp's hy_v4 needs it (indexer_types)")
    d["indexer_types"] = ["full" if t else "shared" for t in types]
    limits = get("swiglu_clamp_exp")
    if isinstance(limits, list):
        if len(set(limits)) > 1:
            raise ConfigError(f"swiglu_clamp_exp {limits}: Hy v4 has one SwiGLU limit (swiglu_limit)")
        d["swiglu_limit"] = float(limits[0]) if limits else 0.0
    else:
        d["swiglu_limit"] = float(limits) if limits is not None else 0.0


def _refuse(c: Any) -> None:
    """ConfigError naming the field where llama.cpp's hy_v4 would not run this model as it is."""
    types = c.mlp_layer_types[: c.num_hidden_layers]
    dense = types.index("sparse") if "sparse" in types else len(types)
    refused = [
        ("q_lora_rank", c.q_lora_rank is None, "llama.cpp's hy_v4 always projects q through q_a / q_b"),
        ("rope_parameters", (c.rope_parameters or {}).get("rope_type", "default") != "default",
         "llama.cpp's hy_v4 scales neither its attention nor its RoPE tables as transformers' Hy v4 does"),
        ("mlp_layer_types", "dense" in types[dense:], "llama.cpp's dense layers are leading only"),
        ("tie_word_embeddings", c.tie_word_embeddings,
         "llama.cpp's hy_v4 needs output.weight, which the converter leaves out of a tied model"),
        ("index_head_dim", c.index_head_dim <= c.qk_rope_head_dim,
         "llama.cpp's hy_v4 needs an indexer key longer than its rotated part (qk_rope_head_dim)"),
        ("swiglu_limit", 0 < c.swiglu_limit <= SWIGLU_EPS, f"llama.cpp clamps only above {SWIGLU_EPS}"),
    ]  # fmt: skip
    for field, bad, why in refused:
        if bad:
            raise ConfigError(f"{field} {getattr(c, field)!r}: {why}")


def write_config(m: dict[str, Any], c: Any) -> None:
    """The keys llama.cpp's HYV4Model converter writes (DeepseekV2Model's MLA and expert keys, the group counts
    only where not both 1, the sigmoid gating, the SwiGLU limit per layer, the hyper-connections, the indexer and
    its types), after the refusals of _refuse."""
    _refuse(c)
    types = c.mlp_layer_types[: c.num_hidden_layers]
    m["leading_dense_block_count"] = types.index("sparse") if "sparse" in types else len(types)
    m["attention.head_count_kv"] = 1
    m["attention.key_length"] = c.kv_lora_rank + c.qk_rope_head_dim
    m["attention.value_length"] = c.kv_lora_rank
    m["attention.key_length_mla"] = c.qk_nope_head_dim + c.qk_rope_head_dim
    m["attention.q_lora_rank"] = c.q_lora_rank
    if c.n_group == 1 and c.topk_group == 1:  # the converter drops both
        m.pop("expert_group_count", None)
        m.pop("expert_group_used_count", None)
    if c.norm_topk_prob:
        m["expert_weights_norm"] = True
    m["expert_weights_scale"] = float(c.routed_scaling_factor)
    m["expert_gating_func"] = SIGMOID_GATING
    if c.swiglu_limit > 0:
        m["swiglu_clamp_exp"] = [float(c.swiglu_limit)] * c.num_hidden_layers
    m["hyper_connection.epsilon"] = float(c.hc_eps)
    m["hyper_connection.magnitude"] = float(c.hc_magnitude)
    m["attention.indexer.types"] = [t == "full" for t in c.indexer_types[: c.num_hidden_layers]]
