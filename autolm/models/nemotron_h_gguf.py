"""Nemotron-H (the dense layout: Mamba-2, attention and MLP blocks) as llama.cpp's NemotronHModel converter writes it
(arch "nemotron_h", GraniteHybridModel's keys and tensors):

- the Mamba-2 mixers' tensors as Mamba2Model writes them (models.granitemoehybrid_gguf.MambaGGUF, under `mixer`):
  ssm_in, ssm_out; ssm_conv1d squeezed to (C, K) with its bias; ssm_dt.bias (dt_bias); ssm_a = -exp(A_log) and
  ssm_d = D as (H, 1), both without ".weight" (A read back as log(-a), which may differ from A_log in its last
  bit); ssm_norm as (groups, width / groups);
- attention q/k rows permuted as Llama's (the converter's undo_permute; llama.cpp has no RoPE here, so the order
  changes nothing it computes), the MLP blocks' up_proj / down_proj (and biases) as ffn_up / ffn_down.

Metadata: the ssm.* sizes (inner size mamba_num_heads * mamba_head_dim, heads as time_step_rank), head_count_kv
and feed_forward_length per layer (llama.cpp's layer kinds: a KV head count on attention blocks, a length on MLP
blocks, both 0 on Mamba-2 blocks), attention.key_length = head_dim (rope.dimension_count is Granite's
hidden_size / heads), rope.scaling.finetuned false and the context length 2**20. llama.cpp writes the MoE blocks of
Nemotron 3 under another arch, "nemotron_h_moe" (models.nemotron_h_moe_gguf): a model with MoE blocks goes out
in that layout.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..nn import GGUFLayout
from .granitemoehybrid_gguf import NO_ROPE_CONTEXT, MambaGGUF

_PARTS = r"(A_log|D|conv1d\.weight|conv1d\.bias|norm\.weight|dt_bias)"


class MixerGGUF(MambaGGUF):
    """MambaGGUF for Mamba-2 mixers named `mixer` (on Nemotron-H's Mamba-2 blocks)."""

    _READ = tuple((p.replace(r"\.mamba)", r"\.mixer)"), t, k) for p, t, k in MambaGGUF._READ if "mamba" in p)

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        m = re.fullmatch(rf"(.+)\.mixer\.{_PARTS}", name)
        if m is None:
            return None
        out = super().split(f"{m.group(1)}.mamba.{m.group(2)}", t)
        return [(n.replace(".mamba.", ".mixer."), v) for n, v in out]


def derive(d: dict[str, Any], get) -> None:
    """The block kinds from the per-layer KV head counts and feed-forward lengths (attention: KV heads; MLP: a
    length; Mamba-2: neither), head_dim from attention.key_length, the Mamba-2 head size from ssm.inner_size."""
    kv, ff = d.get("num_key_value_heads"), d.get("intermediate_size")
    if isinstance(kv, list) and isinstance(ff, list) and len(kv) == len(ff):
        d["layers_block_type"] = [
            "full_attention" if k else "mlp" if f else "linear_attention" for k, f in zip(kv, ff)
        ]
        d["num_key_value_heads"] = max(kv) or d.get("num_attention_heads")
        if max(ff):
            d["intermediate_size"] = max(ff)
        else:
            del d["intermediate_size"]  # no MLP block: the default
    if get("attention.key_length") is not None:
        d["head_dim"] = get("attention.key_length")
    inner, heads = get("ssm.inner_size"), d.get("mamba_num_heads")
    if isinstance(inner, int) and isinstance(heads, int) and heads:
        d["mamba_head_dim"] = inner // heads


def write_config(out: dict[str, Any], c) -> None:
    """derive's inverse: what NemotronHModel.set_gguf_parameters writes beyond the generic keys (a model with MoE
    blocks goes out in the "nemotron_h_moe" layout, whose write_config takes these keys)."""
    kinds = [c.block_type(i) for i in range(c.num_hidden_layers)]
    out["ssm.inner_size"] = c.mamba_num_heads * c.mamba_head_dim
    out["attention.head_count_kv"] = [c.num_key_value_heads if k == "full_attention" else 0 for k in kinds]
    out["feed_forward_length"] = [c.intermediate_size if k == "mlp" else 0 for k in kinds]
    out["rope.dimension_count"] = (
        c.hidden_size // c.num_attention_heads
    )  # Granite's: head_dim is dropped there
    out["attention.layer_norm_epsilon"] = c.rms_norm_eps  # TextModel's, off config.json's layer_norm_epsilon
    out["rope.scaling.finetuned"] = False  # GraniteHybridModel's: no RoPE in a hybrid
    out["context_length"] = NO_ROPE_CONTEXT


_MIXER = (
    ("ssm_in", "mixer.in_proj"),
    ("ssm_out", "mixer.out_proj"),
    *(
        (stem, f"mixer.{stem}") for stem in ("ssm_conv1d", "ssm_dt", "ssm_a", "ssm_d", "ssm_norm")
    ),  # MixerGGUF's
    ("attn_norm", "norm"),
    ("attn_q", "mixer.q_proj"),
    ("attn_k", "mixer.k_proj"),
    ("attn_v", "mixer.v_proj"),
    ("attn_output", "mixer.o_proj"),
    ("ffn_up", "mixer.up_proj"),
    ("ffn_down", "mixer.down_proj"),
)
# what llama.cpp's graph does not read: no Mamba-2 in/out projection biases, the conv bias, SiLU in the mixer,
# squared ReLU in the MLP; it does not clamp the time steps either: transformers' clamp at time_step_min is taken
# as every released checkpoint's 0.001 (a file cannot say otherwise)
LAYOUT = GGUFLayout(
    "nemotron_h",
    permute_qk=True,
    config=(
        ("ssm.conv_kernel", "conv_kernel"),
        ("ssm.state_size", "ssm_state_size"),
        ("ssm.group_count", "n_groups"),
        ("ssm.time_step_rank", "mamba_num_heads"),
    ),
    layer=_MIXER,
    top=(("token_embd", "model.embeddings"), ("output_norm", "model.norm_f")),
    fixed=(
        ("use_bias", False),
        ("use_conv_bias", True),
        ("mamba_hidden_act", "silu"),
        ("hidden_act", "relu2"),
        ("time_step_min", 0.001),
    ),
    present=tuple((f"blk.{i}.ffn_up.bias", "mlp_bias") for i in range(256)),  # any MLP block's up bias
    derive=derive,
    write_config=write_config,
    bare=("ssm_a", "ssm_d"),
)
# the fields of the MLP and the MoE blocks: compared only where the model has such blocks (compared)
MLP_FIELDS = ("intermediate_size", "mlp_bias")
MOE_FIELDS = ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size",
              "num_experts_per_tok", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob", "mlp_bias")  # fmt: skip
# fields GGUF out compares its own way: the context length is written as 2**20, the chunk size changes only the
# scan's rounding, attention_bias is read nowhere, the MLP and MoE fields as compared says
NOT_COMPARED = ("max_position_embeddings", "chunk_size", "attention_bias", *MLP_FIELDS, *MOE_FIELDS)


def compared(c) -> dict[str, Any]:
    """What GGUF out compares beyond the config's plain fields: the block kinds, the MLP blocks' fields where the
    model has MLP blocks, the MoE blocks' where it has MoE blocks (a file of the other kind has no room for them)."""
    kinds = [c.block_type(i) for i in range(c.num_hidden_layers)]
    fields = (MLP_FIELDS if "mlp" in kinds else ()) + (MOE_FIELDS if "moe" in kinds else ())
    return {"layers_block_type": kinds, **{f: getattr(c, f) for f in fields}}
