"""Falcon-H1 as llama.cpp's FalconH1Model converter writes it (arch "falcon-h1"): Mamba2Model's mixer tensors
(models.granitemoehybrid_gguf's MambaGGUF: ssm_a as -exp(A_log), ssm_d, the squeezed conv, ssm_dt.bias, ssm_norm
as (groups, width / groups)), Llama's attention tensors without the q/k permutation (llama.cpp runs the family with
NeoX RoPE), the feed-forward norm as `ffn_norm` without ".weight" (the converter's name map gives it whole).

The converter writes none of the multipliers: it folds them into the weights (token_embd times
embedding_multiplier, output times lm_head_multiplier, q/v times attention_in_multiplier, k times key_multiplier
and attention_in_multiplier, attn_output times attention_out_multiplier, ssm_in times ssm_in_multiplier and each
of its five parts (gate, x, B, C, dt) times its ssm_multipliers entry, ssm_out times ssm_out_multiplier, ffn_gate
and ffn_down times mlp_multipliers). A file therefore reads back with every multiplier 1 and the folded weights,
which compute the same; GGUF out folds them again (FalconH1GGUF.split) as the converter does, byte for byte.

Metadata: Mamba2Model's ssm.* sizes (inner size, state size, groups, heads as time_step_rank, conv kernel) and
FalconH1Model's attention keys (head counts, key/value length, RoPE base, context length, feed-forward length).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from .granitemoehybrid_gguf import MambaGGUF

NO_LIMIT = [0.0, {"__float__": "Infinity"}]  # time_step_limit's default: no clamp of the time steps
# the multipliers the converter folds into the weights (read back as 1)
FOLDED = ("lm_head_multiplier", "embedding_multiplier", "key_multiplier", "attention_out_multiplier",
          "attention_in_multiplier", "ssm_in_multiplier", "ssm_out_multiplier", "mlp_multipliers",
          "ssm_multipliers")  # fmt: skip


class FalconH1GGUF(MambaGGUF):
    """MambaGGUF's mixer tensors; on GGUF out, the multipliers folded into the weights first (FalconH1Model's
    modify_tensors, the same float operations in the same order)."""

    def __init__(self, config: Any = None):
        super().__init__(config.mamba_n_groups if config is not None else 1)
        self.config = config

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if self.config is None:
            return super().split(name, t)
        folded = self.folded(name, t)
        return super().split(name, folded) or ([(name, folded)] if folded is not t else None)

    def folded(self, name: str, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        if "down_proj" in name:
            return t * c.mlp_multipliers[1]
        if "gate_proj" in name:
            return t * c.mlp_multipliers[0]
        if "k_proj" in name:
            return t * c.key_multiplier * c.attention_in_multiplier
        if "q_proj" in name or "v_proj" in name:
            return t * c.attention_in_multiplier
        if "o_proj" in name:
            return t * c.attention_out_multiplier
        if "out_proj" in name:
            return t * c.ssm_out_multiplier
        if "in_proj" in name:
            t = t * c.ssm_in_multiplier
            width, gs = c.mamba_ssm_width, c.mamba_n_groups * c.mamba_d_state
            bounds = (0, width, 2 * width, 2 * width + gs, 2 * width + 2 * gs, t.shape[0])
            for i, m in enumerate(c.ssm_multipliers):
                t[bounds[i] : bounds[i + 1], :] *= m
            return t
        if "lm_head" in name:
            return t * c.lm_head_multiplier
        if "embed_tokens" in name:
            return t * c.embedding_multiplier
        return t


def derive(d: dict[str, Any], get) -> None:
    """The head size from attention.key_length (the converter writes no rope.dimension_count)."""
    if get("attention.key_length") is not None:
        d["head_dim"] = get("attention.key_length")


def write_config(out: dict[str, Any], c) -> None:
    """What FalconH1Model.set_gguf_parameters writes beyond autolm's common keys; what llama.cpp's graph cannot
    run (a clamp of the time steps, the gated norm before the gate, a tied head the multipliers tell apart from
    the embeddings) refused."""
    if c.step_limit() != (0.0, math.inf):
        raise ConfigError(f"llama.cpp's 'falcon-h1' format cannot hold this {c.model_type!r} model: its graph "
                          f"does not clamp the time steps (time_step_limit {c.time_step_limit!r})")  # fmt: skip
    if c.mamba_rms_norm and c.mamba_norm_before_gate:
        raise ConfigError(f"llama.cpp's 'falcon-h1' format cannot hold this {c.model_type!r} model: its graph "
                          "norms after the gate (mamba_norm_before_gate true)")  # fmt: skip
    if c.tie_word_embeddings and c.lm_head_multiplier != c.embedding_multiplier:
        raise ConfigError(f"llama.cpp's 'falcon-h1' format cannot hold this {c.model_type!r} model: a tied head "
                          f"is the embeddings times embedding_multiplier there (lm_head_multiplier "
                          f"{c.lm_head_multiplier} differs)")  # fmt: skip
    out.pop("rope.dimension_count", None)
    out["ssm.inner_size"] = c.mamba_ssm_width
