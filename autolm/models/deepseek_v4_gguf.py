"""GGUF in and out of DeepSeek-V4 as llama.cpp's "deepseek4" reads it (conversion/deepseek.py: DeepseekV4Model;
src/models/deepseek4.cpp): the released files' tensors under llama.cpp's names (attn_q_a / attn_q_a_norm / attn_q_b,
the shared head's attn_kv / attn_kv_a_norm, attn_output_a / _b, attn_sinks, the compressors' attn_compressor_* and
indexer_compressor_*, indexer.attn_q_b / indexer.proj, hc_{attn,ffn}_{fn,base,scale} and output_hc_*: whole
parameters under ".weight", the experts stacked, exp_probs_b on the routed layers, ffn_gate_tid2eid (I32) on the
hashed ones) and its keys: attention.compress_ratios (0 sliding, 4 CSA, 128 HCA per layer), hash_layer_count (the
leading hash_moe layers), hyper_connection.{count,sinkhorn_iterations,epsilon}, attention.output_{group_count,
lora_rank}, attention.compress_rope_freq_base, the indexer's keys, the SwiGLU limit per layer (experts and shared
expert), rope.dimension_count the rotated features (head_dim is attention.key_length).

RoPE: llama.cpp turns consecutive pairs of each head's last rope.dimension_count features, as transformers' DeepSeek-V4
does: the rows are copied as they are. Its YaRN (rope.scaling.*) applies to the compressed layers only, with no
attention scaling (dsv4_rope_attn_factor undoes ggml's), as transformers' "compress" RoPE with attention_factor 1:
a file's YaRN keys are the compressed RoPE's. Its converter writes them only from a config.json's flat rope_scaling
(the released one's), not from transformers' nested rope_parameters; autolm writes them from the "compress" RoPE.

What llama.cpp's graph computes otherwise, or does not load, is refused by field name on GGUF out (and such files on
reading): ratios other than 4 (CSA) and 128 (HCA), sigmoid scoring (it loads sqrtsoftplus only), hash layers not
leading, other than 4 streams or whole heads per output group (it asserts both), an indexer key not in whole blocks of
64 (its cache turns the indexer's keys by Hadamard blocks), a tied head (output.weight is required), unnormalised top-k
weights (transformers always normalises), other than one shared expert or key-value head, an activation other than
SiLU, no SwiGLU limit, a scaled "main" RoPE, YaRN with an attention factor or mscale; and the converter's
multi-token prediction file (its layers, no model). The layout itself is on models.deepseek_v4.DeepseekV4ForCausalLM."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..nn import Rename
from .deepseek_v32 import INDEXER_GGUF_CONFIG
from .glm4_moe import ExpProbsBias
from .hy_v4_gguf import GGUF_TOP, HeadWhole

__all__ = ["GGUF_CONFIG", "GGUF_LAYER", "GGUF_RULES", "GGUF_TOP", "derive", "write_config"]

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
RATIOS = {SWA: 0, CSA: 4, HCA: 128}  # llama.cpp's DSV4_CSA_RATIO / DSV4_HCA_RATIO
SQRTSOFTPLUS = 4  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SQRT_SOFTPLUS
SWIGLU_EPS = 1e-6  # llama.cpp clamps the SwiGLU only above this
HC_MULT = 4  # llama.cpp's build_hc_pre asserts it
HADAMARD = 64  # llama.cpp's smallest rotation of the indexer's cache (llama_kv_cache::build_input_k_rot)

GGUF_CONFIG = (
    ("attention.key_length", "head_dim"),  # after rope.dimension_count (the rotated features): derive's
    ("attention.q_lora_rank", "q_lora_rank"),
    ("expert_feed_forward_length", "moe_intermediate_size"),
    ("expert_count", "n_routed_experts"),
    ("expert_used_count", "num_experts_per_tok"),
    ("expert_shared_count", "n_shared_experts"),
    ("expert_weights_scale", "routed_scaling_factor"),
    *INDEXER_GGUF_CONFIG,
    ("attention.output_group_count", "o_groups"),
    ("attention.output_lora_rank", "o_lora_rank"),
    ("attention.compress_rope_freq_base", "compress_rope_theta"),
    ("hyper_connection.count", "hc_mult"),
    ("hyper_connection.sinkhorn_iterations", "hc_sinkhorn_iters"),
    ("hyper_connection.epsilon", "hc_eps"),
)
_COMPRESSORS = (
    ("attn_compressor", "self_attn.compressor"),
    ("indexer_compressor", "self_attn.compressor.indexer"),
)
GGUF_LAYER = (
    ("attn_sinks", "self_attn.sinks"),
    ("attn_q_a", "self_attn.q_a_proj"),
    ("attn_q_a_norm", "self_attn.q_a_norm"),
    ("attn_q_b", "self_attn.q_b_proj"),
    ("attn_kv", "self_attn.kv_proj"),
    ("attn_kv_a_norm", "self_attn.kv_norm"),
    ("attn_output_a", "self_attn.o_a_proj"),
    ("attn_output_b", "self_attn.o_b_proj"),
    *((f"{stem}_{gguf}", f"{ours}.{mine}") for stem, ours in _COMPRESSORS
      for gguf, mine in (("kv", "kv_proj"), ("gate", "gate_proj"), ("ape", "position_bias"), ("norm", "kv_norm"))),
    ("indexer.attn_q_b", "self_attn.compressor.indexer.q_b_proj"),
    ("indexer.proj", "self_attn.compressor.indexer.scorer.weights_proj"),
    *((f"hc_{part}_{p}", f"{part}_hc.{p}") for part in ("attn", "ffn") for p in ("fn", "base", "scale")),
    ("ffn_gate_inp", "mlp.gate"),
    ("ffn_gate_exps", "mlp.experts.gate_proj"),
    ("ffn_up_exps", "mlp.experts.up_proj"),
    ("ffn_down_exps", "mlp.experts.down_proj"),
    ("exp_probs_b", "mlp.gate.e_score_correction"),
    ("ffn_gate_tid2eid", "mlp.gate_tid2eid"),
    ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
    ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
    ("ffn_down_shexp", "mlp.shared_experts.down_proj"),
)  # fmt: skip


class TableWhole:
    """Checkpoint rule for GGUF out: the hashed router's tid2eid goes out as `mlp.gate_tid2eid.weight` (GGUF_LAYER's
    ffn_gate_tid2eid; `mlp.gate` itself is ffn_gate_inp); reading, GGUF_WHOLE names it back."""

    def piece(self, name: str) -> None:
        return None  # nothing to assemble while loading

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if not name.endswith(".mlp.gate.tid2eid"):
            return None
        return [(name.removesuffix(".gate.tid2eid") + ".gate_tid2eid.weight", t)]


# llama.cpp's whole parameters (sinks, the compressors' position biases, hyper-connections) and tables under
# ".weight", read back as the parameters; the router's bias and the experts as llama.cpp stacks them
GGUF_RULES = (
    Rename(r"\.(sinks|position_bias|attn_hc\.\w+|ffn_hc\.\w+)\.weight$", r".\1", r"(?!)", ""),
    Rename(r"^model\.hc_head\.(hc_\w+)\.weight$", r"model.hc_head.\1", r"(?!)", ""),
    Rename(r"\.mlp\.gate_tid2eid\.weight$", ".mlp.gate.tid2eid", r"(?!)", ""),
    Rename(r"\.gate\.e_score_correction\.bias$", ".gate.e_score_correction_bias", r"(?!)", ""),
    HeadWhole(),
    TableWhole(),
    ExpProbsBias(),
)


def derive(d: dict[str, Any], get) -> None:
    """The layer types from attention.compress_ratios, the hashed layers from hash_layer_count, the rotated share
    from rope.dimension_count, the SwiGLU limit, the compressed RoPE's YaRN; refused: files llama.cpp's deepseek4
    runs as no transformers DeepSeek-V4 (or does not load), naming the field."""
    n = d["num_hidden_layers"]
    if get("nextn_predict_layers"):
        raise ConfigError("nextn_predict_layers: the converter's multi-token prediction file holds those layers, not "
                          "the model (num_nextn_predict_layers)")  # fmt: skip
    if get("expert_gating_func") != SQRTSOFTPLUS:
        raise ConfigError(f"expert_gating_func {get('expert_gating_func')!r}: llama.cpp's deepseek4 loads "
                          "sqrtsoftplus scoring only (scoring_func)")  # fmt: skip
    ratios = get("attention.compress_ratios")
    kinds = {r: k for k, r in RATIOS.items()}
    if not isinstance(ratios, list) or len(ratios) < n or set(ratios[:n]) - set(kinds):
        raise ConfigError(f"attention.compress_ratios {ratios!r}: llama.cpp's deepseek4 needs 0, 4 or 128 for each "
                          f"of the {n} layers (layer_types, compress_rates)")  # fmt: skip
    if d.get("hc_mult") != HC_MULT:
        raise ConfigError(f"hyper_connection.count {d.get('hc_mult')!r}: llama.cpp's deepseek4 mixes {HC_MULT} "
                          "streams only (hc_mult)")  # fmt: skip
    d["layer_types"] = [kinds[r] for r in ratios[:n]]
    d["compress_rates"] = {CSA: RATIOS[CSA], HCA: RATIOS[HCA]}
    hashed = get("hash_layer_count", 0)
    d["mlp_layer_types"] = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
    d["partial_rotary_factor"] = get("rope.dimension_count") / d["head_dim"]
    if get("expert_weights_norm") is not True:
        raise ConfigError("expert_weights_norm absent or false: transformers' DeepSeek-V4 always normalises the "
                          "top-k weights (norm_topk_prob)")  # fmt: skip
    if d.get("n_shared_experts", 1) != 1 or d.get("num_key_value_heads", 1) != 1:
        raise ConfigError(f"expert_shared_count {d.get('n_shared_experts')} / attention.head_count_kv "
                          f"{d.get('num_key_value_heads')}: DeepSeek-V4 has one shared expert and one key-value "
                          "head (n_shared_experts, num_key_value_heads)")  # fmt: skip
    limits = {float(x) for k in ("swiglu_clamp_exp", "swiglu_clamp_shexp") for x in _listed(get(k), n)}
    if len(limits) != 1 or min(limits) <= SWIGLU_EPS:
        raise ConfigError(f"swiglu_clamp_exp / _shexp {sorted(limits)}: DeepSeek-V4 has one SwiGLU limit, which "
                          f"llama.cpp applies above {SWIGLU_EPS} (swiglu_limit)")  # fmt: skip
    d["swiglu_limit"] = limits.pop()
    rope = d["rope_parameters"]
    if rope.get("rope_type") == "yarn":
        for key, name in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
        ):
            if get(key) is not None:
                rope[name] = float(get(key))
    elif "rope_type" in rope:
        raise ConfigError(f"rope.scaling.type {rope['rope_type']!r}: llama.cpp's deepseek4 scales its compressed "
                          "layers' RoPE by YaRN only (rope_parameters)")  # fmt: skip


def _listed(value: Any, n: int) -> list:
    return value[:n] if isinstance(value, list) else [value] if value is not None else []


def _refuse(c: Any) -> None:
    """ConfigError naming the field where llama.cpp's deepseek4 would not run this model as it is."""
    n = c.num_hidden_layers
    hashed = c.mlp_layer_types[:n].count("hash_moe")
    main, compress = c.rope_parameters["main"], c.rope_parameters["compress"]
    unscaled = ("mscale", "mscale_all_dim", "extrapolation_factor")
    refused = [
        ("scoring_func", c.scoring_func != "sqrtsoftplus", "llama.cpp's deepseek4 loads sqrtsoftplus scoring only"),
        ("compress_rates", c.compress_rates != {CSA: RATIOS[CSA], HCA: RATIOS[HCA]},
         f"llama.cpp's deepseek4 pools {RATIOS[CSA]} slots (CSA) or {RATIOS[HCA]} (HCA) only"),
        ("mlp_layer_types", c.mlp_layer_types[:hashed] != ["hash_moe"] * hashed,
         "llama.cpp's deepseek4 hashes the leading hash_layer_count layers only"),
        ("tie_word_embeddings", c.tie_word_embeddings,
         "llama.cpp's deepseek4 needs output.weight, which the converter leaves out of a tied model"),
        ("norm_topk_prob", not c.norm_topk_prob,
         "transformers' DeepSeek-V4 normalises the top-k weights anyway, llama.cpp would not"),
        ("n_shared_experts", c.n_shared_experts != 1,
         "DeepSeek-V4 computes one shared expert, llama.cpp would read more"),
        ("num_key_value_heads", c.num_key_value_heads != 1, "DeepSeek-V4 computes one key-value head"),
        ("hidden_act", c.hidden_act != "silu", "llama.cpp's deepseek4 computes SiLU"),
        ("hc_mult", c.hc_mult != HC_MULT, f"llama.cpp's deepseek4 mixes {HC_MULT} streams only"),
        ("o_groups", c.num_attention_heads % c.o_groups, "llama.cpp's deepseek4 groups whole heads"),
        ("index_head_dim", c.index_head_dim % HADAMARD,
         f"llama.cpp's deepseek4 turns the indexer's queries and keys by Hadamard blocks of {HADAMARD}"),
        ("swiglu_limit", c.swiglu_limit <= SWIGLU_EPS, f"llama.cpp clamps the SwiGLU only above {SWIGLU_EPS}"),
        ("rope_parameters", main.get("rope_type", "default") != "default"
         or compress.get("rope_type", "default") not in ("default", "yarn")
         or compress.get("attention_factor", 1.0) != 1.0 or compress.get("truncate", True) is not True
         or any(compress.get(k) not in (None, 1, 1.0) for k in unscaled),
         "llama.cpp's deepseek4 scales only the compressed layers' RoPE, by YaRN without attention scaling"),
    ]  # fmt: skip
    for field, bad, why in refused:
        if bad:
            raise ConfigError(f"{field} {getattr(c, field)!r}: {why}")


def write_config(m: dict[str, Any], c: Any) -> None:
    """The keys llama.cpp's DeepseekV4Model converter writes (module docstring), after the refusals of _refuse."""
    _refuse(c)
    n = c.num_hidden_layers
    m.pop("feed_forward_length", None)  # transformers' config.json holds no intermediate_size
    m["rope.dimension_count"] = c.qk_rope_head_dim
    m["attention.sliding_window"] = c.sliding_window
    m["attention.head_count_kv"] = 1
    m["rope.freq_base"] = float(c.rope_parameters["main"]["rope_theta"])
    compress = c.rope_parameters["compress"]
    if compress.get("rope_type") == "yarn":
        m["rope.scaling.type"] = "yarn"
        m["rope.scaling.factor"] = float(compress["factor"])
        m["rope.scaling.original_context_length"] = int(
            compress.get("original_max_position_embeddings") or c.max_position_embeddings
        )
        for key, name in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
        ):
            if compress.get(name) is not None:
                m[key] = float(compress[name])
    for key in ("expert_weights_scale", "attention.compress_rope_freq_base", "hyper_connection.epsilon"):
        m[key] = float(m[key])
    m["expert_weights_norm"] = True
    m["expert_gating_func"] = SQRTSOFTPLUS
    m["swiglu_clamp_exp"] = [float(c.swiglu_limit)] * n
    m["swiglu_clamp_shexp"] = [float(c.swiglu_limit)] * n
    m["attention.compress_ratios"] = [RATIOS[t] for t in c.layer_types[:n]]
    m["hash_layer_count"] = c.mlp_layer_types[:n].count("hash_moe")
    m["embedding_length_out"] = c.hidden_size * c.hc_mult
