"""GPT-NeoX (EleutherAI's Pythia and GPT-NeoX-20B): pre-norm layers of LayerNorm (with bias), multi-head attention
whose q/k/v are one fused `query_key_value` laid out per head, partial rotary embeddings (a quarter of each head in
Pythia), a plain GELU MLP with biases, and either a parallel residual, x + attn(ln1(x)) + mlp(ln2(x)) (the
default), or the sequential one.

transformers' names: the body is `gpt_neox` (embed_in, layers, final_layer_norm); autolm's code reaches it as
`model` and its parts as `embed_tokens` and `norm`, other names for embed_in and final_layer_norm. The head is
`lm_head` in the model and `embed_out` in the checkpoint, which transformers 5 renames while loading and back
while saving; so does autolm. config.json spells RoPE the old way (rotary_pct, rotary_emb_base) or the new one
(rope_parameters); a config is written back in the spelling it was read in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, CheckpointRules, GGUFLayout, Ignored, Linear, Rename
from .base import CausalLM, DecoderModel


@dataclass(repr=False)
class GPTNeoXConfig(PretrainedConfig):
    """transformers' GPTNeoXConfig. `layer_norm_eps` is config.json's name for rms_norm_eps (an attribute too);
    `rotary_pct` and `rotary_emb_base` (transformers 4's keys) are read into the RoPE parameters, whose
    partial_rotary_factor defaults to 0.25 as transformers' does. Keys that change no computation
    (hidden_dropout, classifier_dropout, initializer_range, is_decoder) are kept as config.json gives them."""

    model_type: ClassVar[str] = "gpt_neox"
    attribute_map: ClassVar[dict[str, str]] = {"rms_norm_eps": "layer_norm_eps"}
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "use_parallel_residual",
        "attention_bias",
    )
    # not in transformers' config: written when set (GPT-NeoX has no grouped KV heads, no head_dim of its own)
    absent_keys: ClassVar[tuple[str, ...]] = ("num_key_value_heads", "head_dim", "sliding_window")
    partial_rotary_default: ClassVar[bool] = True  # its default RoPE rotates only the partial dimensions

    vocab_size: int = 50432
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    hidden_act: str = "gelu"
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    use_parallel_residual: bool = True
    attention_bias: bool = True

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.head_dim = None  # derived from num_attention_heads and hidden_size
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = {"partial_rotary_factor": 0.25, **self.rope_parameters}
        for key in ("rotary_pct", "rotary_emb_base"):  # read into rope_parameters (read_rope)
            self.extra.pop(key, None)
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's name
            raise ConfigError(re.sub(r"\brms_norm_eps\b", "layer_norm_eps", str(e))) from None

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """As transformers' GPTNeoXConfig: the RoPE dict's own rope_theta, else rotary_emb_base, else 10000 (a
        top-level rope_theta is not read); its partial_rotary_factor, else rotary_pct, else 0.25."""
        rope, spelling = super().read_rope(d, source)
        given = d.get("rope_parameters") if spelling == "v5" else d.get("rope_scaling")
        if not (isinstance(given, dict) and "rope_theta" in given):
            base = d.get("rotary_emb_base")
            rope["rope_theta"] = 10000.0 if base is None else base
        pct = d.get("rotary_pct")
        rope.setdefault("partial_rotary_factor", 0.25 if pct is None else pct)
        return rope, spelling

    @property
    def layer_norm_eps(self) -> float:
        return self.rms_norm_eps

    @layer_norm_eps.setter
    def layer_norm_eps(self, value: float) -> None:
        self.rms_norm_eps = value

    def _implied(self, f) -> Any:
        if f.name == "num_key_value_heads":
            return self.num_attention_heads
        return super()._implied(f)

    def validate(self) -> None:
        super().validate()
        factor = self.rope_parameters.get("partial_rotary_factor")
        rotary = int(self.head_dim * factor) if _is_number(factor) else None
        if not (_is_number(factor) and 0 < factor <= 1 and _is_int(rotary) and rotary > 0 and not rotary % 2):
            raise ConfigError(
                f"{self.source}: the rotary fraction of each head (rotary_pct / partial_rotary_factor) must be in "
                f"(0, 1] and give an even number of the {self.head_dim} head dimensions, found {factor!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """config.json; read in transformers 4's spelling, RoPE goes back as rotary_emb_base and rotary_pct (and
        rope_scaling where it scales)."""
        out = super().to_dict()
        if self.rope_spelling == "v4":
            rope = dict(self.rope_parameters)
            out.pop("rope_theta", None)
            out.pop("rope_scaling", None)
            out["rotary_emb_base"] = rope.pop("rope_theta")
            out["rotary_pct"] = rope.pop("partial_rotary_factor")
            if rope.get("rope_type", "default") != "default" or len(rope) > 1:
                out["rope_scaling"] = rope
        return out


def neox_init(dataclass_init):
    """A GPT-NeoX config's __init__ from its dataclass's: Config(layer_norm_eps=..., rotary_pct=...,
    rotary_emb_base=...) as in transformers."""

    def _init(self, *, layer_norm_eps=None, rotary_pct=None, rotary_emb_base=None, **kwargs: Any) -> None:
        if layer_norm_eps is not None:
            kwargs["rms_norm_eps"] = layer_norm_eps
        if rotary_pct is not None or rotary_emb_base is not None:
            rope = dict(kwargs.get("rope_parameters") or {"rope_type": "default"})
            rope.setdefault("rope_theta", 10000.0 if rotary_emb_base is None else rotary_emb_base)
            if rotary_pct is not None:
                rope.setdefault("partial_rotary_factor", rotary_pct)
            kwargs["rope_parameters"] = rope
        dataclass_init(self, **kwargs)

    return _init


GPTNeoXConfig.__init__ = neox_init(GPTNeoXConfig.__init__)


class GPTNeoXAttention(Attention):
    """Attention with q/k/v as one Linear, `query_key_value`, whose rows are laid out per head: (heads, [q, k, v],
    head_dim); the output projection is `dense`."""

    def __init__(self, config: GPTNeoXConfig, layer_idx: int):
        n = config.num_attention_heads
        super().__init__(config.hidden_size, n, n, config.head_dim, layer_idx, bias=config.attention_bias)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        self.query_key_value = Linear(hidden, 3 * hidden, bias=bias)
        self.dense = Linear(hidden, hidden, bias=o_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, self.head_dim)  # (B, T, nh, 3, hd)
        q, k, v = (t.reshape(B, T, self.num_heads * self.head_dim) for t in qkv.unbind(3))
        return q, k, v

    @property
    def o_proj(self) -> Linear:
        """Attention.forward's output projection: GPT-NeoX calls it dense."""
        return self.dense


class GPTNeoXMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = True):
        super().__init__()
        self.dense_h_to_4h = Linear(hidden, intermediate, bias=bias)
        self.dense_4h_to_h = Linear(intermediate, hidden, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = GPTNeoXAttention(config, layer_idx)
        self.mlp = GPTNeoXMLP(h, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), ctx)
        if self.use_parallel_residual:  # both branches read x; summed in transformers' order
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoXModel(DecoderModel):
    """embed_in, layers, final_layer_norm; `embed_tokens` and `norm` name embed_in and final_layer_norm (also when
    assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "embed_in", "norm": "final_layer_norm"}

    def __init__(self, config: GPTNeoXConfig):
        super().__init__(config, GPTNeoXLayer, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))


def qkv_rows(stem: str, config: GPTNeoXConfig) -> torch.Tensor | None:
    """llama.cpp's converter writes attn_qkv's rows (weight and bias) as all heads' q, then k, then v; the model's
    are per head (heads, [q, k, v], head_dim): for each model row, the file's row (None for other tensors)."""
    if stem != "attn_qkv":
        return None
    n, hd = config.num_attention_heads, config.head_dim
    return torch.arange(3 * n * hd).view(3, n, hd).transpose(0, 1).reshape(-1)


def gguf_config(d: dict[str, Any], get) -> None:
    """What llama.cpp's converter writes differently: rope.dimension_count is the rotary dimensions (the head size
    is hidden / heads; none: the whole head)."""
    rope, rotary = d["rope_parameters"], d.pop("head_dim", None)
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
    if _is_int(heads) and heads > 0 and _is_int(hidden) and hidden >= heads:
        rope["partial_rotary_factor"] = 1.0 if rotary is None else rotary / (hidden // heads)


def gguf_write_config(m: dict[str, Any], c: GPTNeoXConfig) -> None:
    """The inverse of gguf_config, as llama.cpp's GPTNeoXModel writes it: the rotary dimensions, the residual's
    form, LayerNorm's epsilon; no vocabulary size, KV head count, head size or RMS epsilon, and no RoPE base where
    it is llama.cpp's default."""
    for key in ("vocab_size", "attention.head_count_kv", "attention.key_length", "attention.value_length",
                "attention.layer_norm_rms_epsilon"):  # fmt: skip
        m.pop(key, None)
    if m.get("rope.freq_base") == 10000.0:  # llama.cpp's default, which the converter leaves to it
        m.pop("rope.freq_base")
    m["rope.dimension_count"] = int(c.rope_parameters["partial_rotary_factor"] * c.head_dim)
    m["use_parallel_residual"] = c.use_parallel_residual


class GPTNeoXForCausalLM(CausalLM):
    """transformers' GPTNeoXForCausalLM (the head untied unless the config ties it)."""

    config_class = GPTNeoXConfig
    base_model_prefix = "gpt_neox"
    layers_prefix = "gpt_neox.layers"
    embeddings_name = "gpt_neox.embed_in"
    # transformers' plan: query_key_value and dense_h_to_4h split by rows (query_key_value's rows run per head, so
    # each rank holds whole heads), dense and dense_4h_to_h by their inputs (their biases whole on every rank)
    tp_patterns: ClassVar[dict[str, str]] = {
        "layers.*.attention.query_key_value": "colwise",
        "layers.*.attention.dense": "rowwise",
        "layers.*.mlp.dense_h_to_4h": "colwise",
        "layers.*.mlp.dense_4h_to_h": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["GPTNeoXLayer"]
    checkpoint_rules = CheckpointRules(
        [
            Rename(r"^embed_out\.", "lm_head.", r"^lm_head\.", "embed_out."),  # transformers 5's renaming
            Ignored(r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias)"),  # old files' mask buffers
        ]
    )
    # llama.cpp keeps q/k/v fused (attn_qkv) with its rows regrouped (qkv_rows), writes the rotary dimensions as
    # rope.dimension_count, the residual's form, and no RoPE base (10000); biases are read off the tensors
    gguf = GGUFLayout(
        "gptneox",
        config=(
            ("attention.layer_norm_epsilon", "layer_norm_eps"),
            ("use_parallel_residual", "use_parallel_residual"),
        ),
        layer=(
            ("attn_qkv", "attention.query_key_value"),
            ("attn_output", "attention.dense"),
            ("ffn_up", "mlp.dense_h_to_4h"),
            ("ffn_down", "mlp.dense_4h_to_h"),
        ),
        top=(("token_embd", "gpt_neox.embed_in"), ("output_norm", "gpt_neox.final_layer_norm")),
        fixed=(("attention_bias", False),),
        present=(("blk.0.attn_qkv.bias", "attention_bias"),),
        derive=gguf_config,
        write_config=gguf_write_config,
        row_order=qkv_rows,
    )

    def __init__(self, config: GPTNeoXConfig):
        super().__init__(config, GPTNeoXModel(config))

    @property
    def model(self) -> GPTNeoXModel:
        """The body (`gpt_neox`), by the name autolm's code uses in every family."""
        return self.gpt_neox
