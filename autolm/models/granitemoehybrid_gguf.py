"""Granite 4.0 hybrid as llama.cpp's GraniteHybridModel converter writes it (arch "granitehybrid"): Granite MoE's
tensors and keys (Llama's q/k permutation, the multipliers as "scale" keys, the experts split into gate and up),
the shared MLP split into gate and up as ffn_{gate,up,down}_shexp (or as the plain ffn_{gate,up,down} of a dense
checkpoint), and Mamba2Model's mixer tensors:

- ssm_in, ssm_out: in_proj, out_proj as they are; ssm_dt.bias: dt_bias;
- ssm_conv1d: the conv weight (C, 1, K) squeezed to (C, K), its bias as it is;
- ssm_a: -exp(A_log) as (H, 1) (named without ".weight"); read back as log(-a), which may differ from A_log in
  its last bit; ssm_d: D as (H, 1) (named without ".weight");
- ssm_norm: the gated norm's weight as (groups, width / groups).

Metadata: the Mamba-2 sizes as ssm.* keys (inner size, state size, groups, heads as time_step_rank, conv kernel),
head_count_kv per layer (0 on Mamba-2 layers: the layer pattern), RoPE only where `rope.scaling.finetuned` is true
(the converter writes it false for every hybrid) and, with no RoPE, the context length as 2**20.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

NO_ROPE_CONTEXT = 1 << 20  # the converter's context length for a model without RoPE


class MambaGGUF:
    """llama.cpp's Mamba-2 and shared-MLP tensors as the reader names them (models.granitemoehybrid's layout) ->
    the model's parameters, and back (GGUF out); an assembling checkpoint rule (nn.checkpoint)."""

    _READ = (
        (r"(.+\.mamba)\.ssm_a\.weight", "A_log", "a"),
        (r"(.+\.mamba)\.ssm_d\.weight", "D", "d"),
        (r"(.+\.mamba)\.ssm_conv1d\.(weight|bias)", "conv1d.{}", "conv"),
        (r"(.+\.mamba)\.ssm_norm\.weight", "norm.weight", "norm"),
        (r"(.+\.mamba)\.ssm_dt\.bias", "dt_bias", "dt"),
        (r"(.+\.shared_mlp)\.(gate|up)_proj\.weight", "input_linear.weight", None),
    )

    def __init__(self, n_groups: int = 1):
        self.n_groups = n_groups  # the gated norm's groups: ssm_norm's rows (GGUF out)

    def piece(self, name: str) -> tuple[str, str] | None:
        for pattern, target, key in self._READ:
            m = re.fullmatch(pattern, name)
            if m:
                second = m.group(2) if m.lastindex == 2 else None
                return f"{m.group(1)}.{target.format(second)}", key or second
        return None

    def pieces(self, name: str) -> int:
        return 2 if name.endswith("shared_mlp.input_linear.weight") else 1

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        if "gate" in got:
            t = torch.cat([got["gate"], got["up"]], 0)
        else:
            (key, t), = got.items()  # fmt: skip
            if key == "a":
                t = torch.log(-t)
        if t.numel() != torch.Size(shape).numel() or ("gate" in got and tuple(t.shape) != tuple(shape)):
            raise CheckpointError(f"{source}: {name!r} from llama.cpp's {tuple(t.shape)} does not fit the model's "
                                  f"{tuple(shape)}")  # fmt: skip
        return t.reshape(shape).contiguous()

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        m = re.fullmatch(r"(.+\.mamba)\.(A_log|D|conv1d\.weight|conv1d\.bias|norm\.weight|dt_bias)", name)
        if m is None:
            m = re.fullmatch(r"(.+\.shared_mlp)\.input_linear\.weight", name)
            if m is None:
                return None
            gate, up = t.chunk(2, 0)
            return [(f"{m.group(1)}.gate_proj.weight", gate), (f"{m.group(1)}.up_proj.weight", up)]
        prefix, part = m.groups()
        out = {
            "A_log": ("ssm_a.weight", lambda: -torch.exp(t).reshape(-1, 1)),  # written without ".weight"
            "D": ("ssm_d.weight", lambda: t.reshape(-1, 1)),
            "conv1d.weight": ("ssm_conv1d.weight", lambda: t.squeeze(1)),
            "conv1d.bias": ("ssm_conv1d.bias", lambda: t),
            "norm.weight": ("ssm_norm.weight", lambda: t.reshape(self.n_groups, -1)),
            "dt_bias": ("ssm_dt.bias", lambda: t),
        }[part]
        return [(f"{prefix}.{out[0]}", out[1]().contiguous())]


def derive(d: dict[str, Any], get) -> None:
    """The config fields llama.cpp reads its own way: the layer pattern from the per-layer KV head counts (0 on
    Mamba-2 layers), RoPE from rope.scaling.finetuned, the Mamba-2 width and head size from ssm.inner_size."""
    kv = d.get("num_key_value_heads")
    if isinstance(kv, list):
        d["layer_types"] = ["attention" if k else "mamba" for k in kv]
        d["num_key_value_heads"] = max(kv) or d.get("num_attention_heads")
    d["position_embedding_type"] = "rope" if get("rope.scaling.finetuned") else None
    inner, heads, hidden = get("ssm.inner_size"), d.get("mamba_n_heads"), d.get("hidden_size")
    if isinstance(inner, int) and isinstance(heads, int) and isinstance(hidden, int) and heads and hidden:
        d["mamba_expand"], d["mamba_d_head"] = inner // hidden, inner // heads
    d.setdefault("num_local_experts", 0)
    if not d[
        "num_local_experts"
    ]:  # llama.cpp sizes a dense layer's MLP (the shared one) by feed_forward_length
        d["shared_intermediate_size"] = d.get("intermediate_size")
    if (d.get("num_experts_per_tok") or 0) > d[
        "num_local_experts"
    ]:  # llama.cpp asserts on loading such a file
        raise ConfigError(
            f"expert_used_count {d['num_experts_per_tok']} is more than expert_count {d['num_local_experts']}: "
            "llama.cpp cannot load it (num_experts_per_tok)"
        )


def write_config(out: dict[str, Any], c) -> None:
    """derive's inverse: what GraniteHybridModel.set_gguf_parameters writes beyond Granite MoE's keys."""
    if c.step_limit() != (0.0, math.inf):  # llama.cpp does not clamp the time steps
        raise ConfigError(f"llama.cpp's 'granitehybrid' format cannot hold this {c.model_type!r} model: its "
                          f"graph does not clamp the time steps (time_step_limit {c.time_step_limit!r})")  # fmt: skip
    mamba = [c.is_mamba(i) for i in range(c.num_hidden_layers)]
    out["ssm.inner_size"] = c.mamba_n_heads * c.mamba_d_head
    out["attention.head_count_kv"] = [0 if m else c.num_key_value_heads for m in mamba]
    out["rope.scaling.finetuned"] = not any(mamba)  # the converter's RoPE: only where no layer is Mamba-2
    if any(mamba):
        out["context_length"] = NO_ROPE_CONTEXT
