"""Qwen3-Next in llama.cpp's "qwen3next" format, as its converter (convert_hf_to_gguf.py, Qwen3NextModel) writes it.

Beyond Qwen 2 MoE's keys and stacked experts, the converter
- writes the linear layers' sizes as ssm.conv_kernel (the conv's kernel), ssm.state_size (the key head size),
  ssm.group_count (key heads), ssm.time_step_rank (value heads), ssm.inner_size (value heads times their size),
  the layer pattern as full_attention_interval and the rotary dimensions as rope.dimension_count;
- adds 1 to every zero-centred norm (Gemma's way) but the linear layers' gated norm (`ssm_norm`, kept as it is);
- stores A_log as A = -exp(A_log) (`ssm_a`, a name without a ".weight" suffix), dt_bias as `ssm_dt.bias`, the
  depthwise conv's (C, 1, K) weight squeezed to (C, K) (`ssm_conv1d`);
- splits in_proj_qkvz (rows grouped by key head: its q, k, its value heads' v and z) into `attn_qkv` (all q rows,
  then all k, then all v) and `attn_gate` (all z); in_proj_ba stays as it is (`ssm_ba`).

`Qwen3NextGGUF` is the checkpoint rule that undoes this on reading (the reader names the file's tensors under the
layout's module names below) and redoes it on GGUF out (`split`). llama.cpp's graph sizes the value heads by
ssm.state_size, so the key and value head sizes must be equal; it renormalises the top k, runs every layer as a
mixture and reads no attention biases: other values are refused on GGUF out.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

# llama.cpp's names -> the module names the GGUF reader gives the file's tensors (this rule's pieces)
GGUF_LINEAR = (
    ("ssm_a", "linear_attn.ssm_a"),
    ("ssm_dt", "linear_attn.dt_proj"),
    ("ssm_conv1d", "linear_attn.ssm_conv1d"),
    ("ssm_norm", "linear_attn.ssm_norm_unshifted"),  # not "...norm.weight": the layout's norm shift skips it
    ("ssm_ba", "linear_attn.in_proj_ba"),
    ("ssm_out", "linear_attn.out_proj"),
    ("attn_qkv", "linear_attn.in_proj_qkv"),
    ("attn_gate", "linear_attn.in_proj_z"),
    ("post_attention_norm", "post_attention_layernorm"),
)
GGUF_LINEAR_KEYS = (
    ("ssm.conv_kernel", "linear_conv_kernel_dim"),
    ("ssm.state_size", "linear_key_head_dim"),
    ("ssm.group_count", "linear_num_key_heads"),
    ("ssm.time_step_rank", "linear_num_value_heads"),
    ("attention.key_length", "head_dim"),
)
# the file's piece (as the reader names it) -> (the model's parameter, the piece's key)
_PIECES = {
    "ssm_a.weight": ("A_log", "a"),
    "dt_proj.bias": ("dt_bias", "dt"),
    "ssm_conv1d.weight": ("conv1d.weight", "conv"),
    "ssm_norm_unshifted.weight": ("norm.weight", "norm"),
    "in_proj_qkv.weight": ("in_proj_qkvz.weight", "qkv"),
    "in_proj_z.weight": ("in_proj_qkvz.weight", "z"),
}
_BACK = {model: piece for piece, (model, key) in _PIECES.items() if key not in ("qkv", "z")}


class Qwen3NextGGUF:
    """Checkpoint rule (autolm.nn.checkpoint's assembled rules): llama.cpp's linear-layer tensors <-> the model's
    (see the module docstring). Needs the config for the heads of in_proj_qkvz."""

    def __init__(self, config: Any):
        self.hk, self.dk = config.linear_num_key_heads, config.linear_key_head_dim
        self.vk = (
            config.linear_num_value_heads // self.hk * config.linear_value_head_dim
        )  # v rows per key head

    def piece(self, name: str) -> tuple[str, str] | None:
        m = re.fullmatch(r"(.+\.linear_attn)\.(\w+\.(?:weight|bias))", name)
        if m is None or m.group(2) not in _PIECES:
            return None
        target, key = _PIECES[m.group(2)]
        return f"{m.group(1)}.{target}", key

    def pieces(self, name: str) -> int:
        return 2 if name.endswith("in_proj_qkvz.weight") else 1

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        if "a" in got:
            t = torch.log(-got["a"].float())  # A = -exp(A_log)
        elif "conv" in got:
            t = (
                got["conv"].reshape(shape)
                if got["conv"].numel() == torch.Size(shape).numel()
                else got["conv"]
            )
        elif "qkv" in got:
            t = self._qkvz(got["qkv"], got["z"])
        else:
            t = next(iter(got.values()))
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: {name!r} from llama.cpp's "
                                  f"{ {k: tuple(v.shape) for k, v in got.items()} } is {tuple(t.shape)}; the model "
                                  f"expects {tuple(shape)}")  # fmt: skip
        return t.contiguous()

    def _qkvz(self, qkv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """[all q; all k; all v] and [all z] -> rows per key head [q, k, v, z]."""
        hk, dk, vk = self.hk, self.dk, self.vk
        if qkv.shape[0] != hk * (2 * dk + vk) or z.shape[0] != hk * vk:
            return torch.cat([qkv, z])  # the wrong size: assemble names the shapes
        q, k, v = qkv.split([hk * dk, hk * dk, hk * vk])
        parts = [t.reshape(hk, -1, t.shape[-1]) for t in (q, k, v, z)]
        return torch.cat(parts, dim=1).reshape(-1, qkv.shape[-1])

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        """GGUF out: the model's parameter -> [(llama.cpp's piece as the reader names it, tensor)], else None."""
        m = re.fullmatch(r"(.+\.linear_attn)\.(A_log|dt_bias|conv1d\.weight|norm\.weight|in_proj_qkvz\.weight)",
                         name)  # fmt: skip
        if m is None:
            return None
        prefix, part = m.groups()
        if part == "in_proj_qkvz.weight":
            hk, dk, vk = self.hk, self.dk, self.vk
            q, k, v, z = t.reshape(hk, -1, t.shape[-1]).split([dk, dk, vk, vk], dim=1)
            qkv = torch.cat([x.reshape(-1, t.shape[-1]) for x in (q, k, v)])
            return [
                (f"{prefix}.in_proj_qkv.weight", qkv),
                (f"{prefix}.in_proj_z.weight", z.reshape(-1, t.shape[-1])),
            ]
        if part == "A_log":
            t = -torch.exp(t.float())
        elif part == "conv1d.weight":
            t = t.reshape(t.shape[0], t.shape[-1])
        return [(f"{prefix}.{_BACK[part]}", t)]


def derive(d: dict[str, Any], get) -> None:
    """GGUFLayout.derive: the value head size, the layer pattern and the rotary share from llama.cpp's keys."""
    rank, inner, every = get("ssm.time_step_rank"), get("ssm.inner_size"), get("full_attention_interval", 4)
    if rank and inner is not None:
        d["linear_value_head_dim"] = inner // rank
    n = d.get("num_hidden_layers")
    if isinstance(n, int) and isinstance(every, int) and every > 0:
        d["layer_types"] = [
            "full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)
        ]
    rotary, head = get("rope.dimension_count"), d.get("head_dim")
    if rotary is not None and head:
        d["rope_parameters"]["partial_rotary_factor"] = rotary / head


def write_config(meta: dict[str, Any], c: Any) -> None:
    """GGUFLayout.write_config: derive's inverse; ConfigError where llama.cpp's graph cannot run the model."""
    types = list(c.layer_types)
    every = types.index("full_attention") + 1 if "full_attention" in types else 0
    pattern = [
        "full_attention" if every and (i + 1) % every == 0 else "linear_attention" for i in range(len(types))
    ]
    if not every or types != pattern:
        raise ConfigError(f"llama.cpp's format cannot hold this {c.model_type!r} model: its layer_types "
                          f"{types} are not every full_attention_interval-th layer full attention")  # fmt: skip
    if c.linear_value_head_dim != c.linear_key_head_dim:
        raise ConfigError(f"llama.cpp's format cannot hold this {c.model_type!r} model: its graph "
                          f"sizes the value heads as the key heads (linear_value_head_dim "
                          f"{c.linear_value_head_dim}, linear_key_head_dim {c.linear_key_head_dim})")  # fmt: skip
    meta["ssm.inner_size"] = c.linear_value_head_dim * c.linear_num_value_heads
    meta["full_attention_interval"] = every
    meta["rope.dimension_count"] = int(c.head_dim * c.rope_parameters.get("partial_rotary_factor", 0.25))


# ---- Qwen 3.5 ("qwen35", "qwen35moe": Qwen3_5TextModel, the same conversion on four separate projections) -----------

GGUF_LINEAR_35 = (
    *(pair for pair in GGUF_LINEAR if pair[0] not in ("ssm_ba", "ssm_out", "attn_qkv", "attn_gate")),
    ("ssm_beta", "linear_attn.gguf_b"),
    ("ssm_alpha", "linear_attn.gguf_a"),
    ("ssm_out", "linear_attn.gguf_out"),
    ("attn_qkv", "linear_attn.gguf_qkv"),
    ("attn_gate", "linear_attn.gguf_z"),
)
_PIECES_35 = {
    **{piece: model for piece, (model, key) in _PIECES.items() if key not in ("qkv", "z")},
    **{f"gguf_{p}.weight": f"{m}.weight" for p, m in (("qkv", "in_proj_qkv"), ("z", "in_proj_z"), ("b", "in_proj_b"),
                                                    ("a", "in_proj_a"), ("out", "out_proj"))},
}  # fmt: skip
_BACK_35 = {model: piece for piece, model in _PIECES_35.items()}


class Qwen35GGUF:
    """Checkpoint rule for Qwen 3.5's linear layers: Qwen3NextGGUF's transforms, and the value heads, grouped by key
    head in the model ([k0's v0, v1, k1's v0, v1]), tiled in the file ([k0's v0, k1's v0, k0's v1, k1's v1]) in
    every tensor that has them (the converter's _LinearAttentionVReorderBase)."""

    def __init__(self, config: Any):
        self.hk = config.linear_num_key_heads
        self.r = config.linear_num_value_heads // self.hk
        self.dv, self.qk = config.linear_value_head_dim, 2 * self.hk * config.linear_key_head_dim
        # the model's parameter -> (dim, rows per value head, leading rows that are no value heads')
        self.value_heads = {"A_log": (0, 1, 0), "dt_bias": (0, 1, 0), "conv1d.weight": (0, self.dv, self.qk),
                            "in_proj_qkv.weight": (0, self.dv, self.qk), "in_proj_z.weight": (0, self.dv, 0),
                            "in_proj_b.weight": (0, 1, 0), "in_proj_a.weight": (0, 1, 0),
                            "out_proj.weight": (1, self.dv, 0)}  # fmt: skip

    def piece(self, name: str) -> tuple[str, str] | None:
        m = re.fullmatch(r"(.+\.linear_attn)\.(\w+\.(?:weight|bias))", name)
        if m is None or m.group(2) not in _PIECES_35:
            return None
        return f"{m.group(1)}.{_PIECES_35[m.group(2)]}", m.group(2)

    def pieces(self, name: str) -> int:
        return 1

    def order(self, t: torch.Tensor, part: str, tiled: bool) -> torch.Tensor:
        """The value heads of the model's `part` grouped by key head -> tiled (`tiled`), or back."""
        if part not in self.value_heads or self.r == 1:
            return t
        dim, width, skip = self.value_heads[part]
        head, rest = t.narrow(dim, 0, skip), t.narrow(dim, skip, t.shape[dim] - skip)
        a, b = (self.hk, self.r) if tiled else (self.r, self.hk)
        shape = rest.shape
        rest = (
            rest.reshape(*shape[:dim], a, b, width, *shape[dim + 1 :]).transpose(dim, dim + 1).reshape(shape)
        )
        return torch.cat([head, rest], dim)

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        (key, t), part = next(iter(got.items())), _PIECES_35[next(iter(got))]
        if key == "ssm_a.weight":
            t = torch.log(-t.float())  # A = -exp(A_log)
        if t.numel() == torch.Size(shape).numel():
            t = self.order(t.reshape(shape), part, tiled=False)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: {name!r} from llama.cpp's {key} {tuple(got[key].shape)}; the model "
                                  f"expects {tuple(shape)}")  # fmt: skip
        return t.contiguous()

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        """GGUF out: the model's parameter -> [(llama.cpp's piece as the reader names it, tensor)], else None."""
        prefix, _, part = name.partition(".linear_attn.")
        if not part or part not in _BACK_35:
            return None
        t = self.order(t, part, tiled=True)
        if part == "A_log":
            t = -torch.exp(t.float())
        elif part == "conv1d.weight":
            t = t.reshape(t.shape[0], t.shape[-1])
        return [(f"{prefix}.linear_attn.{_BACK_35[part]}", t)]


def write_config_35(meta: dict[str, Any], c: Any) -> None:
    """write_config, and the multimodal RoPE sections (four; llama.cpp's default where the config has none)."""
    write_config(meta, c)
    sections = list(c.rope_parameters.get("mrope_section") or [11, 11, 10])
    meta["rope.dimension_sections"] = (sections + [0] * 4)[:4]


def derive_35(d: dict[str, Any], get) -> None:
    """derive, and the RoPE sections kept in rope_parameters (text positions rotate alike in every section)."""
    derive(d, get)
    sections = get("rope.dimension_sections")
    if sections is not None:
        d["rope_parameters"]["mrope_section"] = [int(x) for x in sections[:3]]
