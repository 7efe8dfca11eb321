"""GGUF in and out of GLM-5.3-Flash (models.glm5_next) as llama.cpp's "glm5-next" (conversion/glm.py's
Glm5NextModel; src/models/glm5-next.cpp).

The converter reads the released config.json (linear_attn_config, first_k_dense_replace, mla_use_nope) and writes
- attention.head_count_kv per layer (0 in the KDA layers, which llama.cpp's graph takes as recurrent, 1 in the
  latent attention ones), Kimi Linear's KDA keys (kda.head_dim, ssm.conv_kernel, kda.gate_lower_bound where the
  config bounds the forget gate; the KDA heads are the attention heads: it asserts linear_attn_config.num_heads ==
  num_attention_heads), MLA as MQA without RoPE (q_lora_rank, kv_lora_rank, key_length kv_lora_rank, value_length
  kv_lora_rank, key_length_mla, value_length_mla, rope.dimension_count 0), the indexer (head_count, key_length,
  top_k, kpool, kpool_select_tail, types where the config lists them), the hyper-connections (count,
  sinkhorn_iterations, epsilon), the mixture (leading_dense_block_count, the experts' keys, expert_weights_norm
  always, the group counts TextModel writes) and the SwiGLU limit per layer for the routed and the shared experts
  (swiglu_clamp_exp / swiglu_clamp_shexp; llama.cpp clamps its dense layers by the latter too); the indexer's
  LayerNorm epsilon as attention.layer_norm_epsilon (1e-6, as transformers' k_norm);
- the tensors as Kimi Linear's (models.kimi_linear_gguf.KimiLinearGGUF: the q/k/v convs (1, d_inner, 1, K), A_log as
  ssm_a = -exp(A_log), dt_bias as ssm_dt.bias) and DeepSeek-V3.2's (kv_b_proj split into attn_k_b / attn_v_b, the
  experts stacked, the indexer's blk.N.indexer.* in its "full" layers), with the hyper-connections and the k-pool
  compressor as whole parameters under ".weight" (blk.N.hc_{attn,ffn}_{fn,base,scale},
  blk.N.indexer_compressor_{gate,ape}). The next-token-prediction block is not written (as `--no-mtp`); read, it is
  skipped.

llama.cpp's graph asserts hc_mult 4 and pools of at least two keys, sizes the KDA layers by the attention heads,
runs the leading_dense_block_count first layers dense and every other as a mixture with shared experts, reads no
attention biases, needs the output matrix (the converter leaves a tied head out) and clamps the SwiGLU only above
1e-6: GGUF out refuses other models by field name (`_refused`)."""

from __future__ import annotations

from typing import Any

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Rename
from .deepseek_v3 import SIGMOID_GATING
from .deepseek_v32 import INDEXER_GGUF_CONFIG, INDEXER_GGUF_LAYER, INDEXER_NORM_EPS
from .kimi_linear_gguf import GGUF_KDA

SWIGLU_EPS = 1e-6  # llama.cpp clamps the SwiGLU only where the limit is above this
GGUF_CONFIG = (
    ("attention.q_lora_rank", "q_lora_rank"),
    ("attention.kv_lora_rank", "kv_lora_rank"),
    ("attention.key_length_mla", "qk_nope_head_dim"),  # no RoPE: the whole key
    ("attention.value_length_mla", "v_head_dim"),
    ("kda.head_dim", "linear_head_dim"),
    ("ssm.conv_kernel", "linear_conv_kernel_dim"),
    ("kda.gate_lower_bound", "linear_lower_bound"),
    ("expert_feed_forward_length", "moe_intermediate_size"),
    ("expert_count", "n_routed_experts"),
    ("expert_used_count", "num_experts_per_tok"),
    ("expert_shared_count", "n_shared_experts"),
    ("expert_group_count", "n_group"),
    ("expert_group_used_count", "topk_group"),
    ("expert_weights_scale", "routed_scaling_factor"),
    ("expert_weights_norm", "norm_topk_prob"),
    *INDEXER_GGUF_CONFIG,
    ("attention.indexer.kpool", "index_kpool"),
    ("attention.indexer.kpool_select_tail", "index_kpool_always_select_tail"),
    ("hyper_connection.count", "hc_mult"),
    ("hyper_connection.sinkhorn_iterations", "hc_sinkhorn_iters"),
    ("hyper_connection.epsilon", "hc_eps"),
)
_WHOLE = (
    *((f"hc_{p}_{q}", f"{p}_hc.{q}") for p in ("attn", "ffn") for q in ("fn", "base", "scale")),
    ("indexer_compressor_gate", "self_attn.indexer.index_kpool_compress_gate"),
    ("indexer_compressor_ape", "self_attn.indexer.index_kpool_compress_ape"),
)
# inside a layer, beyond DeepSeek-V3's latent attention and mixture (the layout adds those)
GGUF_LAYER = (*GGUF_KDA, *INDEXER_GGUF_LAYER, *_WHOLE)
# the whole parameters llama.cpp names with ".weight" read back as the parameters
GGUF_WHOLE = (Rename(r"\.(attn_hc\.\w+|ffn_hc\.\w+|index_kpool_compress_\w+)\.weight$", r".\1", r"(?!)", ""),)


def _one_limit(get, n: int) -> float:
    """The SwiGLU limit of every layer's experts, shared experts and dense MLP (swiglu_limit), refused where the
    file has none, several, or one llama.cpp does not apply."""
    exp = get("swiglu_clamp_exp")
    if exp is None:
        raise ConfigError("swiglu_clamp_exp absent: llama.cpp's glm5-next would not clamp the SwiGLU, which "
                          "GLM-5.3-Flash always clamps (swiglu_limit)")  # fmt: skip
    shexp = get("swiglu_clamp_shexp", exp)
    limits = {float(v) for arr in (exp, shexp) for v in (arr[:n] if isinstance(arr, list) else [arr])}
    if len(limits) != 1 or min(limits) <= SWIGLU_EPS:
        raise ConfigError(f"swiglu_clamp_exp / swiglu_clamp_shexp {sorted(limits)}: GLM-5.3-Flash clamps every layer "
                          f"by one limit above {SWIGLU_EPS} (swiglu_limit)")  # fmt: skip
    return limits.pop()


def derive(d: dict[str, Any], get) -> None:
    """GGUFLayout.derive: the next-token-prediction block off the block count, the layer kinds from the per-layer KV
    head counts, the KDA heads as the attention heads, no RoPE, the leading dense layers, what llama.cpp defaults
    where the file is silent (no forget-gate bound, the top k not renormalised, every indexer "full", the tail
    kept), the SwiGLU limit; refused: what llama.cpp runs otherwise than GLM-5.3-Flash."""
    n_all = d.get("num_hidden_layers")
    nextn = get("nextn_predict_layers") or 0
    n = n_all - nextn if _is_int(n_all) else n_all
    if nextn:
        d["num_nextn_predict_layers"], d["num_hidden_layers"] = nextn, n
    kv = d.get("num_key_value_heads")
    if not isinstance(kv, list) or len(kv) != n_all:
        raise ConfigError(f"attention.head_count_kv must give each of the {n_all} layers' KV heads (0 in the KDA "
                          f"layers: layer_types), found {str(kv)[:200]}")  # fmt: skip
    d["layer_types"] = ["linear_attention" if k == 0 else "indexed_attention" for k in kv[:n]]
    d["num_key_value_heads"] = d["linear_num_heads"] = d.get("num_attention_heads")
    if get("rope.dimension_count", 0):
        raise ConfigError(f"rope.dimension_count {get('rope.dimension_count')}: llama.cpp's glm5-next attention has "
                          "no RoPE (qk_rope_head_dim)")  # fmt: skip
    d["qk_rope_head_dim"] = 0
    d.pop("head_dim", None)  # derived from the latent attention's sizes
    d["linear_lower_bound"] = get("kda.gate_lower_bound")  # absent: llama.cpp's softplus gate, no bound
    lead = get("leading_dense_block_count", 0)
    if _is_int(n) and _is_int(lead):
        d["mlp_layer_types"] = ["dense" if i < lead else "sparse" for i in range(n)]
    d.setdefault("norm_topk_prob", False)  # llama.cpp's default
    d.setdefault("index_kpool_always_select_tail", True)
    types = get("attention.indexer.types")
    d["indexer_types"] = (
        ["full" if t else "shared" for t in types[:n]] if isinstance(types, list) else ["full"] * n
    )
    gating = get("expert_gating_func")
    if gating not in (None, 0, SIGMOID_GATING):
        raise ConfigError(
            f"expert_gating_func {gating!r}: GLM-5.3-Flash routes by the sigmoid ({SIGMOID_GATING})"
        )
    eps = get("attention.layer_norm_epsilon")
    if eps is not None and abs(eps - INDEXER_NORM_EPS) > 1e-12:
        raise ConfigError(f"attention.layer_norm_epsilon {eps}: GLM-5.3-Flash's indexer k_norm uses "
                          f"{INDEXER_NORM_EPS}")  # fmt: skip
    d["swiglu_limit"] = _one_limit(get, n)


def _refused(c: Any) -> list[str]:
    """What llama.cpp's glm5-next graph would not run as this model, by field."""
    n, kinds = c.num_hidden_layers, list(c.mlp_layer_types[: c.num_hidden_layers])
    lead = next((i for i, k in enumerate(kinds) if k != "dense"), n)
    checks = (
        (c.hc_mult != 4, f"hc_mult {c.hc_mult} (it asserts 4 streams)"),
        (c.linear_num_heads != c.num_attention_heads,
         f"linear_num_heads {c.linear_num_heads} (its KDA layers have num_attention_heads, {c.num_attention_heads})"),
        (kinds != ["dense"] * lead + ["sparse"] * (n - lead),
         f"mlp_layer_types {kinds} (only leading dense layers, then mixtures)"),
        (c.index_kpool < 2, f"index_kpool {c.index_kpool} (it asserts pools of at least 2 keys)"),
        (c.swiglu_limit <= SWIGLU_EPS, f"swiglu_limit {c.swiglu_limit} (it clamps only above {SWIGLU_EPS})"),
        (c.attention_bias, "attention_bias (it reads no attention biases)"),
        (c.tie_word_embeddings, "tie_word_embeddings (it needs the output matrix, which the converter leaves out)"),
    )  # fmt: skip
    return [why for bad, why in checks if bad]


def write_config(m: dict[str, Any], c: Any) -> None:
    """GGUFLayout.write_config: the converter's keys (module docstring); ConfigError where llama.cpp's graph would
    not run the model as it is."""
    refused = _refused(c)
    if refused:
        raise ConfigError(f"llama.cpp's 'glm5-next' format cannot hold this {c.model_type!r} model: "
                          f"{'; '.join(refused)}")  # fmt: skip
    n = c.num_hidden_layers
    m.pop(
        "rope.freq_base", None
    )  # GLM-5.3-Flash's config.json has no RoPE settings: the converter writes none
    m["attention.head_count_kv"] = [0 if t == "linear_attention" else 1 for t in c.layer_types[:n]]
    m["attention.layer_norm_epsilon"] = INDEXER_NORM_EPS
    m["rope.dimension_count"] = 0
    m["attention.key_length"] = m["attention.value_length"] = c.kv_lora_rank
    m["attention.key_length_mla"] = c.qk_head_dim
    m["leading_dense_block_count"] = list(c.mlp_layer_types[:n]).count("dense")
    m["expert_weights_scale"] = float(c.routed_scaling_factor)
    m["expert_weights_norm"] = bool(c.norm_topk_prob)
    if c.linear_lower_bound is not None:
        m["kda.gate_lower_bound"] = float(c.linear_lower_bound)
    m["attention.indexer.kpool_select_tail"] = bool(c.index_kpool_always_select_tail)
    m["attention.indexer.types"] = [t == "full" for t in c.indexer_types[:n]]
    m["hyper_connection.epsilon"] = float(c.hc_eps)
    m["swiglu_clamp_exp"] = m["swiglu_clamp_shexp"] = [float(c.swiglu_limit)] * n
