"""GGUF in and out of Laguna as llama.cpp's "laguna" reads it (conversion/laguna.py, src/models/laguna.cpp): the
metadata keys its LagunaModel converter writes, what its graph derives from them, and what it cannot run (refused
by name on GGUF out). The layout itself is on models.laguna.LagunaForCausalLM."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .cohere2 import gguf_layer_types, llama_cpp_types
from .glm4_moe import SIGMOID_GATING
from .qwen2_moe import GGUF_EXPERT_KEYS

GGUF_KEYS = (
    ("attention.key_length", "head_dim"),
    *GGUF_EXPERT_KEYS,
    ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
    ("expert_weights_scale", "moe_routed_scaling_factor"),
)
_YARN_KEYS = (("yarn_ext_factor", "extrapolation_factor"), ("yarn_attn_factor", "attention_factor"),
              ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"))  # fmt: skip


def derive(d: dict[str, Any], get) -> None:
    """llama.cpp's laguna: query heads per layer (head_count an array or one count), the full layers rotating
    rope.dimension_count of the head (YaRN as the file says); with a window, the layer types from
    attention.sliding_window_pattern (else full every 4th layer from the first) and the sliding layers plain RoPE
    (rope.freq_base_swa, rope.dimension_count_swa); the gate per head where g_proj's width is the head count; the
    leading_dense_block_count first layers dense; sigmoid routing, renormalised (else the file is refused)."""
    n, heads, kv = d.get("num_hidden_layers"), d.get("num_attention_heads"), d.get("num_key_value_heads")
    per = list(heads) if isinstance(heads, list) else [heads] * n
    if isinstance(kv, list):
        if len(set(kv)) != 1:
            raise ConfigError(f"attention.head_count_kv {kv}: Laguna has one KV head count for all layers")
        d["num_key_value_heads"] = kv[0]
    d["num_attention_heads_per_layer"], d["num_attention_heads"] = per, per[0]
    hd = d["head_dim"] = get("attention.key_length") or d["hidden_size"] // per[0]
    full = {**d["rope_parameters"], "partial_rotary_factor": get("rope.dimension_count", hd) / hd}
    full.update((name, float(get(f"rope.scaling.{key}"))) for key, name in _YARN_KEYS
                if full.get("rope_type") == "yarn" and get(f"rope.scaling.{key}") is not None)  # fmt: skip
    d["rope_parameters"] = {"full_attention": full}
    window = get("attention.sliding_window") or 0
    d["sliding_window"] = window or None
    if window:
        gguf_layer_types(d, get, dense_first=True)
        rot = get("rope.dimension_count_swa", full["partial_rotary_factor"] * hd)
        d["rope_parameters"]["sliding_attention"] = {
            "rope_type": "default", "rope_theta": get("rope.freq_base_swa", full["rope_theta"]),
            "partial_rotary_factor": rot / hd,
        }  # fmt: skip
    else:
        d["layer_types"] = ["full_attention"] * n
    gate = d.get("gating")  # blk.0.attn_gate.weight's shape (GGUFLayout.shaped)
    d["gating"] = True if gate is None or gate[1] == per[0] else "per-element"
    dense = get("leading_dense_block_count") or 0
    d["mlp_layer_types"] = ["dense"] * dense + ["sparse"] * (n - dense)
    d["moe_routed_scaling_factor"] = d.get("moe_routed_scaling_factor") or 1.0  # 0 or absent: unscaled
    gating = get("expert_gating_func")
    if gating not in (None, 0, SIGMOID_GATING):
        raise ConfigError(f"expert_gating_func {gating!r}: Laguna routes with the sigmoid ({SIGMOID_GATING})")
    if not get("expert_weights_norm"):
        raise ConfigError(
            "expert_weights_norm false or absent: llama.cpp would not renormalise as Laguna does"
        )


def write_config(m: dict[str, Any], c: Any) -> None:
    """As llama.cpp's LagunaModel converter writes it: TextModel's keys with the heads per layer, the window, the
    experts' keys (renormalised, scaled, sigmoid), the leading dense layers, the rotary dimensions by layer type,
    the EOS list's other id as the end-of-turn token; the layer flags (which llama.cpp reads, the converter does
    not write) only where the layer types are not its default. Refused by name where llama.cpp's laguna would
    compute another model (the file would also read back as another: gguf_plan.check)."""
    dense = c.mlp_layer_types.count("dense")
    refuse = [("attention_bias", c.attention_bias), ("moe_router_logit_softcapping", c.moe_router_logit_softcapping),
              ("mlp_layer_types", c.mlp_layer_types != ["dense"] * dense + ["sparse"] * (len(c.mlp_layer_types) - dense)),
              ("layer_types", "sliding_attention" in c.layer_types and not c.sliding_window)]  # fmt: skip
    local, hd = c.rope_parameters.get("sliding_attention", {}), c.head_dim
    refuse.append(
        ("rope_parameters", "sliding_attention" in c.layer_types and local.get("rope_type") != "default")
    )
    bad = [name for name, is_bad in refuse if is_bad]
    if bad:
        raise ConfigError(
            f"{bad[0]}: llama.cpp's 'laguna' cannot run this model ({bad[0]}={getattr(c, bad[0])!r})"
        )
    m["attention.head_count"] = list(c.num_attention_heads_per_layer)
    m["rope.dimension_count"] = int(
        hd * c.rope_parameters["full_attention"].get("partial_rotary_factor", 1.0)
    )
    if "attention.sliding_window" in m:
        m["rope.dimension_count_swa"] = int(hd * local.get("partial_rotary_factor", 1.0))
        if c.layer_types != llama_cpp_types(c.num_hidden_layers, dense_first=True):
            m["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]
    m.update(expert_weights_norm=True, expert_gating_func=SIGMOID_GATING, leading_dense_block_count=dense)
    m["expert_weights_scale"] = float(c.moe_routed_scaling_factor)
    eos = c.eos_token_id if isinstance(c.eos_token_id, list) else []
    extra = [e for e in eos if e != c.bos_token_id]
    if extra:
        m["tokenizer.ggml.eot_token_id"] = extra[0]
