"""GPT-NeoX Japanese (abeja/gpt-neox-japanese-2.7b): GPT-NeoX's layer (LayerNorms with bias, the fused
`query_key_value` laid out per head, rotary embeddings on `partial_rotary_factor` of each head, 1.0 by default) with
the sequential residual and no biases on its Linear layers; the last layer alone adds a `dense_bias` to its
attention output before the residual. The MLP is `intermediate_multiple_size` times hidden_size wide.

transformers' names: the body is `gpt_neox_japanese` (embed_in, layers, final_layer_norm), which autolm's code
reaches as `model` (embed_tokens, norm); the head is `embed_out` in transformers and on disk, `lm_head` in the
model (as GPT-NeoX's). llama.cpp has no GPT-NeoX Japanese architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_number
from ..errors import ConfigError
from ..nn import CheckpointRules, Ignored, Rename
from .base import CausalLM, DecoderModel
from .gpt_neox import GPTNeoXAttention, GPTNeoXConfig, GPTNeoXMLP, GPTNeoXModel, neox_init

_DERIVED = (
    "intermediate_size",
    "use_parallel_residual",
    "attention_bias",
)  # GPT-NeoX's, fixed or derived here


@dataclass(repr=False)
class GPTNeoXJapaneseConfig(GPTNeoXConfig):
    """transformers' GPTNeoXJapaneseConfig: GPT-NeoX's fields and spellings (layer_norm_eps, rotary_pct and
    rotary_emb_base) with a rotary fraction of 1.0 by default; `intermediate_size` is hidden_size times
    `intermediate_multiple_size`; no parallel residual, no attention biases. hidden_dropout, is_decoder and
    initializer_range change no computation and are kept as config.json gives them."""

    model_type: ClassVar[str] = "gpt_neox_japanese"
    absent_keys: ClassVar[tuple[str, ...]] = (*GPTNeoXConfig.absent_keys, *_DERIVED)

    vocab_size: int = 32000
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_multiple_size: int = 4
    max_position_embeddings: int = 2048
    attention_dropout: float = 0.1
    bos_token_id: int | None = 31996
    eos_token_id: int | list[int] | None = 31999
    tie_word_embeddings: bool = True
    use_parallel_residual: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        m = self.intermediate_multiple_size
        if not _is_number(m) or m <= 0:
            raise ConfigError(
                f"{self.source}: intermediate_multiple_size must be a positive number, found {m!r}"
            )
        if _is_number(self.hidden_size):
            self.intermediate_size = int(self.hidden_size * m)
        self.use_parallel_residual = self.attention_bias = False
        if isinstance(self.rope_parameters, dict):  # built in Python: transformers' default factor, 1.0
            self.rope_parameters = {"partial_rotary_factor": 1.0, **self.rope_parameters}
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """As GPT-NeoX's, but rotary_pct defaults to 1.0."""
        return super().read_rope({**d, "rotary_pct": d.get("rotary_pct", 1.0)}, source)

    def _implied(self, f) -> Any:
        if f.name in _DERIVED:
            return getattr(self, f.name)  # what config.json gives is not read (as in transformers)
        return super()._implied(f)


GPTNeoXJapaneseConfig.__init__ = neox_init(GPTNeoXJapaneseConfig.__init__)


class GPTNeoXJapaneseAttention(GPTNeoXAttention):
    """GPT-NeoX's attention without biases; the last layer's holds `dense_bias` (its layer adds it)."""

    def __init__(self, config: GPTNeoXJapaneseConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        last = layer_idx == config.num_hidden_layers - 1
        self.dense_bias = nn.Parameter(torch.zeros(config.hidden_size)) if last else None


class GPTNeoXJapaneseLayer(nn.Module):
    """x + attn(ln1(x)) (+ dense_bias), then that + mlp(ln2(that))."""

    def __init__(self, config: GPTNeoXJapaneseConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = GPTNeoXJapaneseAttention(config, layer_idx)
        self.mlp = GPTNeoXMLP(h, config.intermediate_size, config.hidden_act, bias=False)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), ctx)
        if self.attention.dense_bias is not None:
            attn = attn + self.attention.dense_bias
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoXJapaneseModel(DecoderModel):
    """embed_in, layers, final_layer_norm, under autolm's names too (as GPT-NeoX's)."""

    _ALIASES: ClassVar[dict[str, str]] = GPTNeoXModel._ALIASES

    def __init__(self, config: GPTNeoXJapaneseConfig):
        super().__init__(
            config, GPTNeoXJapaneseLayer, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        )


class GPTNeoXJapaneseForCausalLM(CausalLM):
    """transformers' GPTNeoXJapaneseForCausalLM (the head tied unless the config unties it)."""

    config_class = GPTNeoXJapaneseConfig
    base_model_prefix = "gpt_neox_japanese"
    layers_prefix = "gpt_neox_japanese.layers"
    embeddings_name = "gpt_neox_japanese.embed_in"
    tp_patterns: ClassVar[dict[str, str]] = {}  # transformers has no tensor-parallel plan for it
    _no_split_modules: ClassVar[list[str]] = ["GPTNeoXJapaneseLayer"]
    checkpoint_rules = CheckpointRules(
        [
            Rename(r"^embed_out\.", "lm_head.", r"^lm_head\.", "embed_out."),
            # transformers 4's buffers in older files (the causal mask, the rotary frequencies)
            Ignored(r"gpt_neox_japanese\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"),
        ]
    )

    def __init__(self, config: GPTNeoXJapaneseConfig):
        super().__init__(config, GPTNeoXJapaneseModel(config))

    @property
    def model(self) -> GPTNeoXJapaneseModel:
        """The body (`gpt_neox_japanese`), by the name autolm's code uses in every family."""
        return self.gpt_neox_japanese
