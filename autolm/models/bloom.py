"""BLOOM (BigScience's bloom-560m ... bloom (176B), and the bloomz fine-tunes): LayerNorm (with bias) everywhere,
a LayerNorm right after the word embeddings (`word_embeddings_layernorm`), multi-head attention whose q/k/v are one
fused `query_key_value` laid out per head, (heads, [q, k, v], head_dim), as GPT-NeoX's, with biases on every
projection, no position embeddings but ALiBi: each head's scores get its slope times the key's position, the slopes
a geometric sequence (2^(-8/n) to the powers 1..n for the n = 2^floor(log2(heads)) first heads, the odd powers of
2^(-4/n) for the rest; computed in float32 as transformers does). The MLP is dense_h_to_4h -> GELU (Megatron's tanh
approximation, `bloom_gelu`) -> dense_4h_to_h, 4 * hidden wide. The layer is sequential, x += attn(ln1(x)), then
x += mlp(ln2(x)); with `apply_residual_connection_post_layernorm` each residual is the normed input instead of x.

transformers' names: the body is `transformer` (word_embeddings, word_embeddings_layernorm, h, ln_f); autolm's code
reaches it as `model` and its parts as `embed_tokens`, `layers` and `norm`. The head is tied to word_embeddings.
config.json names n_layer, n_head and layer_norm_epsilon (attributes under both names). `pretraining_tp` alone changes
nothing (transformers' default path); with `slow_but_exact` (and pretraining_tp > 1) transformers sums the output
projections (dense, dense_4h_to_h) over pretraining_tp slices and leaves out their biases: refused. transformers' dropouts
(hidden_dropout, attention_dropout) are kept in the config and not applied, as in every autolm family. BLOOM has no
context window of its own: max_position_embeddings (not in config.json) is config.json's `seq_length` where given,
else 2048, the length BLOOM was trained on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import config_json_names
from ..errors import ConfigError
from ..nn import Attention, GGUFLayout, Linear
from .base import CausalLM, DecoderModel
from .gpt_neox import GPTNeoXAttention, qkv_rows

# fields autolm derives (or BLOOM has no such feature): not in BLOOM's config.json
_NOT_BLOOM = ("intermediate_size", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
              "sliding_window", "rope_parameters", "rope_theta", "rope_scaling")  # fmt: skip


@dataclass(repr=False)
class BloomConfig(PretrainedConfig):
    """transformers' BloomConfig: config.json's names n_layer, n_head and layer_norm_epsilon are autolm's
    num_hidden_layers, num_attention_heads and rms_norm_eps (attributes under both names); `n_embed` (old files)
    is read as hidden_size. The MLP is 4 * hidden_size wide, the activation BLOOM's own GELU. hidden_dropout,
    pretraining_tp, slow_but_exact and initializer_range, which change nothing here (slow_but_exact with
    pretraining_tp > 1 is refused), are kept as config.json gives them (and checked)."""

    model_type: ClassVar[str] = "bloom"
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "rms_norm_eps": "layer_norm_epsilon",
    }
    activations: ClassVar[tuple[str, ...]] = ("bloom_gelu",)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "apply_residual_connection_post_layernorm",
    )

    vocab_size: int = 250880
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    hidden_act: str = "bloom_gelu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    apply_residual_connection_post_layernorm: bool = False

    def __post_init__(self) -> None:
        if "n_embed" in self.extra:  # transformers' old name, read as hidden_size
            self.hidden_size = self.extra.pop("n_embed")
        h = self.hidden_size
        self.intermediate_size = 4 * h if _is_int(h) else h
        self.num_key_value_heads = self.head_dim = None  # derived from n_head and hidden_size
        if "seq_length" in self.extra:
            self.max_position_embeddings = self.extra["seq_length"]
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = {**self.attribute_map, "max_position_embeddings": "seq_length"}
            raise ConfigError(re.sub(rf"\b({'|'.join(names)})\b", lambda m: names[m[1]], str(e))) from None

    def validate(self) -> None:
        super().validate()
        src, extra = self.source, self.extra
        tp, exact, dropout = (
            extra.get("pretraining_tp", 1),
            extra.get("slow_but_exact", False),
            extra.get("hidden_dropout", 0.0),
        )
        if not (_is_int(tp) and tp > 0):
            raise ConfigError(f"{src}: pretraining_tp must be a positive integer, found {tp!r}")
        if not isinstance(exact, bool):
            raise ConfigError(f"{src}: slow_but_exact must be true or false, found {exact!r}")
        if not (_is_number(dropout) and 0 <= dropout <= 1):
            raise ConfigError(f"{src}: hidden_dropout must be a number in [0, 1], found {dropout!r}")
        if exact and tp > 1:
            raise ConfigError(
                f"{src}: slow_but_exact true with pretraining_tp {tp} is not supported: transformers' slow_but_exact "
                "path sums pretraining_tp slices of dense and dense_4h_to_h and leaves out their biases; expected "
                "slow_but_exact false (the released BLOOM models' setting, which uses the biases)"
            )

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # ALiBi, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_BLOOM:
            out.pop(key, None)
        return out


# its other keywords (pretraining_tp, hidden_dropout, ...) kept as unknown keys
config_json_names(BloomConfig, {"n_embed": "hidden_size"}, keep_unknown=True)


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's slope per head, as transformers' _get_alibi_slopes computes them (float32 powers)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    cpu = torch.device("cpu")  # on the CPU, also while a model is made on the meta device
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32, device=cpu)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32, device=cpu))
    if closest != num_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device=cpu)
        rest = min(closest, num_heads - closest)
        odd = torch.arange(1, 1 + 2 * rest, 2, dtype=torch.int32, device=cpu)
        slopes = torch.cat([slopes, torch.pow(extra, odd)])
    return slopes.tolist()


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's GELU (Megatron's tanh approximation, its constants), in transformers' order of operations."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomAttention(GPTNeoXAttention):
    """GPT-NeoX's per-head `query_key_value` and `dense`, with biases, no RoPE and ALiBi's slopes."""

    def __init__(self, config: BloomConfig, layer_idx: int):
        h, n = config.hidden_size, config.num_attention_heads
        slopes = alibi_slopes(n)
        Attention.__init__(self, h, n, n, config.head_dim, layer_idx, bias=True, rope=None, alibi=slopes)


class BloomMLP(nn.Module):
    """dense_h_to_4h -> BLOOM's GELU -> dense_4h_to_h, with biases."""

    def __init__(self, config: BloomConfig):
        super().__init__()
        h = config.hidden_size
        self.dense_h_to_4h = Linear(h, config.intermediate_size)
        self.dense_4h_to_h = Linear(config.intermediate_size, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    """input_layernorm -> self_attention, post_attention_layernorm -> mlp, each added to its residual: the block's
    input (the attention's output for the MLP), or with apply_residual_connection_post_layernorm the normed one."""

    def __init__(self, config: BloomConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attention = BloomAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = BloomMLP(config)
        self.post_norm_residual = config.apply_residual_connection_post_layernorm

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        normed = self.input_layernorm(x)
        x = (normed if self.post_norm_residual else x) + self.self_attention(normed, ctx)
        normed = self.post_attention_layernorm(x)
        return (normed if self.post_norm_residual else x) + self.mlp(normed)


class BloomModel(DecoderModel):
    """word_embeddings, word_embeddings_layernorm, h, ln_f; `embed_tokens`, `layers` and `norm` name word_embeddings,
    h and ln_f (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "word_embeddings", "layers": "h", "norm": "ln_f"}

    def __init__(self, config: BloomConfig):
        eps = config.layer_norm_epsilon
        super().__init__(config, BloomBlock, nn.LayerNorm(config.hidden_size, eps=eps))
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        order = (
            "word_embeddings",
            "word_embeddings_layernorm",
            "h",
            "ln_f",
        )  # transformers' (forward's) order
        self._modules = {**{k: self._modules[k] for k in order}, **self._modules}

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The input vectors (embedded or given) through word_embeddings_layernorm."""
        return self.word_embeddings_layernorm(x)


def gguf_config(d: dict[str, Any], get) -> None:
    """llama.cpp's bloom metadata: the KV head count and FFN width follow the heads and hidden size; the context
    length is config.json's seq_length where it differs from the hidden size (the converter's stand-in for it)."""
    d.pop("num_key_value_heads", None)
    d.pop("intermediate_size", None)
    length = d.pop("max_position_embeddings", None)
    if length is not None and length != d.get("hidden_size"):
        d["seq_length"] = length


def gguf_write_config(m: dict[str, Any], c: BloomConfig) -> None:
    """What llama.cpp's BloomModel writes: context_length config.json's seq_length, else the hidden size; 4 * hidden
    as the FFN; head_count_kv the head count; the LayerNorm epsilon; no vocabulary size, head size, RoPE or RMS
    epsilon."""
    for key in ("vocab_size", "attention.key_length", "attention.value_length", "rope.freq_base",
                "attention.layer_norm_rms_epsilon", "rope.dimension_count"):  # fmt: skip
        m.pop(key, None)
    m["context_length"] = c.extra.get("seq_length", c.hidden_size)
    m["attention.head_count_kv"] = c.num_attention_heads


class BloomForCausalLM(CausalLM):
    """transformers' BloomForCausalLM (the head tied to word_embeddings unless the config unties it)."""

    config_class = BloomConfig
    base_model_prefix = "transformer"
    layers_prefix = "transformer.h"
    embeddings_name = "transformer.word_embeddings"
    # none, as in transformers: ALiBi's slopes belong to the heads, which a split would renumber per rank
    tp_patterns: ClassVar[dict[str, str]] = {}
    _no_split_modules: ClassVar[list[str]] = ["BloomBlock"]
    # llama.cpp's bloom graph: pre-norm residuals only, ALiBi with max_alibi_bias 8 (transformers' slopes), the
    # tanh GELU; q/k/v fused (attn_qkv) with its rows regrouped to all q | all k | all v (GPT-NeoX's qkv_rows)
    gguf = GGUFLayout(
        "bloom",
        config=(("attention.layer_norm_epsilon", "layer_norm_epsilon"),),
        layer=(
            ("attn_qkv", "self_attention.query_key_value"),
            ("attn_output", "self_attention.dense"),
            ("ffn_up", "mlp.dense_h_to_4h"),
            ("ffn_down", "mlp.dense_4h_to_h"),
        ),
        top=(
            ("token_embd", "transformer.word_embeddings"),
            ("token_embd_norm", "transformer.word_embeddings_layernorm"),
            ("output_norm", "transformer.ln_f"),
        ),
        fixed=(("apply_residual_connection_post_layernorm", False),),
        derive=gguf_config,
        write_config=gguf_write_config,
        row_order=qkv_rows,
    )

    def __init__(self, config: BloomConfig):
        super().__init__(config, BloomModel(config))

    @property
    def model(self) -> BloomModel:
        """The body (`transformer`), by the name autolm's code uses in every family."""
        return self.transformer
