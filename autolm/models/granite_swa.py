"""Granite SWA (IBM's granite-swash): Granite (embedding, residual and attention multipliers, logits divided by
`logits_scaling`) with sliding-window and full-attention layers (`layer_types`; by default layer i is full where
i % 4 == 0, sliding over the last `sliding_window` tokens otherwise), a RoPE base per layer (`layer_rope_theta`;
0: no positional embedding on that layer, NoPE) and a learned sink logit per head in every attention layer (the
softmax over the keys and the sink, the sink's share dropped).

llama.cpp's converter (GraniteSWAModel) writes it as "granite_swa": Granite's keys (no head_dim), the window and
one sliding flag per layer, and `attention.rope_pattern` (one RoPE flag per layer) where the checkpoint's config
carries `no_rope_layers`; the sinks as attn_sinks. Its graph rotates every RoPE layer at the one
`rope.freq_base`: per-layer bases that differ from it are refused on GGUF out (naming layer_rope_theta).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, GGUFLayout, Rename, RMSNorm, SelfSharded
from .base import LLAMA_TP, CausalLM, DecoderModel
from .granite import GraniteConfig, GraniteDecoderLayer, GraniteForCausalLM, GraniteModel


class SlidingGranite:
    """The per-layer fields' defaults, checks and tables shared by Granite SWA and Granite MoE SWA's configs."""

    def _swa_defaults(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:
            self.layer_types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)]
        if self.layer_rope_theta is None and _is_int(n) and n > 0 and isinstance(self.rope_parameters, dict):
            self.layer_rope_theta = [self.rope_parameters.get("rope_theta", 10000.0)] * n

    def _validate_swa(self) -> None:
        r, n = self.layer_rope_theta, self.num_hidden_layers
        if not (isinstance(r, list) and len(r) == n and all(_is_number(t) and t >= 0 for t in r)):
            raise ConfigError(
                f"{self.source}: layer_rope_theta must list {n} RoPE bases (numbers >= 0; 0: no RoPE on the "
                f"layer), found {str(r)[:200]}"
            )

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        """One RoPE table per distinct base (the checkpoint's RoPE parameters at that base)."""
        r = self.layer_rope_theta if isinstance(self.layer_rope_theta, list) else []
        thetas = sorted({float(t) for t in r if _is_number(t) and t > 0})
        return {f"theta={t!r}": {**self.rope_parameters, "rope_theta": t} for t in thetas} or {
            "default": self.rope_parameters
        }

    def layer_rope(self, i: int) -> str | None:
        """The RoPE table layer i reads, None for a NoPE layer (a base of 0)."""
        t = self.layer_rope_theta[i]
        return f"theta={float(t)!r}" if t else None


@dataclass(repr=False)
class GraniteSWAConfig(SlidingGranite, GraniteConfig):
    """transformers' GraniteSWAConfig: Granite's fields with its defaults, the window and the per-layer bases."""

    model_type: ClassVar[str] = "granite_swa"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "use_sliding_window",
    )  # not in transformers' config: written when set

    vocab_size: int = 100352
    hidden_size: int = 2560
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 100257
    eos_token_id: int | list[int] | None = 100257
    tie_word_embeddings: bool = True
    sliding_window: int | None = 128
    layer_rope_theta: list[float] | None = None

    def __post_init__(self) -> None:
        self._swa_defaults()
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        self._validate_swa()


class SinkShardedAttention(SelfSharded, Attention):
    """Attention with sinks (one per query head) that tensor parallelism cuts with the heads (Flint's too)."""

    tp_dims: ClassVar[dict[str, int]] = {"sinks": 0}


def swa_attention(config: Any, layer_idx: int) -> Attention:
    """Granite's attention (scaled by attention_multiplier) with the layer's window, RoPE table and sinks."""
    return SinkShardedAttention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                     layer_idx, bias=config.attention_bias, scale=config.attention_multiplier,
                     window=config.layer_window(layer_idx), rope=config.layer_rope(layer_idx),
                     sinks=True)  # fmt: skip


class GraniteSWADecoderLayer(GraniteDecoderLayer):
    """Granite's layer (residuals times residual_multiplier) with swa_attention."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = swa_attention(config, layer_idx)


class GraniteSWAModel(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, GraniteSWADecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.embedding_multiplier = float(config.embedding_multiplier)

    scale_inputs = GraniteModel.scale_inputs  # the embeddings times embedding_multiplier


def gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's reading of a "granite_swa" file: each layer's sliding flag, each layer's RoPE flag (every layer
    rotated where the file gives none), all rotated layers at rope.freq_base."""
    n, flags, rope = (
        d.get("num_hidden_layers"),
        get("attention.sliding_window_pattern"),
        get("attention.rope_pattern"),
    )
    if not _is_int(n):
        return
    if isinstance(flags, list):
        d["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags[:n]]
    theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    rotated = rope[:n] if isinstance(rope, list) else [True] * n
    d["layer_rope_theta"] = [theta if r else 0 for r in rotated]


def gguf_write_config(out: dict[str, Any], c: Any) -> None:
    """GraniteSWAModel.set_gguf_parameters beyond Granite's keys: the window and the sliding flags always, the RoPE
    flags where a layer has none (the converter's no_rope_layers)."""
    if c.sliding_window is None:
        raise ConfigError(
            f"llama.cpp's 'granite_swa' format cannot hold this {c.model_type!r} model: its graph needs a "
            "window (sliding_window is null)"
        )
    out["attention.sliding_window"] = c.sliding_window
    out["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]
    if not all(c.layer_rope_theta):
        out["attention.rope_pattern"] = [bool(t) for t in c.layer_rope_theta]
    if not out.get("expert_shared_feed_forward_length"):  # written where set (Granite MoE SWA's shared MLP)
        out.pop("expert_shared_feed_forward_length", None)


# llama.cpp's sinks tensor (blk.N.attn_sinks.weight) read as the parameter itself
SINKS = Rename(r"\.self_attn\.sinks\.weight$", ".self_attn.sinks", r"(?!)", "")


class GraniteSWAForCausalLM(CausalLM):
    """transformers' GraniteSWAForCausalLM."""

    config_class = GraniteSWAConfig
    checkpoint_rules = CheckpointRules([SINKS])
    gguf = GGUFLayout(
        "granite_swa",
        permute_qk=True,
        config=GraniteForCausalLM.gguf.config,
        layer=(("attn_sinks", "self_attn.sinks"),),
        present=GraniteForCausalLM.gguf.present,
        derive=gguf_derive,
        write_config=gguf_write_config,
    )
    # transformers' plan: q/k/v and the MLP's gate/up column-parallel, o/down row-parallel, the sinks cut by head
    # (SinkShardedAttention)
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP
    _no_split_modules: ClassVar[list[str]] = ["GraniteSWADecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, GraniteSWAModel(config))
        self.logits_scaling = float(config.logits_scaling)  # an attribute: the compiled head's key holds it

    finish_logits = GraniteForCausalLM.finish_logits  # the logits divided by logits_scaling
