"""Chameleon (Meta's Chameleon 7B / 30B, GAIR's Anole: model_type chameleon, transformers'
ChameleonForConditionalGeneration): its language model, on text input_ids.

Llama's decoder (grouped-query attention with rotate-half RoPE, a SiLU-gated MLP, RMSNorm), but

- per-head LayerNorms on queries and keys (`q_norm`, `k_norm`: a weight and a bias of shape (heads, head_dim), one
  row per head, statistics over each head's head_dim, epsilon 1e-5 whatever the config says), before RoPE;
- `swin_norm`: the layer's two RMSNorms normalise the attention's and the MLP's outputs before each residual add
  (x + norm(attn(x)), then x + norm(mlp(x))) instead of their inputs;
- image tokens in the vocabulary: the VQ-VAE image tokenizer (`model.vqmodel.*`) turns an image into vocabulary
  tokens; autolm runs text input_ids alone and skips its tensors. transformers' forward sets the logits of the
  image tokens (the `vocabulary_map` entries named "IMGIMG...") to the dtype's lowest value, so text generation
  never picks them; autolm does the same (`image_tokens`).

head_dim is always hidden_size / num_attention_heads. transformers' Chameleon has no tensor-parallel plan: refused. Saved, the model is the checkpoint without its VQ-VAE
(transformers' ChameleonForConditionalGeneration loads it, its VQ-VAE left at its initialization).

GGUF: llama.cpp's "chameleon" (its converter drops the VQ-VAE, permutes q/k rows for interleaved RoPE and the
q/k norms' columns alike, writes `swin_norm`). llama.cpp suppresses the image tokens as ids 4..8195 (Chameleon's
vocabulary), not from the file: autolm reads that range from a file of its architecture as the vocabulary_map's
image tokens (named as transformers spells VQ code id - 4: IMGIMG, its digits as letters, Z), and refuses GGUF out of a model whose image tokens are others (llama.cpp would compute otherwise).
llama.cpp's converter writes each q/k norm's first head's row for every head (Chameleon's heads share them); autolm
writes each head's own. llama.cpp's swin_norm layers feed the MLP the normed attention output alone (not the
residual stream): a file with swin_norm is read as transformers computes the model, and GGUF out of one refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, GGUFLayout, Ignored, RMSNorm
from .base import CausalLM, DecoderModel
from .image_text import IMAGE_TEXT_RULES
from .llama import LlamaConfig, LlamaDecoderLayer

_IMAGE_PREFIX = "IMGIMG"  # transformers' ChameleonImageVocabularyMapping: image tokens' names start with it
# llama.cpp's chameleon graph: the logits of ids 4 .. 8195 (Chameleon's 8192 image tokens) set to -FLT_MAX
LLAMA_CPP_IMAGE_TOKENS = (4, 8196)


@dataclass(repr=False)
class ChameleonConfig(LlamaConfig):
    """transformers' ChameleonConfig: its fields and defaults (Chameleon 7B's sizes); the VQ-VAE's vq_config is
    kept as read (config.json round trip), not used."""

    model_type: ClassVar[str] = "chameleon"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "sliding_window",
        "use_sliding_window",
    )
    bool_fields: ClassVar[tuple[str, ...]] = (*LlamaConfig.bool_fields, "swin_norm")
    # a GGUF file holds no vocabulary_map: its image tokens are compared (gguf_compared), not their names
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("vocabulary_map", "model_parallel_size")

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    model_parallel_size: int | None = 1
    swin_norm: bool = False
    vocabulary_map: dict[str, int] | None = None

    @property
    def image_tokens(self) -> tuple[int, ...]:
        """The ids whose logits transformers' forward suppresses: the vocabulary_map's "IMGIMG..." tokens, sorted."""
        vocab = self.vocabulary_map or {}
        return tuple(sorted(v for k, v in vocab.items() if k.startswith(_IMAGE_PREFIX)))

    def gguf_compared(self) -> dict[str, Any]:
        return {"vocabulary_map's image tokens": self.image_tokens}

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Chameleon builds a plain causal mask whatever the config says

    def validate(self) -> None:
        super().validate()
        src, vocab = self.source, self.vocabulary_map
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConfigError(
                f"{src}: head_dim ({self.head_dim}) must be hidden_size / num_attention_heads "
                f"({self.hidden_size} / {self.num_attention_heads}): Chameleon's attention fixes it"
            )
        if vocab is not None and not (
            isinstance(vocab, dict)
            and all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in vocab.items())
        ):
            raise ConfigError(f"{src}: vocabulary_map must map token names to ids, found {str(vocab)[:100]}")
        bad = [t for t in self.image_tokens if t >= self.vocab_size]
        if bad:
            raise ConfigError(
                f"{src}: vocabulary_map names image token {bad[0]}, past vocab_size ({self.vocab_size})"
            )


class ChameleonLayerNorm(nn.Module):
    """transformers' ChameleonLayerNorm over (..., heads, head_dim): each head normalised over its head_dim
    (epsilon 1e-5, no affine), then times its weight row plus its bias row, in the input's dtype."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), None, None, eps=1e-5) * self.weight + self.bias


class ChameleonDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with per-head q/k LayerNorms; under swin_norm its norms apply to the attention's and the MLP's
    outputs (transformers' ChameleonSwinDecoderLayer)."""

    def __init__(self, config: ChameleonConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        attn = self.self_attn
        attn.q_norm = ChameleonLayerNorm(config.num_attention_heads, config.head_dim)
        attn.k_norm = ChameleonLayerNorm(config.num_key_value_heads, config.head_dim)
        attn.qk_norm = "head"  # applied to (B, T, heads, head_dim), each head by its own rows
        self.swin_norm = bool(config.swin_norm)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if not self.swin_norm:
            return super().forward(x, ctx)
        x = x + self.input_layernorm(self.self_attn(x, ctx))
        return x + self.post_attention_layernorm(self.mlp(x))


class ChameleonModel(DecoderModel):
    def __init__(self, config: ChameleonConfig):
        super().__init__(config, ChameleonDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


def image_token_name(code: int) -> str:
    """transformers' name of the vocabulary token of VQ code `code`: IMGIMG, its digits as letters A-J, then Z."""
    return _IMAGE_PREFIX + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def gguf_derive(d: dict[str, Any], get: Any) -> None:
    """llama.cpp knows no vocabulary_map: its graph suppresses ids 4 .. 8195 (Chameleon's image tokens, VQ codes
    0 .. 8191) whatever the file holds; read, vocabulary_map names those below vocab_size as image tokens."""
    lo, hi = LLAMA_CPP_IMAGE_TOKENS
    ids = range(lo, min(hi, d.get("vocab_size", ChameleonConfig.vocab_size)))
    d["vocabulary_map"] = {image_token_name(i - lo): i for i in ids} or None


def gguf_write_config(m: dict[str, Any], c: ChameleonConfig) -> None:
    """What ChameleonModel writes beside TextModel's keys: swin_norm (a bool, also when false); refused where
    llama.cpp's graph computes otherwise: swin_norm true, a vocabulary below 8196 (its -FLT_MAX over ids 4 .. 8195)."""
    m["swin_norm"] = bool(c.swin_norm)
    if c.swin_norm:
        raise ConfigError(
            "llama.cpp's 'chameleon' runs a swin_norm layer's MLP on the normed attention output alone, not on the "
            "residual stream as transformers does: a model with swin_norm true cannot be written"
        )
    if c.vocab_size < LLAMA_CPP_IMAGE_TOKENS[1]:
        raise ConfigError(
            f"llama.cpp's 'chameleon' graph suppresses the logits of ids 4 .. 8195 whatever the file holds: "
            f"vocab_size {c.vocab_size} must be at least {LLAMA_CPP_IMAGE_TOKENS[1]}"
        )


class ChameleonForConditionalGeneration(CausalLM):
    """transformers' ChameleonForConditionalGeneration on text: Llama's model with Chameleon's q/k norms and
    swin_norm, the image tokens' logits set to the dtype's lowest value."""

    config_class = ChameleonConfig
    checkpoint_rules: ClassVar[CheckpointRules] = CheckpointRules(
        [*IMAGE_TEXT_RULES, Ignored(r"model\.vqmodel\..+")]
    )
    # llama.cpp's ChameleonModel (convert_hf_to_gguf): Llama's names, q/k rows and the q/k norms' columns permuted
    gguf = GGUFLayout(
        "chameleon",
        config=(("swin_norm", "swin_norm"),),
        permute_qk=True,
        permute_qk_norm=True,
        derive=gguf_derive,
        write_config=gguf_write_config,
    )
    tp_patterns: ClassVar[dict[str, str]] = {}  # transformers' Chameleon has no tensor-parallel plan
    _no_split_modules: ClassVar[list[str]] = ["ChameleonDecoderLayer", "ChameleonSwinDecoderLayer"]

    def __init__(self, config: ChameleonConfig):
        super().__init__(config, ChameleonModel(config))
        self.image_tokens = config.image_tokens  # an attribute: the compiled head's key holds it

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.image_tokens:
            return logits
        index = torch.tensor(self.image_tokens, dtype=torch.long, device=logits.device)
        return logits.index_fill(-1, index, torch.finfo(logits.dtype).min)
