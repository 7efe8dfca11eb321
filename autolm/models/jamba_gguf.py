"""Jamba as llama.cpp's JambaModel converter writes it (arch "jamba"):

- the Mamba layers' mixer (`mamba`) as Mamba's (models.mamba.MambaGGUF): ssm_in, ssm_x, ssm_dt (weight and bias),
  ssm_out, ssm_conv1d squeezed to (I, K) with its bias, ssm_a = -exp(A_log) and ssm_d = D without ".weight"
  (A read back as log(-a), which may differ from A_log in its last bit), and Jamba's weighted norms of the time
  step, B and C as ssm_dt_norm, ssm_b_norm, ssm_c_norm;
- attention as Llama's (no q/k permutation: there is no RoPE), the dense MLPs as ffn_gate / ffn_up / ffn_down,
  the router as ffn_gate_inp and the experts stacked as ffn_{gate,up,down}_exps; the norms input_layernorm and
  pre_ff_layernorm as attn_norm and ffn_norm, final_layernorm as output_norm.

Metadata: context length, sizes, head count, head_count_kv per layer (the KV head count on attention layers, 0 on
Mamba layers: llama.cpp's layer kinds), the ssm.* sizes (inner size mamba_expand * hidden_size), expert_count and
expert_used_count. llama.cpp knows a mixture layer by its ffn_gate_inp tensor: the reader takes the attention and
expert layers' periods and offsets from the KV head counts and those tensors. llama.cpp's graph has SiLU in the
mixers and MLPs, a conv bias, no in/out projection biases and an expansion factor of 2 (other values refused on
GGUF out), and weights the top experts' softmax probabilities unrenormalised, as Jamba does.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..nn import GGUFLayout

_MAX_LAYERS = 512  # layers whose ffn_gate_inp the reader looks for (Jamba 1.5 Large has 72)
_MOE_FLAG = "gguf moe layer "  # the reader's marks of the layers holding ffn_gate_inp (popped by derive)
# attention keys autolm's metadata would write that the converter does not
_NOT_WRITTEN = ("rope.dimension_count", "attention.key_length", "attention.value_length", "rope.freq_base")


def period_and_offset(layers: list[int], n: int, what: str) -> tuple[int, int]:
    """(period, offset) whose layers i < n with i % period == offset are exactly `layers` (sorted): ConfigError
    where no such pair exists."""
    if not layers:
        return n + 1, n  # no layer of this kind
    offset = layers[0]
    period = layers[1] - layers[0] if len(layers) > 1 else max(n, offset + 1)
    if offset >= period or [i for i in range(n) if i % period == offset] != layers:
        raise ConfigError(f"a 'jamba' GGUF whose {what} layers {layers} are not every period-th layer from an "
                          f"offset below the period (Jamba's {what}_layer_period / _offset)")  # fmt: skip
    return period, offset


def derive(d: dict[str, Any], get) -> None:
    """The attention layers (a KV head count) and the expert layers (ffn_gate_inp present) as Jamba's periods and
    offsets; num_key_value_heads the attention layers' count."""
    n = d.get("num_hidden_layers")
    flags = [k for k in d if k.startswith(_MOE_FLAG)]
    moe = sorted(int(k[len(_MOE_FLAG) :]) for k in flags)
    for k in flags:
        del d[k]
    kv = d.get("num_key_value_heads")
    if not isinstance(n, int) or not isinstance(kv, list):
        return
    attention = [i for i, k in enumerate(kv) if k]
    d["attn_layer_period"], d["attn_layer_offset"] = period_and_offset(attention, n, "attn")
    d["expert_layer_period"], d["expert_layer_offset"] = period_and_offset(moe, n, "expert")
    d["num_key_value_heads"] = max(kv) or d.get("num_attention_heads")


def write_config(out: dict[str, Any], c) -> None:
    """derive's inverse: what JambaModel.set_gguf_parameters writes beyond the generic keys."""
    for key in _NOT_WRITTEN:
        out.pop(key, None)
    out["attention.head_count_kv"] = [
        c.num_key_value_heads if c.is_attention(i) else 0 for i in range(c.num_hidden_layers)
    ]
    out["ssm.inner_size"] = c.mamba_expand * c.hidden_size


def compared(c) -> dict[str, Any]:
    """What GGUF out compares of the layer kinds: which layers are attention and which have experts (the periods
    and offsets themselves are not compared: llama.cpp's file has the layers, not the pattern)."""
    n = c.num_hidden_layers
    out: dict[str, Any] = {
        "attention layers": [i for i in range(n) if c.is_attention(i)],
        "expert layers": [i for i in range(n) if c.has_experts(i)],
    }
    if not out["attention layers"]:
        out["num_key_value_heads"] = None  # read nowhere
    return out


NOT_COMPARED = ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")

LAYOUT = GGUFLayout(
    "jamba",
    config=(
        ("ssm.conv_kernel", "mamba_d_conv"),
        ("ssm.state_size", "mamba_d_state"),
        ("ssm.time_step_rank", "mamba_dt_rank"),
        ("expert_count", "num_experts"),
        ("expert_used_count", "num_experts_per_tok"),
    ),
    layer=(
        ("ffn_norm", "pre_ff_layernorm"),
        ("ssm_in", "mamba.in_proj"),
        ("ssm_x", "mamba.x_proj"),
        ("ssm_dt", "mamba.dt_proj"),
        ("ssm_out", "mamba.out_proj"),
        ("ssm_dt_norm", "mamba.dt_layernorm"),
        ("ssm_b_norm", "mamba.b_layernorm"),
        ("ssm_c_norm", "mamba.c_layernorm"),
        *(
            (stem, f"mamba.{stem}") for stem in ("ssm_conv1d", "ssm_a", "ssm_d")
        ),  # MambaGGUF("mamba")'s pieces
        ("ffn_gate", "feed_forward.gate_proj"),
        ("ffn_up", "feed_forward.up_proj"),
        ("ffn_down", "feed_forward.down_proj"),
        ("ffn_gate_inp", "feed_forward.router"),
        ("ffn_gate_exps", "feed_forward.experts.gate_proj"),  # GGUFExperts joins gate and up
        ("ffn_up_exps", "feed_forward.experts.up_proj"),
        ("ffn_down_exps", "feed_forward.experts.down_proj"),
    ),
    top=(("output_norm", "model.final_layernorm"),),
    fixed=(
        ("hidden_act", "silu"),
        ("mamba_conv_bias", True),
        ("mamba_proj_bias", False),
        ("mamba_expand", 2),
    ),
    present=tuple((f"blk.{i}.ffn_gate_inp.weight", f"{_MOE_FLAG}{i}") for i in range(_MAX_LAYERS)),
    derive=derive,
    write_config=write_config,
    bare=("ssm_a", "ssm_d"),
)
