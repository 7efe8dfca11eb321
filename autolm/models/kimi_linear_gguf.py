"""Kimi Linear in llama.cpp's "kimi-linear" format, as its converter (conversion/kimi_linear.py, KimiLinearModel)
writes it from Moonshot's config.json (its `linear_attn_config`) and checkpoint names.

The converter
- writes MLA as MQA (DeepSeek-V2's keys: kv_lora_rank, key_length kv_lora_rank + qk_rope_head_dim, key_length_mla,
  value_length_mla, rope.dimension_count qk_rope_head_dim; value_length stays TextModel's head_dim, which
  transformers sets to qk_rope_head_dim), attention.head_count_kv per layer (1 in the MLA layers, 0 in the KDA ones:
  llama.cpp's graph takes a layer with none as recurrent), the KDA sizes as kda.head_dim and ssm.conv_kernel, the
  mixture's keys (leading_dense_block_count, the shared experts' count, expert_weights_scale, and TextModel's
  expert_gating_func from the Hub's moe_router_activation_func, which llama.cpp requires);
- reshapes each q/k/v conv weight to (1, d_inner, 1, K) (`ssm_conv1d_q` / `_k` / `_v`), stores A_log as
  -exp(A_log) (`ssm_a`, no ".weight" suffix), dt_bias as `ssm_dt.bias`, splits kv_b_proj per head as deepseek2
  (models.deepseek_v3.GGUFMla) and stacks the experts.

`KimiLinearGGUF` is the checkpoint rule that undoes the KDA transforms on reading (the reader names the file's
tensors under the layout's module names below) and redoes them on GGUF out (`split`). llama.cpp's graph
(src/models/kimi-linear.cpp) sizes the KDA layers by head_count (its n_head), projects the MLA query with one
plain matrix (no low-rank query), renormalises the top k (build_moe_ffn's norm_w is always on), never groups the
experts, runs the leading_dense_block_count first layers dense and every other one as a mixture with shared
experts, reads no attention biases and always an output matrix: GGUF out refuses other models by field name.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import _is_int
from ..errors import CheckpointError, ConfigError

SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
# llama.cpp's names -> the module names the GGUF reader gives the file's tensors (inside a layer)
GGUF_KDA = (
    ("ssm_conv1d_q", "self_attn.gguf_conv_q"),
    ("ssm_conv1d_k", "self_attn.gguf_conv_k"),
    ("ssm_conv1d_v", "self_attn.gguf_conv_v"),
    ("ssm_a", "self_attn.gguf_a"),
    ("ssm_dt", "self_attn.gguf_dt"),
    ("ssm_f_a", "self_attn.forget_gate.f_a_proj"),
    ("ssm_f_b", "self_attn.forget_gate.f_b_proj"),
    ("ssm_beta", "self_attn.b_proj"),
    ("ssm_g_a", "self_attn.g_a_proj"),
    ("ssm_g_b", "self_attn.g_b_proj"),
    ("ssm_norm", "self_attn.o_norm"),
)
GGUF_KDA_KEYS = (
    ("kda.head_dim", "linear_head_dim"),
    ("ssm.conv_kernel", "linear_conv_kernel_dim"),
    ("attention.kv_lora_rank", "kv_lora_rank"),
    ("attention.value_length_mla", "v_head_dim"),
    ("expert_count", "n_routed_experts"),
    ("expert_used_count", "num_experts_per_tok"),
    ("expert_feed_forward_length", "moe_intermediate_size"),
    ("expert_shared_count", "n_shared_experts"),
    ("expert_weights_scale", "routed_scaling_factor"),
)
_PIECE = re.compile(r"(.+\.self_attn)\.gguf_(conv_[qkv]\.weight|a\.weight|dt\.bias)")


class KimiLinearGGUF:
    """Checkpoint rule (autolm.nn.checkpoint's assembled rules): llama.cpp's KDA tensors <-> the model's conv1d
    weight (q, k, v stacked, (3 d_inner, 1, K)), forget_gate.A_log and forget_gate.dt_bias."""

    def piece(self, name: str) -> tuple[str, str] | None:
        m = _PIECE.fullmatch(name)
        if m is None:
            return None
        part = m.group(2).split(".")[0]
        target = {"a": "forget_gate.A_log", "dt": "forget_gate.dt_bias"}.get(part, "conv1d.weight")
        return f"{m.group(1)}.{target}", part

    def pieces(self, name: str) -> int:
        return 3 if name.endswith(".conv1d.weight") else 1

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        if "a" in got:
            t = torch.log(-got["a"].float())  # A = -exp(A_log)
        elif "dt" in got:
            t = got["dt"]
        else:  # (1, d_inner, 1, K) each, or 3-D / 2-D where a quantizer dropped the ones
            t = torch.cat([got[f"conv_{p}"].reshape(-1, got[f"conv_{p}"].shape[-1]) for p in "qkv"])
        if t.numel() == torch.Size(shape).numel():
            t = t.reshape(shape)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: {name!r} from llama.cpp's "
                                  f"{ {k: tuple(v.shape) for k, v in got.items()} } is {tuple(t.shape)}; the model "
                                  f"expects {tuple(shape)}")  # fmt: skip
        return t.contiguous()

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        """GGUF out: the model's parameter -> [(llama.cpp's piece as the reader names it, tensor)], else None."""
        m = re.fullmatch(r"(.+\.self_attn)\.(conv1d\.weight|forget_gate\.A_log|forget_gate\.dt_bias)", name)
        if m is None:
            return None
        prefix, part = m.groups()
        if part == "forget_gate.A_log":
            return [(f"{prefix}.gguf_a.weight", -torch.exp(t.float()))]
        if part == "forget_gate.dt_bias":
            return [(f"{prefix}.gguf_dt.bias", t)]
        pieces = t.reshape(3, 1, -1, 1, t.shape[-1]).unbind(0)  # (1, d_inner, 1, K) each, as the converter
        return [(f"{prefix}.gguf_conv_{p}.weight", w) for p, w in zip("qkv", pieces, strict=True)]


def derive(d: dict[str, Any], get) -> None:
    """GGUFLayout.derive: the layer kinds from the per-layer KV head counts, MLA's sizes from deepseek2's keys,
    and what llama.cpp's graph fixes (no low-rank query, KDA heads as the attention heads, the top k renormalised,
    no expert groups, the leading dense layers)."""
    kv, heads, n = d.get("num_key_value_heads"), d.get("num_attention_heads"), d.get("num_hidden_layers")
    if not isinstance(kv, list) or len(kv) != n:
        raise ConfigError(f"attention.head_count_kv must give each of the {n} layers' KV heads (0 in the KDA "
                          f"layers), found {str(kv)[:200]}")  # fmt: skip
    d["layer_types"] = ["linear_attention" if k == 0 else "full_attention" for k in kv]
    d["num_key_value_heads"] = d["linear_num_heads"] = heads
    rope, key = d.get("head_dim"), get("attention.key_length_mla")
    d["qk_rope_head_dim"] = rope
    d["qk_nope_head_dim"] = key - rope if _is_int(key) and _is_int(rope) else key
    d["q_lora_rank"] = None
    lead = get("leading_dense_block_count", 0)
    d["first_k_dense_replace"] = lead
    if _is_int(n) and _is_int(lead):
        d["mlp_layer_types"] = ["dense" if i < lead else "sparse" for i in range(n)]
    d.update(norm_topk_prob=True, n_group=1, topk_group=1)
    if "routed_scaling_factor" not in d:
        raise ConfigError(
            "expert_weights_scale is missing: llama.cpp's kimi-linear would scale the experts by 0"
        )
    if get("expert_gating_func") != SIGMOID_GATING:
        raise ConfigError(f"expert_gating_func {get('expert_gating_func')!r}: Kimi Linear routes by sigmoid "
                          f"({SIGMOID_GATING})")  # fmt: skip


def _refused(c: Any) -> list[str]:
    """What llama.cpp's kimi-linear graph cannot run, by field."""
    n, kinds = c.num_hidden_layers, list(c.mlp_layer_types)
    lead = next((i for i, k in enumerate(kinds) if k != "dense"), n)
    checks = (
        (c.linear_num_heads != c.num_attention_heads,
         f"linear_num_heads {c.linear_num_heads} (its KDA layers have num_attention_heads, {c.num_attention_heads})"),
        (c.q_lora_rank is not None, f"q_lora_rank {c.q_lora_rank} (its MLA projects the query with q_proj only)"),
        (not c.norm_topk_prob, "norm_topk_prob false (it always renormalises the top k)"),
        (c.topk_group < c.n_group, f"n_group {c.n_group} with topk_group {c.topk_group} (it never groups experts)"),
        (kinds != ["dense"] * lead + ["sparse"] * (n - lead),
         f"mlp_layer_types {kinds} (only leading dense layers, then mixtures)"),
        (not c.n_shared_experts, "n_shared_experts 0 (its mixture layers run the shared experts)"),
        (c.attention_bias, "attention_bias (it reads no attention biases)"),
        (c.tie_word_embeddings, "tie_word_embeddings (it needs the output matrix)"),
    )  # fmt: skip
    return [why for bad, why in checks if bad]


def write_config(m: dict[str, Any], c: Any) -> None:
    """GGUFLayout.write_config: the converter's keys (module docstring); ConfigError where llama.cpp's graph cannot
    run the model."""
    refused = _refused(c)
    if refused:
        raise ConfigError(f"llama.cpp's 'kimi-linear' format cannot hold this {c.model_type!r} model: "
                          f"{'; '.join(refused)}")  # fmt: skip
    m.pop("rope.freq_base", None)  # Kimi Linear's config.json has no RoPE settings: the converter writes none
    m["attention.head_count_kv"] = [1 if t == "full_attention" else 0 for t in c.layer_types]
    m["attention.key_length"] = c.kv_lora_rank + c.qk_rope_head_dim
    m["attention.value_length"] = m["rope.dimension_count"] = c.qk_rope_head_dim
    m["attention.key_length_mla"] = c.qk_head_dim
    m["leading_dense_block_count"] = list(c.mlp_layer_types).count("dense")
    m["expert_group_used_count"] = c.topk_group
    m["expert_gating_func"] = SIGMOID_GATING
