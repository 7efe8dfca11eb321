"""Mamba-2 (state-spaces/mamba2-130m ... mamba2-2.7b, mistralai/Mamba-Codestral-7B-v0.1): every layer a Mamba-2
mixer (state-space duality: autolm.nn.mamba2's Mamba2Mixer, `in_proj`, a depthwise `conv1d` over x, B and C,
`dt_bias`, `A_log`, `D`, the gated RMSNorm `norm` and `out_proj`) under an RMSNorm (`norm`), with no attention and
no position embeddings; a final RMSNorm `norm_f`; the head untied by default. Built as autolm.models.mamba's Mamba:

- the body is `backbone` (embeddings, layers, norm_f), reached by autolm's code as `model`, `embed_tokens`,
  `layers` and `norm`; old checkpoints' `backbone.embedding` is read as well;
- `residual_in_fp32` (the default): the residual stream is kept in float32, each norm reads it in the weights'
  dtype;
- the cache holds no keys or values: each layer's (conv state, SSM state) in its `states`; no context window.

The mixer: `num_heads` heads of `head_dim` channels (num_heads * head_dim = expand * hidden_size, the mixer's
width), an N = `state_size` state per channel, B and C shared by the heads of each of `n_groups` groups; the gated
norm is norm(y * silu(z)) over each group's width / n_groups channels (transformers' norm_before_gate false), at
the layers' epsilon; the scan in chunks of `chunk_size` tokens; dt = softplus(dt + dt_bias) clamped to
`time_step_limit` (default [0, inf]: no clamp). `use_bias`: in_proj and out_proj biases; `use_conv_bias`.
config.json names: `layer_norm_epsilon` (autolm's rms_norm_eps), `head_dim` (the mixer's head size: autolm's
attention head_dim is unused here); `time_step_rank`, `time_step_min/max/floor`, `rescale_prenorm_residual`,
`initializer_range` are written back as read and change nothing computed.

GGUF (llama.cpp's "mamba2", as its Mamba2Model converter writes it): the norm as attn_norm, the mixer as ssm_in,
ssm_conv1d (the conv weight (C, 1, K) squeezed to (C, K), its bias as it is), ssm_dt.bias (dt_bias), ssm_a
(-exp(A_log) as (H, 1), no ".weight"; read back as log(-a), which may differ from A_log in its last bit), ssm_d
(D as (H, 1), no ".weight"), ssm_norm (the gated norm's weight as (groups, width / groups)), ssm_out; the head
omitted where tied. Metadata: the context length as 2**20, zero feed-forward length and head count, the ssm.*
sizes (conv kernel, inner size, state size, group count, the heads as time_step_rank). llama.cpp's graph has no
in_proj/out_proj bias, always a conv bias, SiLU and no clamp of the time steps: other values are refused on GGUF
out, naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import PretrainedConfig, _is_int
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import CheckpointRules, GGUFLayout, Rename
from ..nn.mamba2 import Mamba2Mixer
from . import mamba
from .granitemoehybrid import GraniteMoeHybridConfig
from .mamba import GGUF_CONTEXT, NOT_MAMBA, MambaBlock, MambaConfig, MambaForCausalLM, MambaModel
from .nemotron_h_gguf import MixerGGUF

NO_LIMIT = [0.0, {"__float__": "Infinity"}]  # time_step_limit's default (as transformers writes it): no clamp
_OLD_EMBEDDING = Rename(r"^backbone\.embedding\.", "backbone.embeddings.", r"(?!)", "")


@dataclass(repr=False)
class Mamba2Config(MambaConfig):
    """transformers' Mamba2Config and its defaults (MambaConfig's fields, the heads, groups and chunks); attention
    fields are autolm's placeholders, never written."""

    model_type: ClassVar[str] = "mamba2"
    # GGUF out compares these its own way or not at all: the residual's dtype and the chunk size change only the
    # rounding, time_step_rank is not read, write_config refuses a clamp of the time steps
    gguf_not_compared: ClassVar[tuple[str, ...]] = (
        "residual_in_fp32",
        "chunk_size",
        "time_step_rank",
        "time_step_limit",
    )

    vocab_size: int = 32768
    hidden_size: int = 4096
    num_hidden_layers: int = 64
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    state_size: int = 128
    head_dim: int | None = 64  # the mixer's head size
    num_heads: int = 128
    n_groups: int = 8
    chunk_size: int = 256
    # as transformers 5 writes it: infinity tagged ({"__float__": "Infinity"}); read as written, kept as read
    time_step_limit: Any = field(default_factory=lambda: list(NO_LIMIT))

    def __post_init__(self) -> None:
        self.num_attention_heads = self.num_key_value_heads = 1  # no attention; head_dim is the mixer's
        h = self.hidden_size
        if _is_int(h) and h > 0:
            if _is_int(self.expand):
                self.intermediate_size = self.expand * h
            if self.time_step_rank == "auto":
                self.time_step_rank = math.ceil(h / 16)
        PretrainedConfig.__post_init__(self)

    step_limit = GraniteMoeHybridConfig.step_limit  # time_step_limit as two floats

    def validate(self) -> None:
        super().validate()
        positive_ints(self, ("num_heads", "n_groups", "chunk_size"), 1 << 16)
        heads, width = self.num_heads, self.expand * self.hidden_size
        if self.head_dim * heads != width:
            raise ConfigError(f"{self.source}: head_dim ({self.head_dim}) times num_heads ({heads}) must be "
                              f"expand * hidden_size ({width})")  # fmt: skip
        if heads % self.n_groups:
            raise ConfigError(f"{self.source}: n_groups ({self.n_groups}) must divide num_heads ({heads})")
        self.step_limit()

    def mixer(self, layer_idx: int, **kwargs: Any) -> Mamba2Mixer:
        """The Mamba-2 mixer of layer layer_idx as this config sizes it."""
        return Mamba2Mixer(self.hidden_size, self.num_heads, self.head_dim, self.state_size, self.n_groups,
                           self.conv_kernel, self.chunk_size, layer_idx, eps=self.rms_norm_eps,
                           conv_bias=self.use_conv_bias, proj_bias=self.use_bias,
                           time_step_limit=self.step_limit(), act=self.hidden_act, **kwargs)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = PretrainedConfig.to_dict(self)
        for key in (*NOT_MAMBA, "intermediate_size"):  # transformers derives the width from expand
            if key != "head_dim":
                out.pop(key, None)
        return out


def derive(d: dict[str, Any], get) -> None:
    """Mamba's (the converter's placeholders left to the config's own values), and expand and head_dim from
    ssm.inner_size (the heads are ssm.time_step_rank)."""
    mamba.derive(d, get)
    inner, heads, hidden = get("ssm.inner_size"), d.get("num_heads"), d.get("hidden_size")
    if all(_is_int(v) and v > 0 for v in (inner, heads, hidden)):
        d["expand"], d["head_dim"] = inner // hidden, inner // heads


def write_config(out: dict[str, Any], c) -> None:
    """derive's inverse: what Mamba2Model.set_gguf_parameters writes; a clamp of the time steps refused."""
    if c.step_limit() != (0.0, math.inf):
        raise ConfigError(f"llama.cpp's 'mamba2' format cannot hold this {c.model_type!r} model: its graph does "
                          f"not clamp the time steps (time_step_limit {c.time_step_limit!r})")  # fmt: skip
    for key in (*mamba._NOT_WRITTEN, "attention.key_length", "attention.value_length"):
        out.pop(key, None)
    out.update({"context_length": GGUF_CONTEXT, "feed_forward_length": 0, "attention.head_count": 0,
                "ssm.inner_size": c.num_heads * c.head_dim})  # fmt: skip


# llama.cpp's Mamba2Model converter: the ssm.* sizes, the mixer's tensors (MixerGGUF: A, D, the conv, dt_bias and
# the norm); what its graph does not read (in_proj/out_proj biases, no conv bias, another activation, a clamp of
# the time steps) fixed
LAYOUT = GGUFLayout(
    "mamba2",
    config=(
        ("ssm.conv_kernel", "conv_kernel"),
        ("ssm.state_size", "state_size"),
        ("ssm.group_count", "n_groups"),
        ("ssm.time_step_rank", "num_heads"),
    ),
    layer=(
        ("attn_norm", "norm"),
        ("ssm_in", "mixer.in_proj"),
        ("ssm_out", "mixer.out_proj"),
        # MixerGGUF's pieces
        *((stem, f"mixer.{stem}") for stem in ("ssm_conv1d", "ssm_dt", "ssm_a", "ssm_d", "ssm_norm")),
    ),
    top=(("token_embd", "backbone.embeddings"), ("output_norm", "backbone.norm_f")),
    fixed=(
        ("hidden_act", "silu"),
        ("use_bias", False),
        ("use_conv_bias", True),
        ("time_step_limit", NO_LIMIT),
    ),
    derive=derive,
    write_config=write_config,
    bare=("ssm_a", "ssm_d"),
)


class Mamba2Block(MambaBlock):
    """x + mixer(norm(x)) around the Mamba-2 mixer, the residual in float32 where residual_in_fp32."""


class Mamba2Model(MambaModel):
    """embeddings, layers, norm_f (Mamba's body around Mamba-2 blocks)."""

    block_class: ClassVar[type] = Mamba2Block


class Mamba2ForCausalLM(MambaForCausalLM):
    """transformers' Mamba2ForCausalLM."""

    config_class = Mamba2Config
    model_class: ClassVar[type] = Mamba2Model
    checkpoint_rules = CheckpointRules([_OLD_EMBEDDING, MixerGGUF()])
    gguf = LAYOUT  # llama.cpp's Mamba2Model converter
    _no_split_modules: ClassVar[list[str]] = ["Mamba2Block"]

    def __init__(self, config: Any):
        super().__init__(config)
        # GGUF out: the gated norm's groups (ssm_norm's rows)
        self.checkpoint_rules = CheckpointRules([_OLD_EMBEDDING, MixerGGUF(config.n_groups)])
