"""MusicGen's audio-token decoder alone (transformers' MusicgenForCausalLM over a MusicgenDecoderConfig, the file it
writes: model_type "musicgen_decoder"):

- input_ids of shape (batch * num_codebooks, seq_len): each row of `num_codebooks` codebooks embedded by its own
  table (vocab_size + 1 rows, the last the pad / start token), the embeddings summed; `scale_embedding` is read but,
  as in transformers, never applied;
- fixed sinusoidal positions (tensor2tensor's: cosines then sines, log(10000) / (dim / 2 - 1) apart), counted over the
  cache's slots, padding included, as transformers counts them (position_ids are not read);
- pre-LN layers: multi-head self-attention without biases (`out_proj`), LayerNorms with biases (eps 1e-5), an
  fc1 -> activation -> fc2 MLP without biases, a final `layer_norm`;
- every layer's cross-attention (`encoder_attn`, `encoder_attn_layer_norm`) loads and saves but never runs: autolm runs
  no text encoder and refuses encoder_hidden_states / encoder_attention_mask by name;
- `num_codebooks` heads (`lm_heads`), logits shaped (batch * num_codebooks, seq_len, vocab_size) as transformers
  returns them; the loss as transformers': labels (batch, seq_len, num_codebooks), pad_token_id ignored, the mean
  of the codebooks' cross-entropies;
- generate: transformers' delay pattern (see `delay_pattern`), greedy or sampling, one batch row per prompt of
  num_codebooks rows; the output (batch, num_codebooks, length) with the pattern's pad tokens taken out.

The composite files ("musicgen" / "musicgen_melody": text encoder, audio codec and this decoder, what
facebook/musicgen-* hold), which transformers' AutoModelForCausalLM maps to these classes but cannot build, load as
their decoder (musicgen_config: the `decoder` sub-config, decoder.* tensors, the encoders and enc_to_dec_proj
skipped; generation_config.json's decoder_start_token_id and pad_token_id read; its guidance_scale 3.0 is refused
at generate, which needs the text encoder: pass guidance_scale=1); saved, they are the decoder-only files. No
tensor-parallel plan (transformers has none); llama.cpp has no MusicGen: no GGUF.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, GenerationError
from ..nn import CheckpointRules, Linear, embedding
from .base import CausalLM, DecoderModel
from .musicgen_config import (
    COMPOSITE_RULES,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenMelodyConfig,
    MusicgenMelodyDecoderConfig,
)
from .musicgen_generate import delay_pattern_generate
from .opt import OPTDecoderLayer, OPTModel

__all__ = ["MusicgenConfig", "MusicgenDecoderConfig", "MusicgenForCausalLM", "MusicgenMelodyConfig",
           "MusicgenMelodyDecoderConfig", "MusicgenMelodyForCausalLM"]  # fmt: skip


class CodebookEmbeddings(nn.ModuleList):
    """One embedding table per codebook (transformers' `embed_tokens` ModuleList); ids (B, K, T) -> the sum of
    each codebook's embeddings (B, T, h). `weight` is the first table's (where autolm asks the embeddings' device)."""

    @property
    def weight(self) -> torch.Tensor:
        return self[0].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return sum(table(ids[:, k]) for k, table in enumerate(self))


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """transformers' MusicgenSinusoidalPositionalEmbedding rows for these positions, in float32."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=positions.device).float() * -(math.log(10000) / (half - 1)))
    angles = positions.float().unsqueeze(-1) * freq
    out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(out, (0, 1)) if dim % 2 else out


class CrossAttention(nn.Module):
    """A layer's encoder attention without biases (`encoder_attn`; hidden_size wide whatever
    cross_attention_hidden_size says, as transformers builds it): loaded and saved, never run."""

    def __init__(self, hidden: int):
        super().__init__()
        self.k_proj = Linear(hidden, hidden, bias=False)
        self.v_proj = Linear(hidden, hidden, bias=False)
        self.q_proj = Linear(hidden, hidden, bias=False)
        self.out_proj = Linear(hidden, hidden, bias=False)


class MusicgenDecoderLayer(OPTDecoderLayer):
    """OPT's pre-norm layer without biases, the cross-attention's modules beside it in transformers' order."""

    def __init__(self, config: MusicgenDecoderConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h = config.hidden_size
        order = ("self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")
        self._modules = {**{k: self._modules[k] for k in order[:2]},
                         "encoder_attn": CrossAttention(h),
                         "encoder_attn_layer_norm": nn.LayerNorm(h, eps=config.rms_norm_eps),
                         **{k: self._modules[k] for k in order[2:]}}  # fmt: skip


class MusicgenDecoder(DecoderModel):
    """embed_tokens (one table per codebook), the layers, layer_norm (`norm` names it)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "layer_norm"}
    layer_cls: ClassVar[type[nn.Module]] = MusicgenDecoderLayer

    def __init__(self, config: MusicgenDecoderConfig):
        super().__init__(config, self.layer_cls, nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.embed_tokens = CodebookEmbeddings(
            embedding(config.vocab_size + 1, config.hidden_size) for _ in range(config.num_codebooks)
        )
        self._modules = {k: self._modules[k] for k in ("embed_tokens", "layers", "layer_norm")}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B * K, T) -> the summed codebook embeddings (B, T, h)."""
        K = self.config.num_codebooks
        if input_ids.dim() != 2 or input_ids.shape[0] % K:
            raise GenerationError(f"input_ids must have shape (batch * num_codebooks, seq_len) with num_codebooks "
                                  f"{K}, found {tuple(input_ids.shape)}")  # fmt: skip
        return self.embed_tokens(input_ids.reshape(-1, K, input_ids.shape[-1]))

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return x + sinusoids(position_ids, x.shape[-1]).to(x.dtype)

    def forward(self, x, attention_mask, position_ids, cache, cache_position, kv_length, *rest, **kwargs):
        """DecoderModel's forward; positions are the cache's slots, padding included, as transformers counts them."""
        position_ids = cache_position.to(x.device).unsqueeze(0).expand(len(x), -1)
        return super().forward(
            x, attention_mask, position_ids, cache, cache_position, kv_length, *rest, **kwargs
        )


class MusicgenModel(OPTModel):
    """transformers' MusicgenModel, the module named `model`: it holds only the decoder and answers for it."""

    _DELEGATED: ClassVar[tuple[str, ...]] = (
        "embed_tokens",
        "layers",
        "norm",
        "layer_norm",
        "gradient_checkpointing",
    )

    def __init__(self, config: MusicgenDecoderConfig):
        nn.Module.__init__(self)
        self.decoder = MusicgenDecoder(config)


class MusicgenForCausalLM(CausalLM):
    """transformers' MusicgenForCausalLM: the decoder and one head per codebook (`lm_heads`)."""

    config_class = MusicgenDecoderConfig
    layers_prefix = "model.decoder.layers"
    embeddings_name = "model.decoder.embed_tokens"
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan
    checkpoint_rules: ClassVar[CheckpointRules] = CheckpointRules(
        COMPOSITE_RULES
    )  # the composite files' names
    unservable: ClassVar[str] = (
        "its input is num_codebooks rows of audio codes per sequence, not a text prompt"
    )
    _no_split_modules: ClassVar[list[str]] = ["MusicgenDecoderLayer"]
    # transformers' MusicgenForCausalLM.generate feeds each step's last slot alone, the first step too
    whole_prompt: ClassVar[bool] = False
    one_token_step: ClassVar[bool] = (
        False  # (B * K) rows of ids per B rows of states: the general forward decodes
    )

    def __init__(self, config: MusicgenDecoderConfig):
        super().__init__(config, MusicgenModel(config))
        self._heads(config)

    def _heads(self, config: MusicgenDecoderConfig) -> None:
        del self.lm_head
        self.lm_head = None
        self.lm_heads = nn.ModuleList(
            Linear(config.hidden_size, config.vocab_size, bias=False) for _ in range(config.num_codebooks)
        )

    def blocks(self) -> list[str]:
        decoder = self.model.decoder
        layers = [f"{self.layers_prefix}.{i}" for i in range(len(decoder.layers))]
        return ["model.decoder.embed_tokens", *layers, "model.decoder.layer_norm", "lm_heads"]

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_heads

    def resize_token_embeddings(self, *args, **kwargs):
        """Refused: one table and one head per codebook, and the pad / start row past the vocabulary."""
        raise ConfigError("resize_token_embeddings: MusicGen's decoder keeps one embedding table (vocab_size + 1 "
                          "rows) and one head per codebook; autolm does not resize them")  # fmt: skip

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, h) -> (B * K, T, vocab_size), transformers' layout."""
        logits = torch.stack([head(h) for head in self.lm_heads], dim=1)
        return logits.reshape(-1, *logits.shape[2:])

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, *args, return_dict=None, **kwargs):  # fmt: skip
        """CausalLM's forward over (batch * num_codebooks, seq_len) ids; encoder_hidden_states refused (no encoder
        runs); the loss as transformers' (see the module docstring)."""
        inputs_embeds, attention_mask = self.condition(input_ids, inputs_embeds, attention_mask, kwargs)
        input_ids = None if inputs_embeds is not None else input_ids
        if labels is not None and input_ids is None and inputs_embeds is None:
            raise GenerationError("MusicgenForCausalLM.forward: labels without input_ids: pass input_ids too")
        kwargs.pop("num_items_in_batch", None)  # transformers' loss here takes none
        out = super().forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, None,
                              use_cache, *args, return_dict=True, **kwargs)  # fmt: skip
        if labels is not None:
            out.loss = self.codebook_loss(out.logits, labels)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def condition(self, input_ids, inputs_embeds, attention_mask, kwargs: dict):
        """(inputs_embeds, attention_mask) for the conditioning inputs in kwargs: none here, where no encoder runs
        (refused by name)."""
        for key in ("encoder_outputs", "encoder_hidden_states", "encoder_attention_mask"):
            if kwargs.pop(key, None) is not None:
                raise GenerationError(f"{type(self).__name__}.forward: {key} given, but autolm runs MusicGen's "
                                      "decoder alone, without cross-attention: pass input_ids only")  # fmt: skip
        return inputs_embeds, attention_mask

    def codebook_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' loss: labels (B, T, K), pad_token_id ignored, the codebooks' cross-entropies averaged."""
        K = self.config.num_codebooks
        logits = logits.reshape(-1, K, *logits.shape[1:])[:, :, -labels.shape[1] :].float()
        labels = labels.to(logits.device).masked_fill(
            labels.to(logits.device) == self.config.pad_token_id, -100
        )
        total = sum(F.cross_entropy(logits[:, k].reshape(-1, logits.shape[-1]), labels[..., k].reshape(-1))
                    for k in range(K))  # fmt: skip
        return total / K

    generate = delay_pattern_generate


# ---- MusicGen Melody's decoder ----------------------------------------------------------------------------------


class MusicgenMelodyDecoderLayer(OPTDecoderLayer):
    """OPT's pre-norm layer without biases: no cross-attention."""


class MusicgenMelodyDecoder(MusicgenDecoder):
    layer_cls: ClassVar[type[nn.Module]] = MusicgenMelodyDecoderLayer


class MusicgenMelodyModel(OPTModel):
    """transformers' MusicgenMelodyModel, the module named `model`: it holds only the decoder."""

    _DELEGATED: ClassVar[tuple[str, ...]] = MusicgenModel._DELEGATED

    def __init__(self, config: MusicgenMelodyDecoderConfig):
        nn.Module.__init__(self)
        self.decoder = MusicgenMelodyDecoder(config)


class MusicgenMelodyForCausalLM(MusicgenForCausalLM):
    """transformers' MusicgenMelodyForCausalLM: conditioned by encoder_hidden_states (batch, S, hidden_size)
    prepended to the codebook embeddings (their mask, ones where none is given, before attention_mask's); the
    logits cover the S prepended positions too, as transformers'."""

    config_class = MusicgenMelodyDecoderConfig
    whole_prompt: ClassVar[bool] = True  # transformers' melody generate feeds the whole prompt first
    _no_split_modules: ClassVar[list[str]] = ["MusicgenMelodyDecoderLayer"]

    def __init__(self, config: MusicgenMelodyDecoderConfig):
        CausalLM.__init__(self, config, MusicgenMelodyModel(config))
        self._heads(config)

    def condition(self, input_ids, inputs_embeds, attention_mask, kwargs: dict):
        if kwargs.pop("encoder_outputs", None) is not None:
            raise GenerationError("MusicgenMelodyForCausalLM.forward: encoder_outputs given, but autolm runs no "
                                  "encoder: pass its states as encoder_hidden_states")  # fmt: skip
        states, states_mask = (
            kwargs.pop("encoder_hidden_states", None),
            kwargs.pop("encoder_attention_mask", None),
        )
        if states is None:
            return inputs_embeds, attention_mask
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if states_mask is not None and attention_mask is None:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        if attention_mask is not None:
            if states_mask is None:
                states_mask = torch.ones(
                    states.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device
                )
            attention_mask = torch.cat([states_mask.to(attention_mask.dtype), attention_mask], dim=1)
        return torch.cat([states.to(x.dtype), x], dim=1), attention_mask
