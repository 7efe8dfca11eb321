"""Moshi's text decoder (transformers' MoshiForCausalLM: the "temporal" transformer of Kyutai's Moshi, text only):
pre-norm decoder layers of grouped-query attention with RoPE (rotate-half) and a gated MLP, RMSNorm, but

- the gated MLP is one `fc1` (hidden -> ffn_dim) whose output splits in two halves, act(first) * second, and an
  `fc2` (ffn_dim / 2 -> hidden); ffn_dim must be even;
- q/k/v/o are transformers' `MoshiLinear` wrappers: the checkpoint names them `self_attn.q_proj.linear.weight`
  (autolm's module is `self_attn.q_proj`; state_dict(), saving, loading and adapter files use transformers' names);
  peft cannot wrap a MoshiLinear (its attention adapters target the inner `linear`, which autolm has not): LoRA on
  Moshi targets fc1 / fc2, or q_proj ... o_proj in autolm alone;
- RMSNorm weights in fp32 (x * rsqrt(mean(x^2) + eps) * w, then the cast back), epsilon 1e-8;
- the token embeddings have vocab_size + 1 rows (the audio model's text padding token), the head vocab_size: never
  tied, whatever tie_word_embeddings says (transformers' MoshiForCausalLM ties nothing): the config reads
  tie_word_embeddings as False, and writes config.json's value back;
- every layer attends over a sliding window of `sliding_window` keys (3000, the original model's context): that is
  what transformers' cached decoding does (its DynamicCache keeps sliding_window - 1 past keys per layer), while its
  uncached forward over more than sliding_window tokens attends to all of them (a plain causal mask). autolm keeps the
  window in both: its forward equals transformers' for sequences up to sliding_window tokens (Moshi's 3000 is also
  max_position_embeddings) and its generation equals transformers' cached generation beyond;
- no tensor-parallel plan, as in transformers (refused by name);
- the output also carries `last_hidden_state` (the final-normed states the head read), as transformers' does.

config.json's `audio_encoder_config` (Mimi) and `depth_decoder_config` are kept as given (the audio encoder and the
depth decoder are MoshiForConditionalGeneration's; MoshiForCausalLM holds neither). llama.cpp has no Moshi
architecture: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import Attention, Linear, RMSNorm, embedding, transformers_state_dict
from ..nn.checkpoint import CheckpointRules, Rename
from ..nn.mlp import ACTIVATIONS
from .base import CausalLM, DecoderModel
from .image_text import refuse_media
from .output import ModelOutput, causal_lm_loss


@dataclass(repr=False)
class MoshiConfig(PretrainedConfig):
    """transformers' MoshiConfig: its fields and defaults (Moshi 7B's temporal transformer)."""

    model_type: ClassVar[str] = "moshi"
    absent_keys: ClassVar[tuple[str, ...]] = ("intermediate_size",)  # ffn_dim is Moshi's: fc2's width is half
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    audio_vocab_size: int | None = None
    max_position_embeddings: int = 3000
    sliding_window: int | None = 3000
    ffn_dim: int = 22528
    intermediate_size: int = 11264
    rms_norm_eps: float = 1e-8
    num_codebooks: int = 8
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if _is_int(self.ffn_dim) and self.ffn_dim > 0:
            self.intermediate_size = self.ffn_dim // 2
        super().__post_init__()
        # transformers' MoshiForCausalLM ties nothing, whatever config.json says: the loading, saving and placement
        # machinery reads False; config.json gets the value given back
        self.declared_tie, self.tie_word_embeddings = self.tie_word_embeddings, False

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "tie_word_embeddings": getattr(self, "declared_tie", False)}

    def _implied(self, f) -> Any:
        return self.ffn_dim // 2 if f.name == "intermediate_size" else super()._implied(f)

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + 1  # the head has vocab_size rows

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window

    def validate(self) -> None:
        super().validate()
        if not _is_int(self.ffn_dim) or self.ffn_dim <= 0 or self.ffn_dim % 2:
            raise ConfigError(
                f"{self.source}: ffn_dim must be a positive even integer, found {self.ffn_dim!r}"
            )
        for name in ("num_codebooks", "audio_vocab_size"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v > 0):
                raise ConfigError(f"{self.source}: {name} must be a positive integer, found {v!r}")


class MoshiGatingMLP(nn.Module):
    """fc2(act(a) * b) where (a, b) are the two halves of fc1(x): transformers' MoshiGatingMLP."""

    def __init__(self, hidden: int, ffn_dim: int, act: str):
        super().__init__()
        self.fc1 = Linear(hidden, ffn_dim, bias=False)
        self.fc2 = Linear(ffn_dim // 2, hidden, bias=False)
        self.act_fn = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act_fn(gate) * up)


class MoshiDecoderLayer(nn.Module):
    def __init__(self, config: MoshiConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            window=config.layer_window(layer_idx),
        )
        self.mlp = MoshiGatingMLP(h, config.ffn_dim, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps, weight_in_fp32=True)
        self.post_attention_layernorm = RMSNorm(h, eps, weight_in_fp32=True)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoshiModel(DecoderModel):
    def __init__(self, config: MoshiConfig):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        super().__init__(config, MoshiDecoderLayer, norm)
        self.embed_tokens = embedding(config.embedding_rows, config.hidden_size)


@dataclass
class MoshiCausalLMOutput(ModelOutput):
    """transformers' MoshiCausalLMOutputWithPast: the causal LM's output and the states the head read."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# transformers' MoshiLinear holds its nn.Linear as `.linear`
_RULES = [Rename(r"\.self_attn\.([qkvo])_proj\.linear\.", r".self_attn.\1_proj.",
                 r"\.self_attn\.([qkvo])_proj\.", r".self_attn.\1_proj.linear.")]  # fmt: skip


class MoshiForCausalLM(CausalLM):
    """transformers' MoshiForCausalLM: Moshi's text decoder with its text head."""

    config_class = MoshiConfig
    checkpoint_rules: ClassVar[CheckpointRules] = CheckpointRules(_RULES)
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan
    _no_split_modules: ClassVar[list[str]] = ["MoshiDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, MoshiModel(config))
        transformers_state_dict(self)  # state_dict() in transformers' names

    def adapter_key(self, key: str) -> str:
        """An adapter tensor's name in peft's file: transformers' module names."""
        return self.checkpoint_rules._back(key)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep: int = 0,
                output_hidden_states=None, output_attentions=None, return_dict=None, num_items_in_batch=None,
                **unused):  # fmt: skip
        """CausalLM's forward, with the final-normed states the head read as `last_hidden_state`."""
        refuse_media(self, unused)
        h, cache, hidden, attentions = self.decoder_states(input_ids, attention_mask, position_ids, past_key_values,
                                                           inputs_embeds, use_cache, cache_position,
                                                           output_hidden_states, output_attentions)  # fmt: skip
        h = h[:, -logits_to_keep:] if logits_to_keep else h
        logits = self.logits(h)
        loss = (
            None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch)
        )
        out = MoshiCausalLMOutput(loss, logits, h, cache, hidden, attentions)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()
