"""GLM-4 (GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1): a Llama-like layer with four RMSNorms ("sandwich" norms: the
attention and MLP outputs are normed again before each residual add), q/k/v biases (`attention_bias`, none on
o_proj), gate and up packed into one `gate_up_proj` (as Phi-3), an untied head, and partial RoPE
(`partial_rotary_factor`, 0.5 by default) over interleaved pairs: the first head_dim * factor dimensions of each
head rotate as (x0, x1), (x2, x3), ... (transformers repeat_interleaves the tables), the rest pass through.

GLM-4.1V-Thinking's and GLM-4.6V-Flash's language model (model_type glm4v, autolm.models.image_text) is a GLM-4:
q/k/v biases always, head_dim hidden_size / heads, multimodal RoPE over the same interleaved pairs (on text, plain
RoPE) rotating the whole head unless rope_parameters gives partial_rotary_factor. llama.cpp's converter writes it
as "glm4" with the RoPE sections and, its multimodal kernel rotating halves (NeoX), the rotary rows of q and k
regrouped per head as [even; odd] pairs: such a file reads back with the rows in the model's order (`gguf_rows`),
keeping mrope_section, and is written back so.

GLM-OCR's language model (model_type glm_ocr) is GLM-4V's without q/k/v biases, with a head_dim of its own where
text_config gives one, and a next-token-prediction layer past the last (not run; llama.cpp's converter counts it in
block_count, its nextn_predict_layers subtracted on reading)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, GGUFLayout, Ignored, RMSNorm
from .base import CausalLM, DecoderModel
from .image_text import EitherTiesConfig
from .phi3 import Phi3MLP

_EOS = (151329, 151336, 151338)  # transformers' default where config.json gives none


@dataclass(repr=False)
class Glm4Config(PretrainedConfig):
    """transformers' Glm4Config: its fields and defaults (head_dim 128 whatever the hidden size, 2 KV heads,
    partial_rotary_factor 0.5 inside the RoPE parameters). GLM-4-0414's config.json spells RoPE the v4 way with
    partial_rotary_factor at the top level; it is read into the RoPE parameters and written back where it was."""

    model_type: ClassVar[str] = "glm4"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "sliding_window",
    )  # not in transformers' config: written when set
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias")
    partial_rotary_default: ClassVar[bool] = True  # GLM's default RoPE rotates only the partial dimensions

    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1.5625e-07
    pad_token_id: int | None = 151329
    eos_token_id: int | list[int] | None = field(default_factory=lambda: list(_EOS))
    bos_token_id: int | None = None
    attention_bias: bool = True
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    )

    def __post_init__(self) -> None:
        if self.eos_token_id is None:
            self.eos_token_id = list(_EOS)
        if isinstance(self.rope_parameters, dict) and "partial_rotary_factor" not in self.rope_parameters:
            self.rope_parameters = {**self.rope_parameters, "partial_rotary_factor": 0.5}
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        rope, spelling = super().read_rope(d, source)
        if d.get("partial_rotary_factor") is not None:
            rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
        return rope, spelling

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if (
            self.rope_spelling == "v4"
        ):  # as GLM-4-0414 ships it: the factor at the top level, not in rope_scaling
            rope = dict(self.rope_parameters)
            out["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
            rope.pop("rope_theta")
            out["rope_scaling"] = None if rope == {"rope_type": "default"} else rope
        return out

    def validate(self) -> None:
        super().validate()
        src, factor = self.source, self.rope_parameters.get("partial_rotary_factor")
        if not _is_number(factor) or not 0 < factor <= 1:
            raise ConfigError(f"{src}: partial_rotary_factor must be a number in (0, 1], found {factor!r}")
        rotary = int(self.head_dim * factor)
        if rotary < 2 or rotary % 2:
            raise ConfigError(
                f"{src}: partial_rotary_factor {factor} gives {rotary} rotary dimensions of head_dim "
                f"{self.head_dim}: they must be a positive even number (rotated in pairs)"
            )

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' GLM-4 builds a plain causal mask whatever the config says


class Glm4vConfig(EitherTiesConfig):
    """transformers' Glm4vConfig (GLM-4.1V-Thinking, GLM-4.6V-Flash): its language model's, a GLM-4 (see the module
    docstring)."""

    model_type: ClassVar[str] = "glm4v"
    text_class: ClassVar[type] = Glm4Config
    mrope: ClassVar[bool] = True
    fixed: ClassVar[dict[str, Any]] = {"attention_bias": True}

    @classmethod
    def adapt(cls, text: dict[str, Any]) -> None:
        super().adapt(text)
        whole_heads(text)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if "partial_rotary_factor" not in rope:
            text.setdefault("partial_rotary_factor", 1.0)


class GlmOcrConfig(EitherTiesConfig):
    """transformers' GlmOcrConfig (GLM-OCR): its language model's (glm_ocr_text), a GLM-4V's without q/k/v biases,
    head_dim as text_config gives it (else hidden_size / heads), GLM-OCR's defaults where text_config leaves them
    out; its next-token-prediction layer (model.layers.<num_hidden_layers>) skipped as transformers does."""

    model_type: ClassVar[str] = "glm_ocr"
    text_class: ClassVar[type] = Glm4Config
    mrope: ClassVar[bool] = True
    fixed: ClassVar[dict[str, Any]] = {"attention_bias": False}
    defaults: ClassVar[dict[str, Any]] = dict(vocab_size=59392, hidden_size=1024, intermediate_size=4096,
                                              num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                                              max_position_embeddings=131072, rms_norm_eps=1e-5,
                                              pad_token_id=None)  # fmt: skip

    @classmethod
    def adapt(cls, text: dict[str, Any]) -> None:
        super().adapt(text)
        if text.get("head_dim") is None:
            whole_heads(text)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if "partial_rotary_factor" not in rope:
            text.setdefault("partial_rotary_factor", 1.0)


class Glm46VConfig(Glm4vConfig):
    """transformers' Glm46VConfig (GLM-4.6V): GLM-4V's language model (a GLM-4, read as Glm4vConfig; a GLM-4.5 MoE
    where text_config's model_type is "glm4v_moe_text", read as Glm4vMoeConfig), the head tied by the outer config
    alone (untied by default)."""

    model_type: ClassVar[str] = "glm46v"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        text = d.get("text_config") if isinstance(d, dict) else None
        if isinstance(text, dict) and text.get("model_type") == "glm4v_moe_text":
            from . import config_class

            tied = {"tie_word_embeddings": cls.tie(d, text)}  # the outer's: Glm4vMoeConfig ties by either
            d = {**d, **tied, "text_config": {**text, **tied}}
            return config_class("glm4v_moe", source).from_dict(d, source, **overrides)
        return super().from_dict(d, source, **overrides)

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool:
        return bool(outer.get("tie_word_embeddings", False))


class GlmgaConfig(Glm46VConfig):
    """transformers' GlmgaConfig: GLM-4.6V's (its model class is Glm46VForConditionalGeneration)."""

    model_type: ClassVar[str] = "glmga"


def whole_heads(text: dict[str, Any]) -> None:
    """GLM-4V's language models split hidden_size into the heads (no head_dim of their own)."""
    hidden, heads = text.get("hidden_size", 4096), text.get("num_attention_heads", 32)
    if _is_int(hidden) and _is_int(heads) and heads > 0:
        text["head_dim"] = hidden // heads


class Glm4DecoderLayer(nn.Module):
    """x + post_self_attn_norm(attn(input_norm(x))), then + post_mlp_norm(mlp(post_attention_norm(x)))."""

    def __init__(self, config: Glm4Config, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                   layer_idx, bias=config.attention_bias, o_bias=False,
                                   rope_interleaved=True)  # fmt: skip
        self.mlp = Phi3MLP(h, config.intermediate_size, config.hidden_act)  # gate_up_proj: rows [gate | up]
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)  # before the MLP, despite its name
        self.post_self_attn_layernorm = RMSNorm(h, eps)
        self.post_mlp_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Glm4Model(DecoderModel):
    def __init__(self, config: Glm4Config):
        super().__init__(config, Glm4DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


def gguf_config(d: dict[str, Any], get) -> None:
    """What llama.cpp's Glm4Model writes differently: rope.dimension_count is the rotary dimensions
    (head_dim * partial_rotary_factor); the head size is attention.key_length (hidden / heads without it)."""
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
    head_dim = get("attention.key_length")
    if head_dim is None and _is_int(heads) and heads > 0 and _is_int(hidden):
        head_dim = hidden // heads
    d["head_dim"] = head_dim
    rotary = get("rope.dimension_count")
    if _is_int(rotary) and _is_int(head_dim) and head_dim > 0:
        d["rope_parameters"]["partial_rotary_factor"] = rotary / head_dim
    nextn = get("nextn_predict_layers") or 0  # GLM-OCR's, counted in block_count
    if _is_int(nextn) and nextn > 0 and _is_int(d.get("num_hidden_layers")):
        d["num_nextn_predict_layers"] = nextn
        d["num_hidden_layers"] -= nextn
    sections = get("rope.dimension_sections")
    if sections is not None:  # GLM-4V's: q/k rows regrouped (gguf_rows)
        d["rope_parameters"]["mrope_section"] = [int(x) for x in sections[:3]]


def gguf_write_config(m: dict[str, Any], c: Glm4Config) -> None:
    """The inverse of gguf_config, as the converter writes it: TextModel's keys with the head size (config.json
    always has head_dim), the rotary dimensions; no vocabulary size."""
    m.pop("vocab_size", None)
    m["rope.dimension_count"] = int(c.head_dim * c.rope_parameters["partial_rotary_factor"])
    if "mrope_section" in c.rope_parameters:
        m["rope.dimension_sections"] = ([*c.rope_parameters["mrope_section"]] + [0] * 4)[:4]


def gguf_rows(stem: str, c: Glm4Config) -> torch.Tensor | None:
    """GLM-4V's files (mrope_section read from them): for each of q's / k's model rows (weight and bias), the
    file's, whose rotary rows per head are the even pairs' first elements, then the second ones; else None."""
    if stem not in ("attn_q", "attn_k") or "mrope_section" not in c.rope_parameters:
        return None
    hd, heads = c.head_dim, c.num_attention_heads if stem == "attn_q" else c.num_key_value_heads
    rotary = int(hd * c.rope_parameters["partial_rotary_factor"])
    head = torch.arange(hd)
    head[:rotary:2], head[1:rotary:2] = torch.arange(rotary // 2), torch.arange(rotary // 2, rotary)
    return (head + hd * torch.arange(heads)[:, None]).reshape(-1)


class Glm4ForCausalLM(CausalLM):
    config_class = Glm4Config
    # llama.cpp's Glm4Model: tensors renamed one to one by gguf-py's map (gate_up_proj kept whole as ffn_up, the
    # two output norms as post_attention_norm / post_ffw_norm), q/k not permuted (llama.cpp's glm4 rotates
    # interleaved pairs, as the checkpoint does); biases read off the tensors
    gguf = GGUFLayout(
        "glm4",
        config=(("attention.key_length", "head_dim"),),
        layer=(
            ("post_attention_norm", "post_self_attn_layernorm"),
            ("post_ffw_norm", "post_mlp_layernorm"),
            ("ffn_up", "mlp.gate_up_proj"),
        ),
        fixed=(("attention_bias", False),),
        present=(("blk.0.attn_q.bias", "attention_bias"),),
        derive=gguf_config,
        write_config=gguf_write_config,
        row_order=gguf_rows,
    )
    # transformers' base_model_tp_plan for GLM-4: heads split as in Llama; the packed gate_up output is gathered
    # whole on every rank before the chunk into gate and up, and down_proj splits its input again
    tp_patterns: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_up_proj": "colwise_gather",
        "layers.*.mlp.down_proj": "rowwise_split",
    }
    _no_split_modules: ClassVar[list[str]] = ["Glm4DecoderLayer"]

    def __init__(self, config: Glm4Config):
        super().__init__(config, Glm4Model(config))
        n, extra = config.num_hidden_layers, getattr(config, "num_nextn_predict_layers", 0)
        if _is_int(extra) and extra > 0:  # GLM-OCR's next-token-prediction layers: not run, not loaded
            layers = "|".join(str(i) for i in range(n, n + extra))
            rules = [*type(self).checkpoint_rules.rules, Ignored(rf"model\.layers\.({layers})\..+")]
            self.checkpoint_rules = CheckpointRules(rules)
