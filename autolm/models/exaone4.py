"""EXAONE 4 (LG AI Research: EXAONE-4.0-1.2B, EXAONE-4.0-32B): OLMo 2's layer order (no norm before the
sublayers, RMSNorm on each sublayer's output before its residual add) with Qwen 3's per-head RMSNorm on queries
and keys, a SiLU-gated MLP and no biases. Local (sliding-window) and global layers as `layer_types` says (by
default every `sliding_window_pattern`-th layer global); where a sliding window is configured the global layers
use no RoPE ("global NoPE"), else every layer rotates. The 1.2B model: all layers global, no window, tied head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, GGUFLayout, RMSNorm
from .base import CausalLM, DecoderModel
from .image_text import ImageTextConfig

DEFAULT_PATTERN = 4  # transformers' sliding_window_pattern: every 4th layer global


@dataclass(repr=False)
class Exaone4Config(PretrainedConfig):
    """transformers' Exaone4Config: its defaults, layer_types derived from sliding_window and
    sliding_window_pattern (kept as config.json gives it, in `extra`) as transformers derives them."""

    model_type: ClassVar[str] = "exaone4"
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim",)  # not in transformers' config: written when set

    vocab_size: int = 102400
    intermediate_size: int = 16384
    num_key_value_heads: int | None = 32
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 0
    sliding_window: int | None = 4096

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:  # else the base validation names the key
            self.layer_types = self.default_layer_types(n)
        super().__post_init__()

    def default_layer_types(self, n: int) -> list[str]:
        """transformers' derivation: with a window, layer i is global where (i + 1) % sliding_window_pattern == 0
        and local elsewhere; without one (where transformers divides by zero) every layer is global."""
        if self.sliding_window is None:
            return ["full_attention"] * n
        every = self.extra.get("sliding_window_pattern", DEFAULT_PATTERN)
        if isinstance(every, str):
            raise ConfigError(
                f"{self.source}: sliding_window_pattern {every!r} (a string) needs layer_types to be given, "
                "as transformers' Exaone4Config does"
            )
        if not _is_int(every) or every <= 0:
            raise ConfigError(
                f"{self.source}: sliding_window_pattern must be a positive integer, found {every!r}"
            )
        return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]

    def layer_rope(self, i: int) -> str | None:
        """The RoPE table layer i reads: none on global layers of a model with a sliding window."""
        if self.sliding_window is not None and self.layer_types[i] != "sliding_attention":
            return None
        return "default"


class Exaone4DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            window=config.layer_window(layer_idx),
            rope=config.layer_rope(layer_idx),
            qk_norm="head",
            norm=lambda dim: RMSNorm(dim, eps),
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(x, ctx))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Exaone4Model(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, Exaone4DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


# llama.cpp's exaone4 slides (and skips RoPE on global layers) only at 64 layers (EXAONE-4.0-32B's depth)
LLAMA_CPP_WINDOWED_LAYERS = 64
LLAMA_CPP_WINDOW = 4096  # its window where the file gives none


def gguf_window_layers(d: dict[str, Any], get, pattern: int = DEFAULT_PATTERN) -> None:
    """The local layers as llama.cpp's load_swa_pattern reads them: one flag per layer
    (attention.sliding_window_pattern), else every `pattern`-th layer (the key's integer where it is one) global."""
    flags, n = get("attention.sliding_window_pattern"), d.get("num_hidden_layers")
    if isinstance(flags, list):
        d["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags[:n]]
    elif _is_int(n):
        every = flags if _is_int(flags) and flags > 0 else pattern
        d["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]


def _gguf_derive(d: dict[str, Any], get) -> None:
    """What llama.cpp's exaone4 makes of a file: a model of 64 layers (EXAONE-4.0-32B's) slides, over
    attention.sliding_window (4096 where absent) on the local layers the flags name (every 4th layer global where
    there are none), its global layers without RoPE; a model of any other depth runs every layer global with RoPE,
    whatever window the file gives. Its attention output is hidden_size wide: head_dim * heads must be
    hidden_size."""
    if d.get("num_hidden_layers") != LLAMA_CPP_WINDOWED_LAYERS:
        d["sliding_window"] = None
        d.pop("layer_types", None)
    else:
        d["sliding_window"] = d.get("sliding_window") or LLAMA_CPP_WINDOW
        gguf_window_layers(d, get)
    _check_gguf_heads(d, "exaone4")


def _check_gguf_heads(d: dict[str, Any], arch: str) -> None:
    head_dim, heads, hidden = d.get("head_dim"), d.get("num_attention_heads"), d.get("hidden_size")
    if _is_int(head_dim) and _is_int(heads) and _is_int(hidden) and head_dim * heads != hidden:
        raise ConfigError(f"llama.cpp's {arch} projects attention output from hidden_size ({hidden}) wide heads: "
                          f"head_dim ({head_dim}) * num_attention_heads ({heads}) must equal it")  # fmt: skip


def _gguf_write_config(meta: dict[str, Any], c: Exaone4Config) -> None:
    """As llama.cpp's Exaone4Model writes it: TextModel's keys and the vocabulary size (no RoPE dimension count),
    the window and the local layers as flags wherever the config has a window (even with no local layer: the
    global layers then skip RoPE)."""
    meta.pop("rope.dimension_count", None)
    meta.pop("attention.sliding_window", None)
    if c.sliding_window is not None:
        meta["attention.sliding_window"] = c.sliding_window
        meta["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]


class Exaone4_5_Config(ImageTextConfig):
    """transformers' Exaone4_5_Config (EXAONE 4.5, image-text): its language model's, an EXAONE 4; the head untied by
    default."""

    model_type: ClassVar[str] = "exaone4_5"
    text_class: ClassVar[type] = Exaone4Config
    tie_default: ClassVar[bool | None] = False


class Exaone4ForCausalLM(CausalLM):
    """transformers' Exaone4ForCausalLM."""

    config_class = Exaone4Config
    # llama.cpp's converter (Exaone4Model, TextModel's defaults): q/k rows not permuted (NeoX RoPE), the head size
    # as attention.key_length where config.json gives one, OLMo 2's post-norm tensor names
    gguf = GGUFLayout(
        "exaone4",
        config=(("attention.key_length", "head_dim"),),
        layer=(
            ("post_attention_norm", "post_attention_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
        rope_freqs=True,  # Llama 3 RoPE (EXAONE 4's) as the converter's rope_freqs
    )
    # transformers' base_model_tp_plan is Llama's (the per-head q/k norms replicated): the default LLAMA_TP
    _no_split_modules: ClassVar[list[str]] = ["Exaone4DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Exaone4Model(config))
