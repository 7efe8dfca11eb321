"""GGUF in and out of Ling 3.0 (models.bailing_hybrid) as llama.cpp's "bailingmoe3" (conversion/bailingmoe3.py's
BailingMoeV3Model, src/models/bailingmoe3.cpp).

The converter reads the released config.json and writes
- TextModel's keys (sizes, rope.freq_base, the RMS epsilon, the expert counts, the groups, the sigmoid gating
  function, which llama.cpp requires; key/value length config.json's head_dim, the KDA heads' size), then
  attention.head_count_kv per layer (0 in the KDA layers, which llama.cpp's graph takes as recurrent, 1 in the
  latent attention ones), the KDA keys (ssm.conv_kernel, kda.head_dim, kda.safe_gate, kda.gate_lower_bound), MLA as
  MQA (kv_lora_rank, key_length kv_lora_rank + qk_rope_head_dim, key_length_mla, value_length_mla,
  rope.dimension_count qk_rope_head_dim) and the mixture's (leading_dense_block_count, the routed and the shared
  experts' widths, the shared count, expert_weights_scale, expert_weights_norm);
- the tensors as Kimi Linear's (models.kimi_linear_gguf.KimiLinearGGUF: the q/k/v convs (1, d_inner, 1, K),
  dt_bias as ssm_dt.bias) but A_log as ssm_a = exp(A_log) of shape (heads, 1), f_proj as ssm_f_a, the KDA output
  gate g_proj as ssm_g_a and the attention's head gate g_proj as attn_gate, kv_b_proj split into attn_k_b /
  attn_v_b (models.deepseek_v3.GGUFMla), the experts stacked, the router's bias as exp_probs_b.bias. The
  multi-token prediction block is not written (as `--no-mtp`); read, it is skipped.

`BailingHybridGGUF` undoes the KDA transforms on reading and redoes them on GGUF out. llama.cpp's graph asserts the
bounded forget gate below 0, sizes the KDA layers by the attention heads, l2-norms q/k and norms the latent with the
RMS epsilon (transformers: 1e-6), turns interleaved pairs with a plain RoPE, runs the leading_dense_block_count
first layers dense and every other one as a mixture with the shared experts and reads no attention biases: GGUF out
refuses other models by field name (`_refused`). A tied head is written without output.weight, as the converter
writes a checkpoint without lm_head; llama.cpp's loader then takes token_embd.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Rename
from .deepseek_v3 import LORA_NORM_EPS, SIGMOID_GATING
from .glm4_moe import GGUF_GROUPED_LAYER
from .kimi_linear_gguf import GGUF_KDA, KimiLinearGGUF

_KDA_NAMES = ("ssm_conv1d_q", "ssm_conv1d_k", "ssm_conv1d_v", "ssm_a", "ssm_dt", "ssm_beta", "ssm_norm")
GGUF_LAYER = (
    *((k, v) for k, v in GGUF_KDA if k in _KDA_NAMES),
    ("ssm_f_a", "self_attn.forget_gate.f_proj"),
    ("ssm_g_a", "self_attn.gguf_g_a"),  # the KDA layers' g_proj (BailingHybridGGUF.split, G_A_BACK)
    ("attn_gate", "self_attn.g_proj"),
    ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"),
    ("attn_kv_a_norm", "self_attn.kv_a_layernorm"),
    ("attn_k_b", "self_attn.k_b_proj"),
    ("attn_v_b", "self_attn.v_b_proj"),
    *GGUF_GROUPED_LAYER,
)
GGUF_CONFIG = (
    ("kda.head_dim", "linear_head_dim"),
    ("ssm.conv_kernel", "linear_conv_kernel_dim"),
    ("kda.gate_lower_bound", "kda_lower_bound"),
    ("attention.kv_lora_rank", "kv_lora_rank"),
    ("attention.value_length_mla", "v_head_dim"),
    ("expert_count", "n_routed_experts"),
    ("expert_used_count", "num_experts_per_tok"),
    ("expert_feed_forward_length", "moe_intermediate_size"),
    ("expert_shared_count", "n_shared_experts"),
    ("expert_group_count", "n_group"),
    ("expert_group_used_count", "topk_group"),
    ("expert_weights_scale", "routed_scaling_factor"),
)
# reading: the KDA output gate back under its module's name
G_A_BACK = Rename(r"\.self_attn\.gguf_g_a\.", ".self_attn.g_proj.", r"(?!)", "")


class BailingHybridGGUF(KimiLinearGGUF):
    """Checkpoint rule: llama.cpp's KDA tensors <-> the model's conv1d weight, forget_gate.A_log (ssm_a =
    exp(A_log), (heads, 1)) and forget_gate.dt_bias; on GGUF out also the KDA layers' g_proj as ssm_g_a (`linear`:
    those layers' numbers, which the model's own instance holds)."""

    def __init__(self, linear: tuple[int, ...] = ()):
        self.linear = frozenset(str(i) for i in linear)

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        if "a" in got:  # exp(A_log)
            got = {"dt": torch.log(got["a"].float())}
        return super().assemble(got, shape, name, source)

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith(".self_attn.g_proj.weight") and layer in self.linear:
            return [(name.replace(".g_proj.", ".gguf_g_a."), t)]
        if name.endswith(".forget_gate.A_log"):
            return [(name.replace("forget_gate.A_log", "gguf_a.weight"), torch.exp(t.float()).reshape(-1, 1))]
        return super().split(name, t)


def derive(d: dict[str, Any], get) -> None:
    """GGUFLayout.derive: the next-token-prediction block off the block count, the layer kinds from the per-layer KV
    head counts, MLA's sizes from deepseek2's keys, the KDA heads as the attention heads, the leading dense layers,
    the shared experts from their width, llama.cpp's defaults where the file is silent; refused: a file llama.cpp
    computes otherwise (another gating function, SwiGLU limits, multimodal RoPE sections)."""
    n_all = d.get("num_hidden_layers")
    nextn = get("nextn_predict_layers") or 0
    n = n_all - nextn if _is_int(n_all) else n_all
    if nextn:
        d["num_nextn_predict_layers"], d["num_hidden_layers"] = nextn, n
    kv, heads = d.get("num_key_value_heads"), d.get("num_attention_heads")
    if not isinstance(kv, list) or len(kv) != n_all:
        raise ConfigError(f"attention.head_count_kv must give each of the {n_all} layers' KV heads (0 in the KDA "
                          f"layers: layer_types), found {str(kv)[:200]}")  # fmt: skip
    d["layer_types"] = ["linear_attention" if k == 0 else "full_attention" for k in kv[:n]]
    d["num_key_value_heads"] = d["linear_num_heads"] = heads
    d["short_conv_kernel_size"] = d.get("linear_conv_kernel_dim")  # config.json's name for it
    rope, key = d.get("head_dim"), get("attention.key_length_mla")
    d["qk_rope_head_dim"] = rope
    d["qk_nope_head_dim"] = key - rope if _is_int(key) and _is_int(rope) else key
    d["q_lora_rank"] = get("attention.q_lora_rank")  # refused by the config where present
    lead = get("leading_dense_block_count", 0)
    d["first_k_dense_replace"] = lead
    if _is_int(n) and _is_int(lead):
        d["mlp_layer_types"] = ["dense" if i < lead else "sparse" for i in range(n)]
    d["norm_topk_prob"] = bool(get("expert_weights_norm", False))
    d.setdefault("routed_scaling_factor", 1.0)  # llama.cpp: none (0) scales by 1
    d.setdefault("n_group", 1)
    d.setdefault("topk_group", 1)
    width, moe = get("expert_shared_feed_forward_length"), d.get("moe_intermediate_size")
    if _is_int(width) and _is_int(moe) and moe > 0:
        if width % moe:
            raise ConfigError(f"expert_shared_feed_forward_length {width} is no multiple of expert_feed_forward_"
                              f"length {moe} (n_shared_experts)")  # fmt: skip
        d["n_shared_experts"] = width // moe
    elif not d.get("n_shared_experts"):  # llama.cpp's default width: one expert's
        d["n_shared_experts"] = 1
    d["kda_safe_gate"] = bool(
        get("kda.safe_gate", True)
    )  # llama.cpp's default; it runs only the bounded gate
    _refuse_file(get)


def _refuse_file(get) -> None:
    """What a file may say that llama.cpp computes and Ling 3.0 does not, by key."""
    if get("expert_gating_func") != SIGMOID_GATING:
        raise ConfigError(f"expert_gating_func {get('expert_gating_func')!r}: Ling 3.0 routes by the sigmoid "
                          f"({SIGMOID_GATING})")  # fmt: skip
    for key in ("swiglu_clamp_exp", "swiglu_clamp_shexp"):
        limits = get(key)
        if any(limits if isinstance(limits, list) else [limits]):
            raise ConfigError(f"{key}: Ling 3.0 clamps no SwiGLU")
    if any(get("rope.dimension_sections") or ()):
        raise ConfigError("rope.dimension_sections: the image-text model's multimodal RoPE is not supported")


def _refused(c: Any) -> list[str]:
    """What llama.cpp's bailingmoe3 graph would not run as this model, by field."""
    n, kinds = c.num_hidden_layers, list(c.mlp_layer_types)
    lead = next((i for i, k in enumerate(kinds) if k != "dense"), n)
    rope = c.rope_parameters or {}
    checks = (
        (not c.kda_safe_gate, "kda_safe_gate false (it asserts the bounded forget gate)"),
        (not c.kda_lower_bound < 0, f"kda_lower_bound {c.kda_lower_bound} (it asserts a bound below 0)"),
        (c.linear_num_heads != c.num_attention_heads,
         f"linear_num_heads {c.linear_num_heads} (its KDA layers have num_attention_heads, {c.num_attention_heads})"),
        (c.rms_norm_eps != LORA_NORM_EPS, f"rms_norm_eps {c.rms_norm_eps} (it l2-norms the KDA q/k and norms the "
                                          f"latent with it, where Ling 3.0 uses {LORA_NORM_EPS})"),
        (rope.get("rope_type", "default") != "default",
         f"rope_parameters {rope} (it turns the plain RoPE only: rope_type 'default')"),
        (kinds != ["dense"] * lead + ["sparse"] * (n - lead),
         f"mlp_layer_types {kinds} (only leading dense layers, then mixtures)"),
        (c.attention_bias, "attention_bias (it reads no attention biases)"),
    )  # fmt: skip
    return [why for bad, why in checks if bad]


def write_config(m: dict[str, Any], c: Any) -> None:
    """GGUFLayout.write_config: the converter's keys (module docstring); ConfigError where llama.cpp's graph would
    not run the model as it is."""
    refused = _refused(c)
    if refused:
        raise ConfigError(f"llama.cpp's 'bailingmoe3' format cannot hold this {c.model_type!r} model: "
                          f"{'; '.join(refused)}")  # fmt: skip
    m["attention.head_count_kv"] = [0 if t == "linear_attention" else 1 for t in c.layer_types]
    m["attention.key_length"] = c.kv_lora_rank + c.qk_rope_head_dim
    m["attention.value_length"] = c.linear_head_dim  # config.json's head_dim, as TextModel writes it
    m["attention.key_length_mla"] = c.qk_head_dim
    m["kda.safe_gate"] = True
    m["kda.gate_lower_bound"] = float(c.kda_lower_bound)
    m["leading_dense_block_count"] = list(c.mlp_layer_types).count("dense")
    m["expert_shared_feed_forward_length"] = c.moe_intermediate_size * c.n_shared_experts
    m["expert_weights_scale"] = float(c.routed_scaling_factor)
    m["expert_weights_norm"] = bool(c.norm_topk_prob)
    m["expert_gating_func"] = SIGMOID_GATING
    if c.topk_group >= c.n_group:  # every group taken: no grouping (llama.cpp asserts fewer groups taken)
        m["expert_group_count"] = m["expert_group_used_count"] = 1
