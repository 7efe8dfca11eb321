"""GPT-J (EleutherAI's GPT-J-6B and its fine-tunes): one LayerNorm (with bias) per layer whose output feeds attention
and the MLP in parallel (x + attn(ln_1(x)) + mlp(ln_1(x))), multi-head attention with q/k/v and the output
projection `out_proj` all without biases, RoPE (base 10000, fixed) on the first `rotary_dim` dimensions of each head
over interleaved pairs (x0, x1), (x2, x3), ..., a GELU MLP fc_in -> fc_out with biases (4 * n_embd wide unless
`n_inner` says otherwise), a final LayerNorm and an LM head with a bias, untied unless the config ties it.

transformers' names: the body is `transformer` (wte, h, ln_f); autolm's code reaches it as `model` and its parts as
`embed_tokens`, `layers` and `norm`, other names for wte, h and ln_f. config.json keeps GPT-2's names (n_embd,
n_layer, n_head, n_positions, activation_function, layer_norm_epsilon), which are attributes here too. transformers
reads the rotary tables from a sinusoid table n_positions long (a position past it fails there); autolm computes
them for any position. Old checkpoints carry attention-mask buffers (attn.bias, attn.masked_bias), skipped.

llama.cpp names a "gptj" architecture but can run none (no graph builds it, no converter writes it): no GGUF. CodeGen
(codegen.py) is this layer with q/k/v packed in one `qkv_proj`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, CheckpointRules, Ignored, Linear, Rotary, resize_bias
from .base import CausalLM, DecoderModel

# config fields autolm derives (or GPT-J has no such feature): not in GPT-J's config.json
_NOT_GPTJ = ("intermediate_size", "num_key_value_heads", "head_dim", "sliding_window", "rope_parameters",
             "rope_theta", "rope_scaling")  # fmt: skip


@dataclass(repr=False)
class GPTJConfig(PretrainedConfig):
    """transformers' GPTJConfig: config.json's names n_embd, n_layer, n_head, n_positions, activation_function,
    layer_norm_epsilon and attn_pdrop are autolm's hidden_size, num_hidden_layers, num_attention_heads,
    max_position_embeddings, hidden_act, rms_norm_eps and attention_dropout (attributes under both names). The RoPE
    base is fixed (10000): config.json has no RoPE keys, and any it has are not read, as transformers does not."""

    model_type: ClassVar[str] = "gptj"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "rms_norm_eps": "layer_norm_epsilon",
        "hidden_act": "activation_function",
        "attention_dropout": "attn_pdrop",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)

    vocab_size: int = 50400
    hidden_size: int = 4096
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    max_position_embeddings: int = 2048
    hidden_act: str = "gelu_new"
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    rotary_dim: int = 64
    n_inner: int | None = None
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0

    def __post_init__(self) -> None:
        if self.n_inner is not None and not (_is_int(self.n_inner) and self.n_inner > 0):
            raise ConfigError(
                f"{self.source}: n_inner must be a positive integer or null, found {self.n_inner!r}"
            )
        h = self.hidden_size
        self.intermediate_size = self.n_inner if self.n_inner is not None else 4 * h if _is_int(h) else h
        self.num_key_value_heads = self.head_dim = None  # derived from n_head and n_embd
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = "|".join(self.attribute_map)
            raise ConfigError(re.sub(rf"\b({names})\b", lambda m: self.attribute_map[m[1]], str(e))) from None

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return {"rope_type": "default", "rope_theta": 10000.0}, "v5"  # fixed, as in transformers

    def validate(self) -> None:
        super().validate()
        src, rd = self.source, self.rotary_dim
        if not (_is_int(rd) and 0 < rd <= self.head_dim and rd % 2 == 0):  # transformers 5 refuses null too
            raise ConfigError(
                f"{src}: rotary_dim must be an even positive integer at most the head size ({self.head_dim}), "
                f"found {rd!r}"
            )
        for name in ("resid_pdrop", "embd_pdrop"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v <= 1:
                raise ConfigError(f"{src}: {name} must be a number in [0, 1], found {v!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_GPTJ:
            out.pop(key, None)
        return out


def config_json_names(cls: type[PretrainedConfig]) -> None:
    """config.n_embd is config.hidden_size (and so on), and cls(n_embd=...) takes config.json's names, as in
    transformers."""
    for ours, theirs in cls.attribute_map.items():
        setattr(cls, theirs, property(lambda self, k=ours: getattr(self, k),
                                      lambda self, v, k=ours: setattr(self, k, v)))  # fmt: skip
    dataclass_init, names = cls.__init__, {v: k for k, v in cls.attribute_map.items()}

    def __init__(self, **kwargs: Any) -> None:
        dataclass_init(self, **{names.get(k, k): v for k, v in kwargs.items()})

    cls.__init__ = __init__


config_json_names(GPTJConfig)


class GPTJAttention(Attention):
    """Attention with GPT-J's names: q_proj, k_proj, v_proj and out_proj, none with a bias; RoPE over interleaved
    pairs of the first rotary_dim dimensions of each head (the tables are that wide: GPTJModel's rotary)."""

    def __init__(self, config: GPTJConfig, layer_idx: int):
        n = config.num_attention_heads
        super().__init__(config.hidden_size, n, n, config.head_dim, layer_idx, rope_interleaved=True)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        self.k_proj = Linear(hidden, hidden, bias=False)  # transformers' order
        self.v_proj = Linear(hidden, hidden, bias=False)
        self.q_proj = Linear(hidden, hidden, bias=False)
        self.out_proj = Linear(hidden, hidden, bias=False)

    @property
    def o_proj(self) -> Linear:
        """Attention.forward's output projection: GPT-J calls it out_proj."""
        return self.out_proj


class GPTJMLP(nn.Module):
    """fc_out(act(fc_in(x))), both with biases."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc_in = Linear(hidden, intermediate)
        self.fc_out = Linear(intermediate, hidden)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTJBlock(nn.Module):
    """ln_1 feeding attention and the MLP in parallel; `attention_cls` is the family's attention (CodeGen's packs
    q/k/v)."""

    attention_cls: ClassVar[type[Attention]] = GPTJAttention

    def __init__(self, config: GPTJConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = self.attention_cls(config, layer_idx)
        self.mlp = GPTJMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self.ln_1(x)
        return self.attn(h, ctx) + self.mlp(h) + x  # summed in transformers' order


class GPTJModel(DecoderModel):
    """wte, h, ln_f; `embed_tokens`, `layers` and `norm` name them (also when assigned). The RoPE tables are
    rotary_dim wide, their frequencies 10000 ** (-2i / rotary_dim)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "wte", "layers": "h", "norm": "ln_f"}
    block_cls: ClassVar[type[nn.Module]] = GPTJBlock

    def __init__(self, config: GPTJConfig):
        super().__init__(
            config, self.block_cls, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        )
        self.rotary = Rotary(config.rope_kinds(), config.rotary_dim, config.max_position_embeddings)


class GPTJForCausalLM(CausalLM):
    """transformers' GPTJForCausalLM: the LM head has a bias (`lm_head.bias`); token_type_ids, where given, are
    looked up in wte and added to the input vectors, as transformers does."""

    config_class = GPTJConfig
    model_cls: ClassVar[type[GPTJModel]] = GPTJModel
    base_model_prefix = "transformer"
    layers_prefix = "transformer.h"
    embeddings_name = "transformer.wte"
    # transformers declares no plan for GPT-J; q/k/v and fc_in split by output features (whole heads per rank),
    # out_proj and fc_out by input features (fc_out's bias whole on every rank, added once)
    tp_patterns: ClassVar[dict[str, str]] = {
        "h.*.attn.q_proj": "colwise",
        "h.*.attn.k_proj": "colwise",
        "h.*.attn.v_proj": "colwise",
        "h.*.attn.out_proj": "rowwise",
        "h.*.mlp.fc_in": "colwise",
        "h.*.mlp.fc_out": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["GPTJBlock"]
    # the attention-mask buffers older transformers saved with the weights (EleutherAI/gpt-j-6b's files; CodeGen's
    # causal_mask)
    checkpoint_rules = CheckpointRules(
        [Ignored(r"transformer\.h\.\d+\.attn\.(bias|masked_bias|causal_mask)")]
    )

    def __init__(self, config: GPTJConfig):
        super().__init__(config, self.model_cls(config))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)

    @property
    def model(self) -> GPTJModel:
        """The body (`transformer`), by the name autolm's code uses in every family."""
        return self.transformer

    def forward(self, input_ids=None, *args, token_type_ids=None, inputs_embeds=None, **kwargs):
        """transformers' forward; token_type_ids (looked up in wte) are added to the input vectors."""
        if token_type_ids is not None:
            if inputs_embeds is None:
                inputs_embeds, input_ids = self.model.embed(input_ids), None
            inputs_embeds = inputs_embeds + self.transformer.wte(token_type_ids)
        return super().forward(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """CausalLM's resizing, and the head's bias resized as transformers resizes it: added entries are the old
        entries' mean (zeros without mean_resizing, or where the head is tied: transformers pads it then)."""
        bias = self.lm_head.bias
        emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        resize_bias(
            self.lm_head, bias, emb.weight.shape[0], mean_resizing and not self.config.tie_word_embeddings
        )
        return emb
