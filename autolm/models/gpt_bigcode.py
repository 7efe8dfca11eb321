"""GPTBigCode (StarCoder, StarCoderBase, SantaCoder, WizardCoder, Granite code 20B/34B): GPT-2's architecture
(learned position embeddings, pre-norm LayerNorms with bias, a plain GELU MLP, the head tied to wte) with
nn.Linear projections (weights stored (out, in), not GPT-2's Conv1D) and, when `multi_query` is set (the usual
case), multi-query attention: one key/value head shared by every query head.

The fused `c_attn` holds hidden + 2 * kv_heads * head_dim outputs. With multi_query its rows are all heads' q,
then the one k head, then the one v head; without it they run per head, (heads, [q, k, v], head_dim), as
GPT-NeoX's. `attention_softmax_in_fp32` and `scale_attention_softmax_in_fp32` only set the precision of the
softmax in transformers' older attention (its current one always takes the softmax in fp32): accepted, they
change nothing here. The body reuses GPT-2's (wte, wpe, h, ln_f; reached as `model`, `embed_tokens`, `layers`,
`norm`). llama.cpp's "starcoder" runs the multi-query layout only: a multi_query=false model is refused on GGUF
out. There is no tensor-parallel plan (as in transformers): the one k/v head of c_attn cannot be cut by rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import GenerationError
from ..nn import ACTIVATIONS, Attention, GGUFLayout, Linear, embedding
from .base import CausalLM, DecoderModel
from .gpt2 import GPT2MLP, GPT2Attention, GPT2Block, GPT2Config, GPT2LMHeadModel, GPT2Model

# GPT2Config fields GPTBigCodeConfig does not have: kept as unknown keys (transformers ignores them)
_GPT2_ONLY = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")


@dataclass(repr=False)
class GPTBigCodeConfig(GPT2Config):
    """transformers' GPTBigCodeConfig: GPT-2's config.json names (n_embd, n_layer, n_head, n_inner, ...), the
    tanh GELU by default, `multi_query` (num_key_value_heads is 1 with it, n_head without, whatever config.json
    says, as in transformers) and the two softmax-precision switches."""

    model_type: ClassVar[str] = "gpt_bigcode"
    bool_fields: ClassVar[tuple[str, ...]] = (
        *(f for f in GPT2Config.bool_fields if f not in _GPT2_ONLY),
        "attention_softmax_in_fp32",
        "scale_attention_softmax_in_fp32",
        "multi_query",
    )
    absent_keys: ClassVar[tuple[str, ...]] = _GPT2_ONLY

    hidden_act: str = "gelu_pytorch_tanh"
    attention_softmax_in_fp32: bool = True
    scale_attention_softmax_in_fp32: bool = True
    multi_query: bool = True

    def __post_init__(self) -> None:
        for key in _GPT2_ONLY:  # not GPTBigCode's: kept as they were given, and not acted on
            if getattr(self, key) is not False:
                self.extra[key] = getattr(self, key)
                setattr(self, key, False)
        super().__post_init__()
        self.num_key_value_heads = 1 if self.multi_query else self.num_attention_heads
        # n_inner reads as the MLP's width (a GGUF file, which always gives it, then makes the same config);
        # config.json keeps null where it had null
        self._n_inner_unset, self.n_inner = self.n_inner is None, self.intermediate_size

    def to_dict(self) -> dict[str, Any]:
        out = {**super().to_dict(), "num_key_value_heads": self.num_key_value_heads}  # as transformers writes
        if self.__dict__.get("_n_inner_unset") and self.n_inner == 4 * self.hidden_size:
            out["n_inner"] = None
        return out


_dataclass_init = GPTBigCodeConfig.__init__


def _init(self, **kwargs: Any) -> None:
    """GPTBigCodeConfig(n_embd=64, n_layer=2, ...) as in transformers: config.json's names as arguments too."""
    theirs = {v: k for k, v in GPTBigCodeConfig.attribute_map.items()}
    _dataclass_init(self, **{theirs.get(k, k): v for k, v in kwargs.items()})


GPTBigCodeConfig.__init__ = _init


class GPTBigCodeAttention(GPT2Attention):
    """c_attn (Linear) packing q, k, v (all heads' q, then the k and v heads; per head without multi_query) and
    c_proj; the scale 1/sqrt(head_dim) unless scale_attn_weights is off."""

    def __init__(self, config: GPTBigCodeConfig, layer_idx: int):
        self.multi_query = config.multi_query
        scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        h, n, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        Attention.__init__(self, h, n, kv, config.head_dim, layer_idx, bias=True, scale=scale, rope=None)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        self.c_attn = Linear(hidden, hidden + 2 * self.num_kv_heads * self.head_dim)
        self.c_proj = Linear(hidden, hidden)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.c_attn(x)
        if self.multi_query:  # (B, T, h + 2 * hd) -> (B, T, h), (B, T, hd), (B, T, hd)
            q, k, v = qkv.split((self.num_heads * self.head_dim, self.head_dim, self.head_dim), -1)
            return q, k, v
        B, T, _ = x.shape
        qkv = qkv.view(B, T, self.num_heads, 3, self.head_dim)  # per head: [q, k, v]
        q, k, v = (t.reshape(B, T, self.num_heads * self.head_dim) for t in qkv.unbind(3))
        return q, k, v


class GPTBigCodeMLP(GPT2MLP):
    """GPT-2's MLP (c_fc, the activation, c_proj) with Linear layers."""

    def __init__(self, hidden: int, inner: int, act: str):
        torch.nn.Module.__init__(self)
        self.c_fc = Linear(hidden, inner)
        self.c_proj = Linear(inner, hidden)
        self.act = ACTIVATIONS[act]


class GPTBigCodeBlock(GPT2Block):
    """GPT-2's pre-norm block (ln_1, attn, ln_2, mlp) with GPTBigCode's attention and MLP."""

    def __init__(self, config: GPTBigCodeConfig, layer_idx: int):
        torch.nn.Module.__init__(self)
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = torch.nn.LayerNorm(h, eps=eps)
        self.attn = GPTBigCodeAttention(config, layer_idx)
        self.ln_2 = torch.nn.LayerNorm(h, eps=eps)
        self.mlp = GPTBigCodeMLP(h, config.intermediate_size, config.hidden_act)


class GPTBigCodeModel(GPT2Model):
    """GPT-2's body (wte, wpe, h, ln_f) of GPTBigCode blocks."""

    def __init__(self, config: GPTBigCodeConfig):
        eps = config.layer_norm_epsilon
        DecoderModel.__init__(self, config, GPTBigCodeBlock, torch.nn.LayerNorm(config.hidden_size, eps=eps))
        self.wpe = embedding(config.max_position_embeddings, config.hidden_size)
        self._modules = {"wte": self.wte, "wpe": self.wpe, **self._modules}  # transformers' order (forward's)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        try:
            return super().scale_inputs(x, position_ids)
        except GenerationError as e:
            raise GenerationError(str(e).replace("GPT-2's", "the model's")) from None


def gguf_config(d: dict[str, Any], get) -> None:
    """llama.cpp's starcoder metadata: feed_forward_length is the MLP's width (n_inner); the KV head count follows
    multi_query (set by the layout)."""
    ff = d.pop("intermediate_size", None)
    if ff is not None:
        d["n_inner"] = ff
    d.pop("num_key_value_heads", None)


def gguf_write_config(m: dict[str, Any], c: GPTBigCodeConfig) -> None:
    """What llama.cpp's StarCoderModel writes: no vocabulary size, head size, RoPE base or RMS epsilon; the LayerNorm
    epsilon; head_count_kv 1; feed_forward_length the MLP's width (the converter's 4 * n_embd, which it is in
    every released model)."""
    for key in ("vocab_size", "attention.key_length", "attention.value_length", "rope.freq_base",
                "attention.layer_norm_rms_epsilon", "rope.dimension_count"):  # fmt: skip
        m.pop(key, None)


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    """transformers' GPTBigCodeForCausalLM (the LM head tied to wte unless the config unties it)."""

    config_class = GPTBigCodeConfig
    # none, as in transformers: c_attn's single k/v head (multi_query) cannot be split over ranks
    tp_patterns: ClassVar[dict[str, str]] = {}
    _no_split_modules: ClassVar[list[str]] = ["GPTBigCodeBlock"]
    # llama.cpp's starcoder: the Linear weights as they are (no transposes), q/k/v fused in c_attn's order
    gguf = GGUFLayout(
        "starcoder",
        config=(("attention.layer_norm_epsilon", "layer_norm_epsilon"),),
        layer=(
            ("attn_norm", "ln_1"),
            ("attn_qkv", "attn.c_attn"),
            ("attn_output", "attn.c_proj"),
            ("ffn_norm", "ln_2"),
            ("ffn_up", "mlp.c_fc"),
            ("ffn_down", "mlp.c_proj"),
        ),
        top=(
            ("token_embd", "transformer.wte"),
            ("position_embd", "transformer.wpe"),
            ("output_norm", "transformer.ln_f"),
        ),
        fixed=(("multi_query", True),),
        derive=gguf_config,
        write_config=gguf_write_config,
    )

    def __init__(self, config: GPTBigCodeConfig):
        CausalLM.__init__(self, config, GPTBigCodeModel(config))
