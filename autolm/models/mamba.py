"""Mamba (state-spaces/mamba-130m-hf ... mamba-2.8b-hf): every layer a Mamba-1 mixer (the selective scan,
autolm.nn.mamba1's MambaMixer: `in_proj`, a depthwise `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`)
under an RMSNorm (`norm`), with no attention and no position embeddings at all; a final RMSNorm `norm_f`; the head
tied to the embeddings by default.

- `residual_in_fp32` (the default): the residual stream is kept in float32 whatever the model's dtype; each norm
  reads it cast to the weights' dtype, the final norm's output is cast to the head's.
- The body is `backbone` (embeddings, layers, norm_f); autolm's code reaches it as `model` and its parts as
  `embed_tokens`, `layers` and `norm`. Old checkpoints name the embeddings `backbone.embedding` (read as well).
- The cache holds no keys or values: each layer's (conv state, scan state) in its `states`. There is no context
  window (max_position_embeddings is not in the config: autolm's limit is its upper bound).
- config.json names: `layer_norm_epsilon` (autolm's rms_norm_eps), `state_size`, `expand` (intermediate_size =
  expand * hidden_size, as transformers derives it), `conv_kernel`, `time_step_rank` ("auto": hidden_size / 16
  rounded up), `use_bias` (in_proj and out_proj), `use_conv_bias`.

GGUF (llama.cpp's "mamba", as its MambaModel converter writes it): the norm as attn_norm, the mixer as ssm_in,
ssm_conv1d (the conv weight (I, 1, K) squeezed to (I, K), its bias as it is), ssm_x, ssm_dt (weight and bias),
ssm_a (-exp(A_log), named without ".weight"; read back as log(-a), which may differ from A_log in its last bit),
ssm_d (D, no ".weight"), ssm_out; the head omitted where tied. Metadata: the context length as 2**20, zero
feed-forward length and head count, the ssm.* sizes (conv kernel, inner size, state size, time step rank) and
ssm.dt_b_c_rms false (a file with it true is Falcon-Mamba's: autolm.models.falcon_mamba claims it). The converter
pads the vocabulary to a multiple of 8 (pad_vocab_size_multiple) in the token list only. llama.cpp's graph has no in_proj/out_proj
bias, always a conv bias, SiLU and an expansion factor of 2: other values are refused on GGUF out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..config_fields import positive_ints
from ..errors import CheckpointError
from ..nn import ACTIVATIONS, CheckpointRules, GGUFLayout, Rename, RMSNorm
from ..nn.mamba1 import MambaMixer
from .base import CausalLM, DecoderModel

# fields of autolm's common config that Mamba's config.json does not have
NOT_MAMBA = ("num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
             "attention_dropout", "sliding_window", "rope_parameters", "rope_theta", "rope_scaling")  # fmt: skip
NO_WINDOW = 1 << 28  # max_position_embeddings: no context window
GGUF_CONTEXT = 1 << 20  # the converter's context length ("arbitrary value")
# attention keys autolm's metadata would write that the converter does not
_NOT_WRITTEN = ("rope.dimension_count", "attention.head_count_kv", "attention.key_length",
                "attention.value_length", "rope.freq_base")  # fmt: skip


@dataclass(repr=False)
class MambaConfig(PretrainedConfig):
    """transformers' MambaConfig and its defaults; attention fields are autolm's placeholders, never written."""

    model_type: ClassVar[str] = "mamba"
    attribute_map: ClassVar[dict[str, str]] = {"rms_norm_eps": "layer_norm_epsilon"}
    # the residual's dtype only (llama.cpp computes in float32)
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("residual_in_fp32",)
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "use_bias",
        "use_conv_bias",
        "residual_in_fp32",
    )

    vocab_size: int = 50280
    hidden_size: int = 768
    num_hidden_layers: int = 32
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = NO_WINDOW
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    time_step_rank: Any = "auto"

    def __post_init__(self) -> None:
        self.num_attention_heads = self.num_key_value_heads = self.head_dim = 1  # no attention
        h = self.hidden_size
        if _is_int(h) and h > 0:
            if _is_int(self.expand):
                self.intermediate_size = self.expand * h
            if self.time_step_rank == "auto":
                self.time_step_rank = math.ceil(h / 16)
        super().__post_init__()

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # no attention, no RoPE

    def validate(self) -> None:
        super().validate()
        positive_ints(self, ("expand", "state_size", "conv_kernel", "time_step_rank"), 1 << 16)

    def mixer(self, layer_idx: int, **kwargs: Any) -> MambaMixer:
        """The Mamba-1 mixer of layer layer_idx as this config sizes it."""
        return MambaMixer(self.hidden_size, self.intermediate_size, self.state_size, self.conv_kernel,
                          self.time_step_rank, layer_idx, conv_bias=self.use_conv_bias, proj_bias=self.use_bias,
                          act=self.hidden_act, **kwargs)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in NOT_MAMBA:
            out.pop(key, None)
        return out


class MambaGGUF:
    """llama.cpp's ssm_a, ssm_d and ssm_conv1d (as the reader names them: `<mixer>.ssm_*`, the mixer module's name
    in a layer: Mamba's `mixer`, Jamba's `mamba`) -> A_log, D and conv1d, and back (GGUF out); an assembling
    checkpoint rule (nn.checkpoint)."""

    def __init__(self, mixer: str = "mixer"):
        self.mixer = re.escape(mixer)

    def piece(self, name: str) -> tuple[str, str] | None:
        m = re.fullmatch(rf"(.+\.{self.mixer})\.(ssm_a|ssm_d|ssm_conv1d)\.(weight|bias)", name)
        if m is None:
            return None
        prefix, stem, kind = m.groups()
        return f"{prefix}.{ {'ssm_a': 'A_log', 'ssm_d': 'D'}.get(stem, 'conv1d.' + kind) }", stem

    def pieces(self, name: str) -> int:
        return 1

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        ((key, t),) = got.items()
        if key == "ssm_a":
            t = torch.log(-t)
        if t.numel() != torch.Size(shape).numel():
            raise CheckpointError(f"{source}: {name!r} from llama.cpp's {tuple(t.shape)} does not fit the model's "
                                  f"{tuple(shape)}")  # fmt: skip
        return t.reshape(shape).contiguous()

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        m = re.fullmatch(rf"(.+\.{self.mixer})\.(A_log|D|conv1d\.weight|conv1d\.bias)", name)
        if m is None:
            return None
        prefix, part = m.groups()
        if part == "A_log":
            return [(f"{prefix}.ssm_a.weight", (-torch.exp(t)).contiguous())]  # written without ".weight"
        if part == "conv1d.weight":
            return [(f"{prefix}.ssm_conv1d.weight", t.squeeze(1).contiguous())]
        return [(f"{prefix}.{'ssm_d.weight' if part == 'D' else 'ssm_conv1d.bias'}", t)]


def derive(d: dict[str, Any], get) -> None:
    """The converter's placeholders (context length 2**20, no feed-forward, no heads) left to the config's own
    values."""
    for field in ("max_position_embeddings", "intermediate_size", "num_attention_heads"):
        d.pop(field, None)


def write_config(out: dict[str, Any], c) -> None:
    """derive's inverse: what MambaModel.set_gguf_parameters writes for Mamba (Falcon-Mamba: models.falcon_mamba)."""
    for key in _NOT_WRITTEN:
        out.pop(key, None)
    out.update({"context_length": GGUF_CONTEXT, "feed_forward_length": 0, "attention.head_count": 0,
                "ssm.inner_size": c.intermediate_size, "ssm.dt_b_c_rms": False})  # fmt: skip


# llama.cpp's MambaModel converter: the ssm.* sizes, the mixer's tensors (MambaGGUF: A, D and the conv); what
# its graph does not read (biases of in_proj/out_proj, another activation or expansion) fixed
LAYOUT = GGUFLayout(
    "mamba",
    config=(
        ("ssm.conv_kernel", "conv_kernel"),
        ("ssm.state_size", "state_size"),
        ("ssm.time_step_rank", "time_step_rank"),
    ),
    layer=(
        ("attn_norm", "norm"),
        ("ssm_in", "mixer.in_proj"),
        ("ssm_x", "mixer.x_proj"),
        ("ssm_dt", "mixer.dt_proj"),
        ("ssm_out", "mixer.out_proj"),
        *((stem, f"mixer.{stem}") for stem in ("ssm_conv1d", "ssm_a", "ssm_d")),  # MambaGGUF's pieces
    ),
    top=(("token_embd", "backbone.embeddings"), ("output_norm", "backbone.norm_f")),
    fixed=(("hidden_act", "silu"), ("use_bias", False), ("use_conv_bias", True), ("expand", 2)),
    derive=derive,
    write_config=write_config,
    bare=("ssm_a", "ssm_d"),
)


class MambaBlock(nn.Module):
    """x + mixer(norm(x)), the residual in float32 where residual_in_fp32."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = self.make_mixer(config, layer_idx)
        self.residual_in_fp32 = config.residual_in_fp32

    def make_mixer(self, config: Any, layer_idx: int) -> MambaMixer:
        return config.mixer(layer_idx)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        y = self.mixer(self.norm(x.to(self.norm.weight.dtype)), ctx)
        return (x.float() if self.residual_in_fp32 else x) + y


class MambaModel(DecoderModel):
    """embeddings, layers, norm_f; `embed_tokens` and `norm` name embeddings and norm_f (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "embeddings", "norm": "norm_f"}
    block_class: ClassVar[type[nn.Module]] = MambaBlock

    def __init__(self, config: Any):
        super().__init__(config, self.block_class, RMSNorm(config.hidden_size, config.rms_norm_eps))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """norm_f over the (float32) residual stream, in the weights' dtype for the head."""
        return self.norm_f(x).to(self.norm_f.weight.dtype)


class MambaForCausalLM(CausalLM):
    """transformers' MambaForCausalLM."""

    config_class = MambaConfig
    model_class: ClassVar[type[DecoderModel]] = MambaModel
    recurrent: ClassVar[bool] = True  # the mixers' states: the general forward decodes
    base_model_prefix = "backbone"
    layers_prefix = "backbone.layers"
    embeddings_name = "backbone.embeddings"
    checkpoint_rules = CheckpointRules(
        [Rename(r"^backbone\.embedding\.", "backbone.embeddings.", r"(?!)", ""), MambaGGUF()]
    )
    gguf = LAYOUT  # llama.cpp's MambaModel converter
    tp_patterns: ClassVar[dict[str, str]] = {}  # no attention: the mixers run whole on every rank
    _no_split_modules: ClassVar[list[str]] = ["MambaBlock"]

    def __init__(self, config: Any):
        super().__init__(config, self.model_class(config))

    @property
    def model(self) -> MambaModel:
        """The body (`backbone`), by the name autolm's code uses in every family."""
        return self.backbone
