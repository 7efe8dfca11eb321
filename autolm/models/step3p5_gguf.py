"""GGUF in and out of Step 3.5 as llama.cpp's "step35" reads it (conversion/step3.py, src/models/step35.cpp): the
metadata keys its Step35Model converter writes, what its graph derives from them, and what it cannot run. The
graph hard-codes what transformers' config makes settable: the full layers rotate half of each head, the sliding
ones all of it; scores scaled by head_dim ** -0.5; the gate per head; the experts' weights always renormalised as
the file says. The layout itself is on models.step3p5.Step3p5ForCausalLM."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .glm4_moe import GGUF_GROUPED_LAYER, SIGMOID_GATING

GGUF_KEYS = (
    ("expert_count", "num_local_experts"),
    ("expert_used_count", "num_experts_per_tok"),
    ("expert_feed_forward_length", "moe_intermediate_size"),
    ("expert_shared_feed_forward_length", "share_expert_dim"),
    ("expert_weights_scale", "moe_router_scaling_factor"),
)
GGUF_LAYER = (("attn_gate", "self_attn.g_proj"), *GGUF_GROUPED_LAYER)


def derive(d: dict[str, Any], get) -> None:
    """llama.cpp's step35: heads per layer, the layer types from attention.sliding_window_pattern, the full layers
    rotating half of each head (rope.freq_base), the sliding ones all of it (rope.freq_base_swa); the layers with a
    router sparse; the SwiGLU clamps per layer (0: none); sigmoid routing, renormalised (else refused)."""
    n, heads, kv = d["num_hidden_layers"], d.get("num_attention_heads"), d.get("num_key_value_heads")
    per = list(heads) if isinstance(heads, list) else [heads] * n
    kvs = list(kv) if isinstance(kv, list) else [kv] * n
    if len(set(kvs)) != 1:
        raise ConfigError(f"attention.head_count_kv {kv}: Step 3.5 has one KV head count for all layers")
    pattern = get("attention.sliding_window_pattern") or [False] * n
    types = ["sliding_attention" if s else "full_attention" for s in pattern]
    full = [h for h, t in zip(per, types) if t == "full_attention"] or per
    d.update(num_key_value_heads=kvs[0], layer_types=types, num_attention_heads=full[0])
    d["per_layer_config"] = {
        i: {"num_attention_heads": h} for i, h in enumerate(per) if types[i] == "sliding_attention"
    }
    d["num_sliding_attention_heads"] = next(
        (h for h, t in zip(per, types) if t == "sliding_attention"), full[0]
    )
    hd = d["head_dim"] = get("attention.key_length") or d["hidden_size"] // per[0]
    d["query_pre_attn_scalar"] = hd
    base = float(get("rope.freq_base", 10000.0))
    rope = {"full_attention": {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": 0.5}}
    if "sliding_attention" in types:
        rope["sliding_attention"] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", base)),
                                     "partial_rotary_factor": 1.0}  # fmt: skip
    d["rope_parameters"] = rope
    d["sliding_window"] = get("attention.sliding_window") or None
    sparse = set(
        d.pop("mlp_layer_types", None) or []
    )  # the blocks with blk.N.ffn_gate_inp (GGUFLayout.present)
    d["mlp_layer_types"] = ["sparse" if i in sparse else "dense" for i in range(n)]
    for key, name in (("swiglu_clamp_exp", "swiglu_limits"), ("swiglu_clamp_shexp", "swiglu_limits_shared")):
        limits = get(key)
        if limits is not None:
            limits = limits if isinstance(limits, list) else [limits] * n
            d[name] = [float(v) if v else None for v in limits[:n]]
    d["moe_router_scaling_factor"] = d.get("moe_router_scaling_factor") or 1.0
    gating = get("expert_gating_func")
    if gating not in (None, 0, SIGMOID_GATING):
        raise ConfigError(
            f"expert_gating_func {gating!r}: Step 3.5 routes with the sigmoid ({SIGMOID_GATING})"
        )
    if not get("expert_weights_norm"):
        raise ConfigError(
            "expert_weights_norm false or absent: llama.cpp would not renormalise as Step 3.5 does"
        )


def write_config(m: dict[str, Any], c: Any) -> None:
    """As llama.cpp's Step35Model converter writes it: heads per layer, the window and its pattern, the experts'
    keys (renormalised, scaled), the leading dense layers, the clamps; refused by name where llama.cpp's step35
    would compute another model."""
    n, hd = c.num_hidden_layers, c.head_dim
    full, local = c.rope_parameters.get("full_attention", {}), c.rope_parameters.get("sliding_attention", {})
    refuse = [
        ("query_pre_attn_scalar", c.query_pre_attn_scalar != hd),
        ("rope_parameters", "full_attention" in c.layer_types and (full.get("rope_type", "default") != "default"
                                                                    or full.get("partial_rotary_factor") != 0.5)),
        ("rope_parameters", "sliding_attention" in c.layer_types and (local.get("rope_type", "default") != "default"
                                                                       or local.get("partial_rotary_factor", 1.0) != 1.0)),
        ("layer_types", "sliding_attention" not in c.layer_types or not c.sliding_window),  # it asserts a window
    ]  # fmt: skip
    bad = [name for name, is_bad in refuse if is_bad]
    if bad:
        raise ConfigError(
            f"{bad[0]}: llama.cpp's 'step35' cannot run this model ({bad[0]}={getattr(c, bad[0])!r})"
        )
    m["attention.head_count"] = [c.layer_heads(i) for i in range(n)]
    m["attention.head_count_kv"] = [c.num_key_value_heads] * n
    m["attention.sliding_window"] = c.sliding_window
    m["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]
    m.pop("rope.dimension_count", None)
    dense = next((i for i, t in enumerate(c.mlp_layer_types) if t == "sparse"), n)
    m.update(expert_weights_norm=True, expert_gating_func=SIGMOID_GATING, leading_dense_block_count=dense)
    m["expert_weights_scale"] = float(c.moe_router_scaling_factor)
    for key, name in (("swiglu_clamp_exp", "swiglu_limits"), ("swiglu_clamp_shexp", "swiglu_limits_shared")):
        if getattr(c, name) is not None:
            m[key] = [float(v or 0.0) for v in getattr(c, name)]
