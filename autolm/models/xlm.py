"""XLM (transformers' XLMWithLMHeadModel): post-LN layers of multi-head attention (q_lin, k_lin, v_lin, out_lin)
and a 4x FFN (lin1 -> GELU or ReLU -> lin2), word + learned (or sinusoidal, filled once and stored) position +
language embeddings normed by layer_norm_emb, and pred_layer.proj (biased, tied to the word embeddings).

As transformers computes it:
- attention: `causal=True` a triangular mask over every slot, padding included (transformers ignores the
  attention_mask there: a padded slot's keys and values come from its zeroed hidden state); `causal=False`
  bidirectional, every query over the real slots only;
- the padding mask (attention_mask, else `lengths`, else the first "number of ids that are not pad_token_id"
  slots of each row, as transformers counts them) zeroes the hidden states after the embeddings and each layer;
- positions, where none are given, are the slots (0, 1, ...; padding included); `langs` (B, T) add their language
  embedding where n_langs > 1 and use_lang_emb (none added when absent); `token_type_ids` add their word embedding;
- generate() does what transformers' does (its prepare_inputs_for_generation): each step runs the WHOLE
  sequence again with `mask_token_id` appended, every `langs` = lang_id, no attention_mask and no positions,
  and the next token is read at the appended mask slot. autolm's generation keeps the sequence (an
  `XLMSequence` stands in for the KV cache) and recomputes it every step; beam search and speculative decoding
  are refused by name. The forward's KV cache (causal=True only) serves plain forwards.

Refused: `asm=True` (adaptive softmax: transformers' logits are its log-probabilities; autolm does not run it) and
`is_encoder=False` (transformers raises too). llama.cpp has no XLM: no GGUF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..config_fields import config_json_names
from ..errors import ConfigError, GenerationError
from ..nn import (
    ACTIVATIONS,
    Attention,
    CheckpointRules,
    Forward,
    Linear,
    Rename,
    Rotary,
    embedding,
    transformers_state_dict,
)
from .base import CausalLM, DecoderModel
from .output import CausalLMOutput

_NOT_XLM = ("intermediate_size", "num_key_value_heads", "head_dim", "sliding_window", "rope_parameters",
            "rope_theta", "rope_scaling", "hidden_act", "use_cache")  # fmt: skip


@dataclass(repr=False)
class XLMConfig(PretrainedConfig):
    """transformers' XLMConfig: config.json's names (emb_dim, n_layers, n_heads, layer_norm_eps) are attributes too.
    The FFN is 4 * emb_dim wide; gelu_activation picks GELU (exact) or ReLU. Dropouts, the init stds and the
    summary_* / start_n_top / end_n_top fields (other heads') change no inference and are kept as given."""

    model_type: ClassVar[str] = "xlm"
    attribute_map: ClassVar[dict[str, str]] = {"hidden_size": "emb_dim", "num_hidden_layers": "n_layers",
                                               "num_attention_heads": "n_heads", "rms_norm_eps": "layer_norm_eps"}  # fmt: skip
    activations: ClassVar[tuple[str, ...]] = ("gelu", "relu")
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "gelu_activation", "sinusoidal_embeddings",
                                              "causal", "asm", "use_lang_emb", "is_encoder")  # fmt: skip

    vocab_size: int = 30145
    hidden_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    gelu_activation: bool = True
    sinusoidal_embeddings: bool = False
    causal: bool = False
    asm: bool = False
    n_langs: int = 1
    use_lang_emb: bool = True
    max_position_embeddings: int = 512
    embed_init_std: float = 2048**-0.5
    rms_norm_eps: float = 1e-12
    init_std: float = 0.02
    unk_index: int = 3
    mask_index: int = 5
    is_encoder: bool = True
    summary_type: str = "first"
    summary_use_proj: bool = True
    summary_activation: str | None = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1
    start_n_top: int = 5
    end_n_top: int = 5
    mask_token_id: int | None = 0
    lang_id: int | None = 0
    pad_token_id: int | None = 2
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        h = self.hidden_size
        self.intermediate_size = 4 * h if _is_int(h) else h
        self.hidden_act = "gelu" if self.gelu_activation else "relu"
        self.num_key_value_heads = self.head_dim = None  # derived from n_heads and emb_dim
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = "|".join(self.attribute_map)
            raise ConfigError(re.sub(rf"\b({names})\b", lambda m: self.attribute_map[m[1]], str(e))) from None

    def validate(self) -> None:
        super().validate()
        if self.asm:
            raise ConfigError(f"{self.source}: asm=true (an adaptive log-softmax head) is not supported")
        if not self.is_encoder:
            raise ConfigError(f"{self.source}: is_encoder=false: transformers' XLM runs as an encoder only")
        if not (_is_int(self.n_langs) and self.n_langs > 0):
            raise ConfigError(f"{self.source}: n_langs must be a positive integer, found {self.n_langs!r}")
        for key in ("mask_token_id", "lang_id"):
            value = getattr(self, key)
            if value is not None and not _is_int(value):
                raise ConfigError(f"{self.source}: {key} must be an integer or null, found {value!r}")

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned (or stored sinusoidal) position embeddings

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_XLM:
            out.pop(key, None)
        return out


config_json_names(XLMConfig)


class XLMAttention(Attention):
    """transformers' MultiHeadAttention: q_lin, k_lin, v_lin, out_lin (biased), scores scaled by head_dim**-0.5."""

    def __init__(self, config: XLMConfig, layer_idx: int):
        n = config.num_attention_heads
        super().__init__(config.hidden_size, n, n, config.head_dim, layer_idx, bias=True, rope=None)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (
            Linear(hidden, hidden, bias=True) for _ in range(4)
        )

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_lin(x), self.k_lin(x), self.v_lin(x)

    @property
    def o_proj(self) -> Linear:
        return self.out_lin


class XLMFFN(nn.Module):
    def __init__(self, config: XLMConfig):
        super().__init__()
        self.lin1 = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.lin2 = Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class XLMLayer(nn.Module):
    """attention, layer_norm1 (post-LN), ffn, layer_norm2 (post-LN); the padding's states zeroed after (ctx.keep)."""

    def __init__(self, config: XLMConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.attention = XLMAttention(config, layer_idx)
        self.layer_norm1 = nn.LayerNorm(h, eps=eps)
        self.ffn = XLMFFN(config)
        self.layer_norm2 = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = self.layer_norm1(x + self.attention(x, ctx))
        x = self.layer_norm2(x + self.ffn(x))
        return torch.where(ctx.keep, x, 0.0)


class XLMModel(DecoderModel):
    """transformers' XLMModel: position_embeddings, lang_embeddings (n_langs > 1 and use_lang_emb), embeddings
    (the words'; autolm's embed_tokens), layer_norm_emb, layers (transformers' attentions / layer_norm1 / ffns /
    layer_norm2 lists, one module per layer here: checkpoint_rules)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "embeddings"}

    def __init__(self, config: XLMConfig):
        nn.Module.__init__(self)
        self.config = config
        h = config.hidden_size
        self.position_embeddings = embedding(config.max_position_embeddings, h)
        if config.n_langs > 1 and config.use_lang_emb:
            self.lang_embeddings = embedding(config.n_langs, h)
        self.embeddings = embedding(config.vocab_size, h)
        self.layer_norm_emb = nn.LayerNorm(h, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(XLMLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = None
        self.gradient_checkpointing = False
        self.rotary = Rotary({}, config.head_dim, config.max_position_embeddings, False)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        n = self.position_embeddings.num_embeddings
        if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
            raise GenerationError(f"position {int(position_ids.max())} is past the {n} position embeddings "
                                  "(max_position_embeddings): shorten the prompt or max_new_tokens")  # fmt: skip
        return self.layer_norm_emb(x + self.position_embeddings(position_ids))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x, attention_mask, position_ids, cache, cache_position, kv_length, hidden_states=None,
                attentions=None, block_ids=None):  # fmt: skip
        """attention_mask (B, >= kv_length): the padding mask whose slots' states are zeroed (always given here).
        causal: a triangular mask over every slot; else every query attends the real slots both ways."""
        keep = attention_mask[:, :kv_length].to(device=x.device, dtype=torch.bool)
        new = keep.index_select(1, cache_position)[..., None]  # (B, T, 1)
        x = torch.where(new, self.scale_inputs(x, position_ids), 0.0)
        if self.config.causal:
            ctx = Forward({}, cache, cache_position, kv_length, None, len(x), attentions)
        else:
            blocks = torch.zeros_like(
                keep, dtype=torch.long
            )  # one block of every slot, the padding masked out
            ctx = Forward({}, cache, cache_position, kv_length, keep.long(), len(x), attentions, blocks)
        ctx.keep = new
        return self.run(x, ctx, hidden_states)


class XLMSequence:
    """generate()'s state in place of a KV cache: the sequence so far, which XLM recomputes whole every step as
    transformers' generate does (see the module's doc; XLNet's state adds its mems)."""

    appends_only = True

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.ids: torch.Tensor | None = None
        self.prefill = None

    @property
    def length(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]

    @length.setter
    def length(self, value: int) -> None:  # the sequence's length is its ids'
        pass

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def ensure_for(self, model, batch_size: int, new_tokens: int) -> XLMSequence:
        if batch_size != self.batch_size:
            raise GenerationError(
                f"the {model.config.model_type} sequence holds {self.batch_size} rows, but input_ids has {batch_size}"
            )
        return self


_RULES = CheckpointRules([
    Rename(r"^transformer\.attentions\.(\d+)\.", r"transformer.layers.\1.attention.",
           r"^transformer\.layers\.(\d+)\.attention\.", r"transformer.attentions.\1."),
    Rename(r"^transformer\.ffns\.(\d+)\.", r"transformer.layers.\1.ffn.",
           r"^transformer\.layers\.(\d+)\.ffn\.", r"transformer.ffns.\1."),
    Rename(r"^transformer\.layer_norm([12])\.(\d+)\.", r"transformer.layers.\2.layer_norm\1.",
           r"^transformer\.layers\.(\d+)\.layer_norm([12])\.", r"transformer.layer_norm\2.\1."),
    Rename(r"^pred_layer\.proj\.", "lm_head.", r"^lm_head\.", "pred_layer.proj."),
])  # fmt: skip


class XLMWithLMHeadModel(CausalLM):
    """transformers' XLMWithLMHeadModel: the body `transformer`, the head pred_layer.proj (autolm's lm_head)."""

    config_class = XLMConfig
    base_model_prefix = "transformer"
    layers_prefix = "transformer.layers"
    embeddings_name = "transformer.embeddings"
    checkpoint_rules = _RULES
    one_token_step: ClassVar[bool] = False  # generation recomputes the sequence (see the module's doc)
    unservable: ClassVar[str] = (
        "its generation recomputes the whole sequence at each token (no KV cache to batch)"
    )
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan
    _no_split_modules: ClassVar[list[str]] = []

    def __init__(self, config: XLMConfig):
        super().__init__(config, XLMModel(config))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)
        transformers_state_dict(self)  # state_dict() in transformers' names

    @property
    def model(self) -> XLMModel:
        return self.transformer

    def adapter_key(self, key: str) -> str:
        """An adapter tensor's name in peft's file: transformers' module names."""
        return self.checkpoint_rules._back(key)

    def blocks(self) -> list[str]:
        body = self.model
        top = [f"transformer.{n}" for n in ("position_embeddings", "lang_embeddings", "embeddings",
                                            "layer_norm_emb") if hasattr(body, n)]  # fmt: skip
        return [*top, *(f"transformer.layers.{i}" for i in range(len(body.layers))), "lm_head"]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, *args, langs=None, token_type_ids=None, lengths=None, **kwargs):  # fmt: skip
        """CausalLM's forward with transformers' XLM inputs (see the module's doc); with an XLMSequence (generate)
        the sequence grows by input_ids and is recomputed whole with the mask token appended."""
        if kwargs.pop("cache", None) is not None:
            raise GenerationError("XLMWithLMHeadModel.forward: `cache` (transformers' XLM cache) is not taken; "
                                  "pass past_key_values")  # fmt: skip
        if isinstance(past_key_values, XLMSequence):
            return self._sequence_step(input_ids, past_key_values, kwargs)
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = self._padding(input_ids, lengths, B, T, past, x.device)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).unsqueeze(0).expand(B, -1)
        if langs is not None and hasattr(self.model, "lang_embeddings"):
            x = x + self.model.lang_embeddings(langs)
        if token_type_ids is not None:
            x = x + self.model.embeddings(token_type_ids)
        return super().forward(None, attention_mask, position_ids, past_key_values, x, *args, **kwargs)

    def _padding(self, input_ids, lengths, B: int, T: int, past: int, device) -> torch.Tensor:
        """transformers' padding mask without attention_mask: each row's first `lengths` slots (by default as many
        as its ids that are not pad_token_id); every slot for inputs_embeds."""
        if lengths is None:
            if input_ids is None or self.config.pad_token_id is None:
                return torch.ones(B, past + T, dtype=torch.long, device=device)
            lengths = input_ids.ne(self.config.pad_token_id).sum(-1) + past
        slots = torch.arange(past + T, device=device)
        return (slots[None] < lengths.to(device)[:, None]).long()

    def _sequence_step(self, input_ids, seq: XLMSequence, kwargs: dict):
        """generate()'s step: input_ids appended to the sequence, then the whole of it with mask_token_id
        appended, every langs lang_id, no mask and no positions; the logits of the last T slots (the mask's
        last)."""
        if input_ids is None:
            raise GenerationError("XLM's generation needs input_ids (inputs_embeds are not taken)")
        seq.ids = input_ids if seq.ids is None else torch.cat([seq.ids, input_ids.to(seq.ids.device)], 1)
        cfg = self.config
        full = torch.cat([seq.ids, seq.ids.new_full((len(seq.ids), 1), cfg.mask_token_id)], 1)
        langs = None if cfg.lang_id is None else torch.full_like(full, cfg.lang_id)
        keep = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if k in kwargs}
        out = self.forward(full, langs=langs, use_cache=False, **keep)
        T, n = input_ids.shape[1], kwargs.get("logits_to_keep", 0)
        logits = out.logits[:, -T:]
        return CausalLMOutput(None, logits[:, -n:] if n else logits, seq, out.hidden_states, out.attentions)

    def forward_cache(self, past_key_values, use_cache, B: int, T: int):
        """CausalLM's (a KV cache) where causal; none for a bidirectional model (transformers keeps none usable)."""
        if self.config.causal:
            if past_key_values is None and (self.config.use_cache and not self.training if use_cache is None
                                            else use_cache):  # fmt: skip
                return CausalLM.make_cache(self, B, T)
            return super().forward_cache(past_key_values, False, B, T)
        if past_key_values is not None:
            raise GenerationError("XLMWithLMHeadModel: past_key_values given, but the config's causal is false "
                                  "(bidirectional attention, no cache)")  # fmt: skip
        return None

    def make_cache(self, batch_size: int, capacity: int) -> XLMSequence:
        """generate()'s state: the sequence, recomputed each step (see the module's doc)."""
        return XLMSequence(batch_size)

    def generate(self, *args, **kwargs):
        """GenerationMixin's, as transformers' XLM generates (see the module's doc); beam search and speculative
        decoding refused."""
        if (kwargs.get("num_beams") or 1) > 1:
            raise GenerationError("XLMWithLMHeadModel.generate: num_beams > 1 is not supported (XLM recomputes "
                                  "its sequence every step; autolm's beam search keeps a KV cache)")  # fmt: skip
        for key in ("assistant_model", "prompt_lookup_num_tokens", "past_key_values", "inputs_embeds"):
            if kwargs.get(key) is not None:
                raise GenerationError(f"XLMWithLMHeadModel.generate: {key} is not supported (XLM recomputes its "
                                      "sequence every step)")  # fmt: skip
        return super().generate(*args, **kwargs)

    def precompile_decode(self, progress: bool = False, batched: bool = False) -> bool:
        return False  # no one-token step: generation recomputes the sequence
