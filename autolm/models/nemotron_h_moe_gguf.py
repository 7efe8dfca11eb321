"""Nemotron 3 (Nemotron-H with MoE blocks) as llama.cpp's NemotronHModel converter writes it: arch "nemotron_h_moe",
chosen there wherever config.json has num_experts_per_tok (here: wherever a block is "moe").

The Mamba-2 and attention blocks as the dense layout's (models.nemotron_h_gguf); each MoE block as
- ffn_gate_inp: the router's weight (kept F32), exp_probs_b.bias: its e_score_correction_bias;
- ffn_up_exps (E, I, d), ffn_down_exps (E, d, I): the experts' stacked up_proj / down_proj as they are (the
  converter stacks the checkpoint's one tensor per expert);
- ffn_up_shexp, ffn_down_shexp: the shared MLP; ffn_latent_down / ffn_latent_up: fc1_latent_proj / fc2_latent_proj
  (Nemotron 3 Super's latent projections, where moe_latent_size is set).

Metadata: the dense layout's keys, with the MoE intermediate size as feed_forward_length on MoE blocks (and on no
other: llama.cpp reads a block with a length as attention-free, and with experts in the file, as a MoE block), and
the expert keys (counts, sizes, expert_weights_norm / _scale, expert_group_count / _used_count (n_group, topk_group:
llama.cpp chooses among groups as DeepSeek V3 does), moe_latent_size where set).

What llama.cpp's graph cannot run is refused on GGUF out, naming the field: dense MLP blocks beside the MoE ones
(every feed-forward block of the format is a MoE one), biases on the shared MLP and latent projections
(mlp_bias), expert groups llama.cpp does not load (topk_group not below n_group, groups of one expert) and a
routed_scaling_factor of 0 (llama.cpp's graph reads it as 1).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..nn import GGUFLayout, Rename
from .glm4_moe import GROUPED_MOE_RULES
from .nemotron_h_gguf import _MIXER, LAYOUT

# checkpoint rules: llama.cpp's exp_probs_b.bias read as the router's e_score_correction_bias (and written back),
# its stacked experts (ffn_{up,down}_exps.weight, as the reader names them) as the parameters they are
GGUF_RULES = (
    *GROUPED_MOE_RULES.rules[-2:],
    Rename(r"(\.experts\.(?:up|down)_proj)\.weight$", r"\1", r"(?!)", ""),
)

_MOE = (
    ("ffn_gate_inp", "mixer.gate"),
    ("exp_probs_b", "mixer.gate.e_score_correction"),
    ("ffn_up_exps", "mixer.experts.up_proj"),
    ("ffn_down_exps", "mixer.experts.down_proj"),
    ("ffn_up_shexp", "mixer.shared_experts.up_proj"),
    ("ffn_down_shexp", "mixer.shared_experts.down_proj"),
    ("ffn_latent_down", "mixer.fc1_latent_proj"),
    ("ffn_latent_up", "mixer.fc2_latent_proj"),
)


def derive(d: dict[str, Any], get) -> None:
    """The block kinds from the per-layer KV head counts and feed-forward lengths (attention: KV heads; MoE: a
    length; Mamba-2: neither; a multi-token-prediction block the converter appends (nextn_predict_layers) left out,
    as transformers skips it), head_dim from attention.key_length, the Mamba-2 head size from ssm.inner_size; the
    lengths are the MoE blocks' (expert_feed_forward_length), not a dense intermediate_size."""
    kv, ff = d.get("num_key_value_heads"), d.pop("intermediate_size", None)
    nextn = get("nextn_predict_layers") or 0  # the converter's MTP draft block(s), appended
    if isinstance(kv, list) and isinstance(ff, list) and len(kv) == len(ff) > nextn:
        kv, ff = kv[: len(kv) - nextn], ff[: len(ff) - nextn]
        d["num_hidden_layers"] = len(kv)
        d["layers_block_type"] = [
            "full_attention" if k else "moe" if f else "linear_attention" for k, f in zip(kv, ff)
        ]
        d["num_key_value_heads"] = max(kv) or d.get("num_attention_heads")
        if max(ff):  # without expert_feed_forward_length, llama.cpp's: the length over the experts used
            d.setdefault("moe_intermediate_size", max(ff) // (d.get("num_experts_per_tok") or 1))
    d.setdefault("norm_topk_prob", False)  # llama.cpp's default where the file has no expert_weights_norm
    if get("attention.key_length") is not None:
        d["head_dim"] = get("attention.key_length")
    inner, heads = get("ssm.inner_size"), d.get("mamba_num_heads")
    if isinstance(inner, int) and isinstance(heads, int) and heads:
        d["mamba_head_dim"] = inner // heads


def write_config(out: dict[str, Any], c) -> None:
    """derive's inverse: what NemotronHModel.set_gguf_parameters writes for a MoE model beyond the generic keys;
    a model llama.cpp's graph would run otherwise is refused (module docstring)."""
    kinds = [c.block_type(i) for i in range(c.num_hidden_layers)]
    refuse = f"llama.cpp's 'nemotron_h_moe' format cannot hold this {c.model_type!r} model"
    if "mlp" in kinds:
        raise ConfigError(f"{refuse}: its layers_block_type has dense MLP blocks beside the MoE ones (every "
                          "feed-forward block of that format is a MoE one)")  # fmt: skip
    if c.n_group > 1 and not (c.topk_group < c.n_group and c.n_routed_experts >= 2 * c.n_group):
        raise ConfigError(f"{refuse}: n_group {c.n_group} with topk_group {c.topk_group} of "
                          f"{c.n_routed_experts} experts (llama.cpp loads expert groups only where topk_group is "
                          "less than n_group, each group of at least 2 experts)")  # fmt: skip
    if float(c.routed_scaling_factor) == 0:
        raise ConfigError(f"{refuse}: routed_scaling_factor 0 (llama.cpp's graph scales the routed experts by "
                          "1 where the file says 0)")  # fmt: skip
    LAYOUT.write_config(out, c)  # the dense layout's keys (feed-forward lengths below)
    out["feed_forward_length"] = [c.moe_intermediate_size if k == "moe" else 0 for k in kinds]
    out.setdefault("expert_shared_count", 1)  # config.json's n_shared_experts (transformers' default 1)
    out["expert_weights_norm"] = bool(c.norm_topk_prob)
    out["expert_weights_scale"] = float(c.routed_scaling_factor)


# the dense layout's keys, tensors and fixed values, with the experts'; llama.cpp's graph has no biases on the
# shared MLP or the latent projections
MOE_LAYOUT = GGUFLayout(
    "nemotron_h_moe",
    permute_qk=True,
    config=(
        *LAYOUT.config,
        ("expert_count", "n_routed_experts"),
        ("expert_used_count", "num_experts_per_tok"),
        ("expert_feed_forward_length", "moe_intermediate_size"),
        ("expert_shared_feed_forward_length", "moe_shared_expert_intermediate_size"),
        ("expert_shared_count", "n_shared_experts"),
        ("expert_weights_norm", "norm_topk_prob"),
        ("expert_weights_scale", "routed_scaling_factor"),
        ("expert_group_count", "n_group"),
        ("expert_group_used_count", "topk_group"),
        ("moe_latent_size", "moe_latent_size"),
    ),
    layer=(*(p for p in _MIXER if not p[0].startswith("ffn_")), *_MOE),
    top=LAYOUT.top,
    fixed=(*LAYOUT.fixed, ("mlp_bias", False)),
    derive=derive,
    write_config=write_config,
    bare=LAYOUT.bare,
)
