"""GGUF in and out of dots3 Note as llama.cpp's "dots3note" reads it (conversion/dots3.py: Dots3NoteModel, a
DeepseekV2Model; src/models/dots3note.cpp): DeepSeek-V3.2's layout and keys (models.deepseek_v32: MLA as MQA,
kv_b_proj split into attn_k_b / attn_v_b per layer with that layer's heads and head sizes, the experts stacked, the
indexers' blk.N.indexer.* in the layers that do not slide) with the RoPE key's norm (attn_k_norm), the output gate per
head (attn_gate), the heads per layer (attention.head_count an array), the sliding layers' MLA sizes
(attention.{kv_lora_rank,key_length,value_length,key_length_mla,value_length_mla}_swa), attention.sliding_window,
attention.sliding_window_pattern, rope.freq_base_swa and attention.indexer.types.

Three things a file means otherwise than a transformers checkpoint, read and written as llama.cpp computes them:
- the latents' scales sqrt(hidden_size / rank): llama.cpp has none, its converter folds them into q_a_layernorm's and
  kv_a_layernorm's weights (only where config.json says apply_mla_qkv_lora_rescale): a file's weights are read
  divided by them and written multiplied;
- the indexer's RoPE: llama.cpp turns halves (NEOX) of the first qk_rope_head_dim features of its queries and keys,
  transformers interleaved pairs, and the converter moves no row: the indexer's wq_b (per head), wk and k_norm rows
  are read from halves into pairs and written back as halves (`row_order`), as models.hy_v4_gguf does;
- the main attention turns interleaved pairs in both (LLAMA_ROPE_TYPE_NORM): its rows are the checkpoint's.

Refused on GGUF out by field, where llama.cpp's graph has no room for the model: "full_attention" layers (llama.cpp
indexes every layer that does not slide), sliding layers with their own q_lora_rank or qk_rope_head_dim (one n_lora_q
and n_rot for both), grouped routing (n_group, topk_group), dense layers after a mixture, shared experts of another
width than the routed ones (llama.cpp's are n_ff_exp * n_shared_experts wide), attention biases, scaled RoPE, an
indexer key its Hadamard rotation cannot take."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from ..errors import ConfigError
from .deepseek_v3 import SIGMOID_GATING, DeepseekV3ForCausalLM, GGUFMla
from .deepseek_v32 import INDEXER_GGUF_CONFIG, INDEXER_GGUF_LAYER
from .deepseek_v32 import gguf_config as _dsa_gguf_config


@dataclasses.dataclass(frozen=True)
class LayerMla(GGUFMla):
    """GGUFMla with each layer's heads and qk_nope_head_dim (the sliding layers have their own)."""

    layers: tuple[tuple[int, int], ...] = ()

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        m = re.search(r"layers\.(\d+)\.self_attn\.kv_b_proj\.weight$", name)
        if m is None:
            return None
        heads, nope = self.layers[int(m.group(1))]
        return GGUFMla(heads, nope).split(name, t)


@dataclasses.dataclass(frozen=True)
class LatentScales:
    """Checkpoint rule: the latent norms' weights with sqrt(hidden_size / rank) folded in, as llama.cpp's files hold
    them (module docstring); named <norm>_folded between the file and the model."""

    hidden: int

    def piece(self, name: str) -> tuple[str, str] | None:
        m = re.fullmatch(r"(.+\.self_attn)\.(q|kv)_a_layernorm_folded\.weight", name)
        return None if m is None else (f"{m.group(1)}.{m.group(2)}_a_layernorm.weight", "w")

    def pieces(self, name: str) -> int:
        return 1

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        return got["w"] / math.sqrt(self.hidden / shape[0])

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        m = re.fullmatch(r"(.+\.self_attn)\.(q|kv)_a_layernorm\.weight", name)
        if m is None:
            return None
        return [
            (f"{m.group(1)}.{m.group(2)}_a_layernorm_folded.weight", t * math.sqrt(self.hidden / t.shape[0]))
        ]


def rules(config: Any) -> list:
    """The model's own GGUF rules: per-layer MLA split, the folded latent scales."""
    layers = tuple((c.num_attention_heads, c.qk_nope_head_dim) for c in map(config.layer_config, range(config.num_hidden_layers)))  # fmt: skip
    return [LayerMla(layers=layers), LatentScales(config.hidden_size)]


def _halves(group: int, rope: int, groups: int) -> torch.Tensor:
    """For each model row of `groups` groups of `group` rows whose first `rope` rows are RoPE's (transformers'
    interleaved pairs 2i, 2i + 1), the file's row (llama.cpp's halves: i and i + rope / 2)."""
    row, half = torch.arange(group), torch.arange(rope // 2)
    row[0:rope:2], row[1:rope:2] = half, half + rope // 2
    return (row + group * torch.arange(groups)[:, None]).reshape(-1)


def row_order(stem: str, c: Any) -> torch.Tensor | None:
    """GGUFLayout.row_order: the indexer's rotated rows as halves (module docstring); None for the other tensors."""
    groups = {"indexer.attn_q_b": c.index_n_heads, "indexer.attn_k": 1, "indexer.k_norm": 1}
    return _halves(c.index_head_dim, c.qk_rope_head_dim, groups[stem]) if stem in groups else None


class GGUFCompared:
    """What GGUF out compares of a dots3 Note config (gguf_plan.check) beside its fields: each layer's kind and MLA
    sizes (per_layer_config spells them as it likes; the indexed layers' head_dim is in no file), RoPE over
    qk_rope_head_dim."""

    @property
    def rope_head_dim(self) -> int:
        return self.qk_rope_head_dim

    def gguf_compared(self) -> dict[str, Any]:
        sizes = []
        for i, kind in enumerate(self.layer_types[: self.num_hidden_layers]):
            c = vars(self.layer_config(i))
            sizes.append(
                (kind, {k: v for k, v in c.items() if k != "head_dim" or kind == "sliding_attention"})
            )
        return {"layer kinds and sizes": sizes}


def derive(d: dict[str, Any], get) -> None:
    """DeepSeek-V3.2's reading (models.deepseek_v32.gguf_config: MLA, the sigmoid routing, mlp_layer_types from
    leading_dense_block_count, q_lora_rank), then the heads by kind, the layer kinds from the window pattern, the
    sliding layers' sizes (per_layer_config), RoPE by kind, the shared experts' width; refused: files llama.cpp runs
    as no dots3 Note (scaled RoPE, an indexer in a sliding layer or none in another, heads varying within a kind)."""
    n = d.get("num_hidden_layers")
    swa = get("attention.sliding_window_pattern")
    if not isinstance(swa, list) or not isinstance(n, int) or len(swa) < n:
        raise ConfigError(f"attention.sliding_window_pattern {swa!r}: llama.cpp's dots3note needs one flag per layer (layer_types)")  # fmt: skip
    swa = [bool(s) for s in swa[:n]]
    types = get("attention.indexer.types")
    if not isinstance(types, list) or [bool(t) for t in types[:n]] != [not s for s in swa]:
        raise ConfigError(f"attention.indexer.types {types!r}: llama.cpp's dots3note indexes exactly the layers that do "
                          "not slide (layer_types)")  # fmt: skip
    if "rope_type" in d["rope_parameters"]:
        raise ConfigError(f"rope.scaling.type {d['rope_parameters']['rope_type']!r}: llama.cpp's dots3note scales "
                          "neither its attention nor its RoPE as transformers' dots3 Note would (rope_parameters)")  # fmt: skip
    heads = d.get("num_attention_heads")
    per = list(heads) if isinstance(heads, list) else [heads] * n
    by_kind = {s: {per[i] for i in range(n) if swa[i] == s} for s in (False, True)}
    if any(len(v) > 1 for v in by_kind.values()):
        raise ConfigError(f"attention.head_count {per}: dots3 Note's layers of a kind share one head count (num_attention_heads)")  # fmt: skip
    d["num_attention_heads"] = next(iter(by_kind[False] or by_kind[True]))
    _dsa_gguf_config(d, get)
    rope, theta = d["qk_rope_head_dim"], d["rope_parameters"]["rope_theta"]
    d["head_dim"] = d["qk_nope_head_dim"] + rope
    d["shared_experts_intermediate_size"] = d.get("moe_intermediate_size")
    d["layer_types"] = ["sliding_attention" if s else "indexed_attention" for s in swa]
    d["rope_parameters"] = (
        {"indexed_attention": {"rope_type": "default", "rope_theta": theta}} if not all(swa) else {}
    )
    d["per_layer_config"] = {}
    if any(swa):
        _sliding(d, get, next(iter(by_kind[True])), rope, [i for i in range(n) if swa[i]])


def _sliding(d: dict[str, Any], get, heads: int, rope: int, layers: list[int]) -> None:
    keys = {k: get(f"attention.{k}_swa") for k in ("kv_lora_rank", "key_length_mla", "value_length_mla")}
    keys["rope.freq_base_swa"] = get("rope.freq_base_swa")
    missing = [k for k, v in keys.items() if v is None]
    if missing:
        raise ConfigError(f"{missing[0]} absent: llama.cpp's dots3note needs it for the sliding layers (per_layer_config)")  # fmt: skip
    key = keys["key_length_mla"]
    sizes = dict(num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=d["q_lora_rank"],
                 kv_lora_rank=keys["kv_lora_rank"], head_dim=key, qk_nope_head_dim=key - rope,
                 v_head_dim=keys["value_length_mla"], qk_rope_head_dim=rope)  # fmt: skip
    d["per_layer_config"] = {str(i): dict(sizes) for i in layers}
    d["rope_parameters"]["sliding_attention"] = {
        "rope_type": "default",
        "rope_theta": keys["rope.freq_base_swa"],
    }


def _refuse(c: Any) -> None:
    """ConfigError naming the field where llama.cpp's dots3note would not run this model as it is."""
    n = c.num_hidden_layers
    types, kinds = c.mlp_layer_types[:n], c.layer_types[:n]
    dense = types.index("sparse") if "sparse" in types else len(types)
    sizes = [c.layer_config(i) for i in range(n)]
    d = c.index_head_dim
    refused = [
        ("layer_types", "full_attention" in kinds, "llama.cpp's dots3note gives every layer that does not slide an "
         "indexer (the converter needs use_dsa)"),
        ("q_lora_rank", any(s.q_lora_rank != c.q_lora_rank for s in sizes), f"llama.cpp's dots3note has one for "
         f"both kinds of layer (per_layer_config: {sorted({s.q_lora_rank for s in sizes})})"),
        ("qk_rope_head_dim", any(s.qk_rope_head_dim != c.qk_rope_head_dim for s in sizes), f"llama.cpp's dots3note "
         f"turns one width in both kinds of layer (per_layer_config: {sorted({s.qk_rope_head_dim for s in sizes})})"),
        ("n_group", c.n_group != 1, "llama.cpp's dots3note routes without groups"),
        ("topk_group", c.topk_group != 1, "llama.cpp's dots3note routes without groups"),
        ("mlp_layer_types", "dense" in types[dense:], "llama.cpp's dense layers are leading only"),
        ("shared_experts_intermediate_size", c.shared_experts_intermediate_size != c.moe_intermediate_size,
         f"llama.cpp's shared experts are as wide as the routed ones (moe_intermediate_size {c.moe_intermediate_size})"),
        ("attention_bias", c.attention_bias, "llama.cpp's dots3note has no attention biases"),
        ("rope_parameters", any(r.get("rope_type", "default") != "default" for r in c.rope_parameters.values()),
         "llama.cpp's dots3note turns plain RoPE only"),
        ("index_head_dim", d < 64 or d & (d - 1), "llama.cpp turns the indexer's queries and keys by a Hadamard "
         "rotation of their size, a power of two from 64"),
    ]  # fmt: skip
    for field, bad, why in refused:
        if bad:
            raise ConfigError(f"{field} {getattr(c, field)!r}: {why}")


def write_config(m: dict[str, Any], c: Any) -> None:
    """The keys llama.cpp's Dots3NoteModel converter writes (DeepseekV2Model's MLA and expert keys with the heads
    per layer, then the window, its pattern, the sliding layers' MLA sizes, the indexer and its types), after the
    refusals of _refuse."""
    _refuse(c)
    n = c.num_hidden_layers
    swa = [t == "sliding_attention" for t in c.layer_types[:n]]
    types = c.mlp_layer_types[:n]
    s = c.layer_config(swa.index(True)) if any(swa) else c
    rope = c.qk_rope_head_dim
    theta = c.rope_parameters.get("indexed_attention", c.rope_parameters.get("sliding_attention"))[
        "rope_theta"
    ]
    m["leading_dense_block_count"] = types.index("sparse") if "sparse" in types else len(types)
    m["attention.head_count"] = [c.layer_config(i).num_attention_heads for i in range(n)]
    m["attention.head_count_kv"] = 1
    m["attention.key_length"] = c.kv_lora_rank + rope
    m["attention.value_length"] = c.kv_lora_rank
    m["attention.key_length_mla"] = c.qk_nope_head_dim + rope
    m["attention.q_lora_rank"] = c.q_lora_rank
    m["rope.dimension_count"] = rope
    m["rope.freq_base"] = float(theta)
    m["rope.freq_base_swa"] = float(
        c.rope_parameters.get("sliding_attention", {"rope_theta": theta})["rope_theta"]
    )
    if c.norm_topk_prob:
        m["expert_weights_norm"] = True
    m["expert_weights_scale"] = float(c.routed_scaling_factor)
    m["expert_gating_func"] = SIGMOID_GATING
    m["attention.sliding_window"] = c.sliding_window or c.max_position_embeddings  # llama.cpp needs one
    m["attention.sliding_window_pattern"] = swa
    m["attention.kv_lora_rank_swa"] = s.kv_lora_rank
    m["attention.key_length_swa"] = s.kv_lora_rank + rope
    m["attention.value_length_swa"] = s.kv_lora_rank
    m["attention.key_length_mla_swa"] = s.qk_nope_head_dim + rope
    m["attention.value_length_mla_swa"] = s.v_head_dim
    m["attention.indexer.types"] = [not x for x in swa]


_FOLDED = (("attn_q_a_norm", "self_attn.q_a_layernorm_folded"), ("attn_kv_a_norm", "self_attn.kv_a_layernorm_folded"))  # fmt: skip
LAYOUT = dataclasses.replace(
    DeepseekV3ForCausalLM.gguf,
    arch="dots3note",
    config=DeepseekV3ForCausalLM.gguf.config + INDEXER_GGUF_CONFIG,
    layer=(*(p for p in DeepseekV3ForCausalLM.gguf.layer if p[0] not in dict(_FOLDED)), *_FOLDED,
           ("attn_k_norm", "self_attn.k_rope_only_layernorm"), ("attn_gate", "self_attn.g_proj"), *INDEXER_GGUF_LAYER),
    claim=None,
    row_order=row_order,  # the indexer's rotated rows as llama.cpp's halves
    derive=derive,
    write_config=write_config,
)  # fmt: skip
