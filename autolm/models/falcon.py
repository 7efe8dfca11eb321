"""Falcon (TII's Falcon-7B, Falcon-40B, Falcon-180B, Falcon2-11B): LayerNorm (with bias), q/k/v as one fused
`query_key_value`, RoPE over whole heads (rotate-half), a plain GELU MLP dense_h_to_4h -> dense_4h_to_h, biases
on every projection or none (`bias`), a tied head by default.

The fused projection's rows run per KV group: (groups, [q of each head of the group..., k, v], head_dim). The
three attention layouts of config.json are this one layout with other group counts:
- `new_decoder_architecture` (Falcon-40B/180B): `num_kv_heads` groups;
- `multi_query` (Falcon-7B): one group, every head sharing one key and value;
- neither: a group per head, [q, k, v] per head (GPT-NeoX's layout).

The layer is parallel, x + attn(n(x)) + mlp(n'(x)): n = n' = `input_layernorm`, or with the new decoder
architecture and num_ln_in_parallel_attn 2 (its default) `ln_attn` before attention and `ln_mlp` before the MLP;
or, with parallel_attn false (and the old architecture), sequential: x += attn(input_layernorm(x)), then
x += mlp(post_attention_layernorm(x)).

transformers' names: the body is `transformer` (word_embeddings, h, ln_f); autolm's code reaches it as `model`
and its parts as `embed_tokens`, `layers` and `norm`. With `alibi` (Falcon-RW) the heads have no RoPE but ALiBi's
slopes (BLOOM's), as transformers computes Falcon's: from each key's position in its row, the product rounded to
bfloat16, divided by sqrt(head_dim) and added to the scaled scores (kernels.RowALiBi; its SDPA path, which the
eager one differs from by adding the bias twice). transformers' dropouts (hidden_dropout, attention_dropout) are
kept in the config and not applied, as in every autolm family.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_int
from ..config_fields import config_json_names
from ..errors import ConfigError
from ..nn import ACTIVATIONS, CheckpointRules, GGUFLayout, Linear, Rename
from .base import CausalLM, DecoderModel
from .bloom import alibi_slopes
from .gpt_neox import GPTNeoXAttention, GPTNeoXMLP


@dataclass(repr=False)
class FalconConfig(PretrainedConfig):
    """transformers' FalconConfig. config.json's names `activation`, `layer_norm_epsilon` and `ffn_hidden_size`
    (4 * hidden_size when null) are autolm's hidden_act, rms_norm_eps and intermediate_size (attributes under
    both names); `n_embed` (old files) is read as hidden_size. num_key_value_heads is derived: the KV groups of
    the attention layout (num_kv_heads with the new decoder architecture, 1 with multi_query, else every head)."""

    model_type: ClassVar[str] = "falcon"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_act": "activation",
        "rms_norm_eps": "layer_norm_epsilon",
        "intermediate_size": "ffn_hidden_size",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "alibi",
        "new_decoder_architecture",
        "multi_query",
        "parallel_attn",
        "bias",
    )

    vocab_size: int = 65024
    hidden_size: int = 4544
    intermediate_size: int | None = None
    num_hidden_layers: int = 32
    num_attention_heads: int = 71
    hidden_act: str = "gelu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 11
    eos_token_id: int | list[int] | None = 11
    num_kv_heads: int | None = None
    num_ln_in_parallel_attn: int | None = None
    alibi: bool = False
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        if "n_embed" in self.extra:  # transformers' old name, read as hidden_size
            self.hidden_size = self.extra.pop("n_embed")
        if self.intermediate_size is None and _is_int(self.hidden_size):
            self.intermediate_size = 4 * self.hidden_size
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.num_ln_in_parallel_attn is None and self.new_decoder_architecture is True:
            self.num_ln_in_parallel_attn = 2  # as transformers' decoder layer sets it
        if self.new_decoder_architecture is True:
            self.num_key_value_heads = self.num_kv_heads
        else:
            self.num_key_value_heads = 1 if self.multi_query is True else self.num_attention_heads
        self.head_dim = None  # hidden_size / num_attention_heads
        names = {**self.attribute_map, "num_key_value_heads": "num_kv_heads"}
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            raise ConfigError(re.sub(rf"\b({'|'.join(names)})\b", lambda m: names[m[1]], str(e))) from None

    @property
    def two_norms(self) -> bool:
        """ln_attn and ln_mlp (the new decoder architecture's default) rather than input_layernorm."""
        return self.new_decoder_architecture and self.num_ln_in_parallel_attn == 2

    def validate(self) -> None:
        super().validate()
        src = self.source
        n, kv, ln = self.num_attention_heads, self.num_kv_heads, self.num_ln_in_parallel_attn
        if not (_is_int(kv) and 0 < kv <= n):
            raise ConfigError(f"{src}: num_kv_heads must be a positive integer or null, found {kv!r}")
        if ln not in (None, 1, 2) or isinstance(ln, bool):
            raise ConfigError(f"{src}: num_ln_in_parallel_attn must be 1, 2 or null, found {ln!r}")
        if self.new_decoder_architecture and not self.parallel_attn:
            raise ConfigError(
                f"{src}: parallel_attn false with new_decoder_architecture is not supported (transformers' "
                "Falcon fails on it: the new decoder architecture is parallel)"
            )
        if not self.new_decoder_architecture and self.parallel_attn and ln == 2:
            raise ConfigError(
                f"{src}: num_ln_in_parallel_attn 2 needs new_decoder_architecture (transformers' Falcon fails "
                "on two layer norms in the old architecture); expected 1 or null"
            )
        if not self.new_decoder_architecture and not self.multi_query and kv != n:
            raise ConfigError(
                f"{src}: num_kv_heads ({kv}) must equal num_attention_heads ({n}) without multi_query or "
                "new_decoder_architecture (every head has its own key and value)"
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("num_key_value_heads", "head_dim", "sliding_window"):  # not in Falcon's config.json
            out.pop(key, None)
        return out


config_json_names(FalconConfig, {"n_embed": "hidden_size"})


class FalconAttention(GPTNeoXAttention):
    """`query_key_value` (rows per KV group: the group's queries, its key, its value) and `dense` (GPT-NeoX's
    output projection); grouped KV heads, a group per KV head."""

    def __init__(self, config: FalconConfig, layer_idx: int):
        h, n, alibi = config.hidden_size, config.num_attention_heads, config.alibi
        super(GPTNeoXAttention, self).__init__(
            h, n, config.num_key_value_heads, config.head_dim, layer_idx, bias=config.bias,
            rope=None if alibi else "default", alibi=alibi_slopes(n) if alibi else None,
        )  # fmt: skip

    def alibi_bias(self, device: torch.device):
        """Falcon-RW's ALiBi: from each row's positions, rounded to bfloat16, over sqrt(head_dim)."""
        slopes = super().alibi_bias(device)
        return None if slopes is None else kernels.RowALiBi(slopes, math.sqrt(self.head_dim))

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = Linear(hidden, rows, bias=bias)
        self.dense = Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.query_key_value(x).view(B, T, nkv, nh // nkv + 2, hd)
        q = qkv[:, :, :, :-2].reshape(B, T, nh * hd)
        return q, qkv[:, :, :, -2].reshape(B, T, nkv * hd), qkv[:, :, :, -1].reshape(B, T, nkv * hd)


class FalconMLP(GPTNeoXMLP):
    """dense_h_to_4h -> act -> dense_4h_to_h, with biases where config.bias says."""

    def __init__(self, config: FalconConfig):
        nn.Module.__init__(self)
        h, inner, bias = config.hidden_size, config.intermediate_size, config.bias
        self.dense_h_to_4h = Linear(h, inner, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dense_4h_to_h = Linear(inner, h, bias=bias)


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: FalconConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.self_attention = FalconAttention(config, layer_idx)
        self.mlp = FalconMLP(config)
        self.parallel = config.parallel_attn or config.new_decoder_architecture
        self.two_norms = config.two_norms
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(h, eps=eps)
            self.ln_mlp = nn.LayerNorm(h, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.two_norms:
            attn, mlp_in = self.self_attention(self.ln_attn(x), ctx), self.ln_mlp(x)
        else:
            mlp_in = self.input_layernorm(x)
            attn = self.self_attention(mlp_in, ctx)
        if not self.parallel:
            x = attn + x
            return self.mlp(self.post_attention_layernorm(x)) + x
        return self.mlp(mlp_in) + attn + x  # transformers' order: (mlp + attn) + residual


class FalconModel(DecoderModel):
    """word_embeddings, h, ln_f; `embed_tokens`, `layers` and `norm` name them (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "word_embeddings", "layers": "h", "norm": "ln_f"}

    def __init__(self, config: FalconConfig):
        super().__init__(
            config, FalconDecoderLayer, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        )


def qkv_rows(stem: str, config: FalconConfig) -> torch.Tensor | None:
    """llama.cpp's converter writes attn_qkv's rows as all q, then all k, then all v (the groups' queries in
    order); the model's run per group (groups, [q..., k, v], head_dim): for each model row, the file's row."""
    if stem != "attn_qkv":
        return None
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rows = torch.arange((nh + 2 * nkv) * hd)
    q = rows[: nh * hd].view(nkv, nh // nkv, hd)
    k, v = rows[nh * hd :].view(2, nkv, 1, hd)
    return torch.cat([q, k, v], 1).reshape(-1)


def gguf_config(d: dict[str, Any], get) -> None:
    """The attention layout from the file: attn_norm_2 tensors (read as new_decoder_architecture) mean Falcon-40B's
    two norms with head_count_kv groups; else one KV head is multi_query, one per head the plain layout, and
    another count the new architecture with one norm. The converter writes no rotary dimensions (whole heads)."""
    kv = d.pop("num_key_value_heads", 1)  # the converter's default: one KV head
    d.pop("head_dim", None)
    if d.get("new_decoder_architecture"):
        d.update(num_kv_heads=kv, num_ln_in_parallel_attn=2)
    elif kv == 1:
        d["multi_query"] = True
    elif kv == d.get("num_attention_heads"):
        d["multi_query"] = False
    else:
        d.update(new_decoder_architecture=True, num_ln_in_parallel_attn=1, num_kv_heads=kv)


def gguf_write_config(m: dict[str, Any], c: FalconConfig) -> None:
    """The inverse of gguf_config, as llama.cpp's FalconModel writes it: the q/k/v layout tag, LayerNorm's
    epsilon; no vocabulary size, head size, rotary dimensions or RMS epsilon, and no RoPE base where it is
    llama.cpp's default."""
    for key in ("vocab_size", "attention.key_length", "attention.value_length", "rope.dimension_count",
                "attention.layer_norm_rms_epsilon"):  # fmt: skip
        m.pop(key, None)
    if m.get("rope.freq_base") == 10000.0:  # llama.cpp's default, which the converter leaves to it
        m.pop("rope.freq_base")
    m["tensor_data_layout"] = "jploski"


# a GGUF file names Falcon-40B's ln_mlp attn_norm, which reads as input_layernorm: the models with two norms
# take it as ln_mlp
_LN_MLP = Rename(r"^(transformer\.h\.\d+)\.input_layernorm\.", r"\1.ln_mlp.", r"(?!)", "")


class FalconForCausalLM(CausalLM):
    """transformers' FalconForCausalLM (the head tied to word_embeddings unless the config unties it)."""

    config_class = FalconConfig
    base_model_prefix = "transformer"
    layers_prefix = "transformer.h"
    embeddings_name = "transformer.word_embeddings"
    # query_key_value and dense_h_to_4h split by rows (query_key_value's rows run per KV group, so each rank holds
    # whole groups: num_kv_heads, or every head, must divide by the ranks; multi_query's one group cannot split),
    # dense and dense_4h_to_h by their inputs
    tp_patterns: ClassVar[dict[str, str]] = {
        "h.*.self_attention.query_key_value": "colwise",
        "h.*.self_attention.dense": "rowwise",
        "h.*.mlp.dense_h_to_4h": "colwise",
        "h.*.mlp.dense_4h_to_h": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["FalconDecoderLayer"]
    # llama.cpp's falcon graph: always parallel, no biases, RoPE; q/k/v fused (attn_qkv) with its rows regrouped
    # (qkv_rows); Falcon-40B's ln_mlp as attn_norm (the MLP's and, without attn_norm_2, attention's), ln_attn as
    # attn_norm_2
    gguf = GGUFLayout(
        "falcon",
        config=(("attention.layer_norm_epsilon", "layer_norm_epsilon"),),
        layer=(
            ("attn_norm", "ln_mlp"),  # written; read as input_layernorm (next), renamed by _LN_MLP
            ("attn_norm", "input_layernorm"),
            ("attn_norm_2", "ln_attn"),
            ("attn_qkv", "self_attention.query_key_value"),
            ("attn_output", "self_attention.dense"),
            ("ffn_up", "mlp.dense_h_to_4h"),
            ("ffn_down", "mlp.dense_4h_to_h"),
        ),
        top=(("token_embd", "transformer.word_embeddings"), ("output_norm", "transformer.ln_f")),
        fixed=(("bias", False), ("parallel_attn", True), ("alibi", False)),
        present=(("blk.0.attn_norm_2.weight", "new_decoder_architecture"),),
        derive=gguf_config,
        write_config=gguf_write_config,
        row_order=qkv_rows,
    )

    def __init__(self, config: FalconConfig):
        super().__init__(config, FalconModel(config))
        if config.two_norms:
            self.checkpoint_rules = CheckpointRules([*type(self).checkpoint_rules.rules, _LN_MLP])

    @property
    def model(self) -> FalconModel:
        """The body (`transformer`), by the name autolm's code uses in every family."""
        return self.transformer
