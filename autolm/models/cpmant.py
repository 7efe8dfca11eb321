"""CPM-Ant (OpenBMB's CPM-Ant 10B, transformers' CpmAntForCausalLM).

Each forward without a cache prepends `prompt_length` learned prompt tokens (ids vocab_size + 2 * prompt_length
onwards: the third prompt type's rows of `input_embedding`, which holds vocab_size + prompt_types *
prompt_length rows) to the text. Every token gets a segment embedding: 0 for the prompt and for id 0 (padding),
2 for the text. Attention has no RoPE: each head's scores get a learned bias (`position_bias`), indexed by a
bidirectional bucket of the key's position minus the query's between tokens of one segment, by the pair of
segments otherwise (prompt <-> text). Pre-norm blocks (`self_att`, then `ffn`: gelu(w_0 x) * w_1 x, then w_out)
with CPM-Ant's RMS layer norm, a final `output_layernorm`; the LM head (untied, whatever tie_word_embeddings
says, as transformers') reads the text positions only.

Attention is not causal: the tokens of one forward see each other both ways (and every cached token); padding
(attention_mask, or transformers' id 0 where none is given) is masked both ways. So a prompt's states depend on
the whole prompt: transformers' generate runs the prompt in one forward, then one token at a time, each seeing
everything before it, and so does autolm's. The cache keeps the text's keys and values in its slots and the
prompt tokens' as each layer's state (they depend on the whole first forward: the cache cannot go back into it,
as a recurrent one). No one-token or compiled step: the bias is no ALiBi (the steps' kernels take ALiBi only)
and the prompt's keys sit outside the cache's slots; every token takes the general forward.

transformers' quirks kept: the loss is cross-entropy of the logits against the labels as given (no shift);
position_ids are ignored (positions are slots); config.tie_word_embeddings reads False (config.json keeps the
value). Where autolm differs: transformers ignores attention_mask and takes every id 0 for padding (a row's real
tokens: its last count(ids != 0) slots; segment 0), so a real id 0 inside a row shifts its mask there, and a
cached forward of several tokens adds the last one's segment embedding to all; autolm follows attention_mask
and each token's own segment (the same on batches left-padded with 0 and on generation). Speculative decoding
and the server's chunked prefill feed several tokens per forward, which see each other both ways: other values
than one token at a time (as transformers'). llama.cpp has no CPM-Ant: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError, GenerationError
from ..nn import embedding
from .base import CausalLM
from .cpmant_layers import CpmAntContext, CpmAntEncoder, CpmAntSegmentPositionEmbedding
from .interop import device_map_of
from .output import CausalLMOutput
from .xglm import accept_json_names, check_fractions

# autolm's common fields that CpmAntConfig does not have: never written to config.json
_NOT_WRITTEN = ("num_key_value_heads", "sliding_window", "rope_parameters", "rope_theta", "rope_scaling",
                "max_position_embeddings", "hidden_act", "attention_dropout")  # fmt: skip
_TEXT_SEGMENT = 2  # transformers' segment of a text token (id != 0)


@dataclass(repr=False)
class CpmAntConfig(PretrainedConfig):
    """transformers' CpmAntConfig: config.json's dim_head, dim_ff and eps are head_dim, intermediate_size and
    rms_norm_eps (attributes under both names). The gated FFN's activation is exact GeLU (no field for it)."""

    model_type: ClassVar[str] = "cpmant"
    attribute_map: ClassVar[dict[str, str]] = {
        "head_dim": "dim_head",
        "intermediate_size": "dim_ff",
        "rms_norm_eps": "eps",
    }
    activations: ClassVar[tuple[str, ...]] = ("gelu",)
    # transformers' CpmAntConfig has no such fields: written only where set
    absent_keys: ClassVar[tuple[str, ...]] = ("bos_token_id", "eos_token_id", "pad_token_id")

    vocab_size: int = 30720
    hidden_size: int = 4096
    num_attention_heads: int = 32
    head_dim: int | None = 128
    intermediate_size: int = 10240
    num_hidden_layers: int = 48
    dropout_p: float = 0.0
    position_bias_num_buckets: int = 512
    position_bias_max_distance: int = 2048
    rms_norm_eps: float = 1e-6
    init_std: float = 1.0
    prompt_types: int = 32
    prompt_length: int = 32
    segment_types: int = 32
    use_cache: bool = True
    tie_word_embeddings: bool = True  # as transformers' (which ties nothing: the head is its own)
    hidden_act: str = "gelu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # transformers writes tie_word_embeddings and ties nothing (its head is its own): autolm's loading and
        # saving read the attribute, which says False; config.json keeps the value given
        self.declared_tie_word_embeddings, self.tie_word_embeddings = self.tie_word_embeddings, False

    def validate(self) -> None:
        super().validate()
        check_fractions(self, ("dropout_p",))
        src = self.source
        least = {"position_bias_num_buckets": 4, "position_bias_max_distance": 1, "prompt_length": 1,
                 "prompt_types": 3, "segment_types": _TEXT_SEGMENT + 1}  # fmt: skip
        why = {
            "prompt_types": " (the prompt tokens are the third type's)",
            "segment_types": " (text is segment 2)",
        }
        for name, low in least.items():
            v = getattr(self, name)
            if not (_is_int(v) and v >= low):
                raise ConfigError(
                    f"{src}: {name} must be an integer of at least {low}{why.get(name, '')}, found {v!r}"
                )
        if self.position_bias_max_distance <= self.position_bias_num_buckets // 4:
            raise ConfigError(
                f"{src}: position_bias_max_distance ({self.position_bias_max_distance}) must exceed a quarter of "
                f"position_bias_num_buckets ({self.position_bias_num_buckets}): the exact buckets' range"
            )
        if not _is_number(self.init_std):
            raise ConfigError(f"{src}: init_std must be a number, found {self.init_std!r}")

    @property
    def embedding_rows(self) -> int:
        """input_embedding's rows: the vocabulary, then prompt_length rows for each prompt type."""
        return self.vocab_size + self.prompt_types * self.prompt_length

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # a learned relative position bias, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_WRITTEN:
            out.pop(key, None)
        out["tie_word_embeddings"] = getattr(self, "declared_tie_word_embeddings", self.tie_word_embeddings)
        return out


accept_json_names(CpmAntConfig)


class CpmAntModel(nn.Module):
    """encoder (layers, output_layernorm), segment_embedding, input_embedding, position_bias; `embed_tokens`,
    `layers` and `norm` name the input embedding, the layers and the final norm for autolm's code."""

    def __init__(self, config: CpmAntConfig):
        super().__init__()
        self.config = config
        self.encoder = CpmAntEncoder(config)
        self.segment_embedding = embedding(config.segment_types, config.hidden_size)
        self.input_embedding = embedding(config.embedding_rows, config.hidden_size)
        self.position_bias = CpmAntSegmentPositionEmbedding(config)
        self.gradient_checkpointing = False

    embed_tokens = property(lambda self: self.input_embedding)
    layers = property(lambda self: self.encoder.layers)
    norm = property(lambda self: self.encoder.output_layernorm)

    def context(self, input_ids, attention_mask, cache, x_dtype, attentions) -> CpmAntContext:
        """The mask and bias of this forward: the prompt (on the first forward) and the new text tokens as
        queries; the prompt, the cached text and the new text as keys."""
        c, (B, T), device = self.config, input_ids.shape, input_ids.device
        P, past = c.prompt_length, (cache.length if cache is not None else 0)
        segment = torch.where(input_ids != 0, _TEXT_SEGMENT, 0)
        if attention_mask is not None:
            real = attention_mask[:, : past + T].to(device).bool()
        elif past:  # no mask: the cached tokens were all real
            real = torch.cat([segment.new_ones(B, past).bool(), input_ids != 0], 1)
        else:  # transformers': the last (number of ids != 0) slots of each row are real
            real = torch.arange(T - 1, -1, -1, device=device)[None] < (input_ids != 0).sum(-1, keepdim=True)
        prompt = torch.ones(B, P, dtype=torch.bool, device=device)
        key_real = torch.cat([prompt, real], 1)
        key_segment = torch.cat(
            [segment.new_zeros(B, P), segment.new_full((B, past), _TEXT_SEGMENT), segment], 1
        )
        query_real, query_segment, first = real[:, past:], segment, past == 0
        if first:
            query_real, query_segment = key_real, key_segment
        keys = torch.arange(P + past + T, device=device)
        mask = (query_real[:, :, None] & key_real[:, None, :])[:, None]
        bias = self.position_bias(keys[-query_segment.shape[1] :], keys, query_segment, key_segment).to(
            x_dtype
        )
        slots = torch.arange(past, past + T, device=device)
        return CpmAntContext(cache, slots, past + T, P, first, mask, bias, c.dropout_p, attentions)

    def forward(self, input_ids, attention_mask, cache, hidden_states=None, attentions=None) -> torch.Tensor:
        """Token ids (B, T) -> the normed states of the text tokens (B, T, h); each layer's input (and the
        output) appended to `hidden_states`, the probabilities to `attentions`, where given (the prompt's rows
        and columns dropped on the first forward, as transformers)."""
        c, B = self.config, input_ids.shape[0]
        P = c.prompt_length
        segment = torch.where(input_ids != 0, _TEXT_SEGMENT, 0)
        ctx = self.context(input_ids, attention_mask, cache, self.input_embedding.weight.dtype, attentions)
        ids = input_ids
        if ctx.first:
            start = c.vocab_size + 2 * P
            prompt = torch.arange(start, start + P, device=ids.device)[None].expand(B, -1)
            ids, segment = torch.cat([prompt, ids], 1), torch.cat([segment.new_zeros(B, P), segment], 1)
        if cache is not None:
            cache.reserve(ctx.kv_length)
        x = self.input_embedding(ids) + self.segment_embedding(segment)
        drop = P if ctx.first else 0
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x[:, drop:])
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        x = self.norm(x)[:, drop:]
        if hidden_states is not None:
            hidden_states.append(x)
        if attentions is not None and drop:
            attentions[:] = [a[:, :, drop:, drop:] for a in attentions]
        if cache is not None:
            cache.length = ctx.kv_length
        return x


class CpmAntForCausalLM(CausalLM):
    """transformers' CpmAntForCausalLM: the body `cpmant`, an untied `lm_head` over the vocabulary."""

    config_class = CpmAntConfig
    base_model_prefix: ClassVar[str] = "cpmant"
    layers_prefix: ClassVar[str] = "cpmant.encoder.layers"
    embeddings_name: ClassVar[str] = "cpmant.input_embedding"
    one_token_step: ClassVar[bool] = False  # the bias is no ALiBi; the prompt's keys are outside the slots
    compiled_graphs: ClassVar[bool] = False
    recurrent: ClassVar[bool] = True  # the prompt's keys and values (the cache's states): the first forward's
    # a forward's new tokens attend each other both ways: tokens verified together are not tokens decoded one by one
    bidirectional_forward: ClassVar[bool] = True
    tp_patterns: ClassVar[dict[str, str]] = {}  # transformers has no tensor-parallel plan for CPM-Ant
    _no_split_modules: ClassVar[list[str]] = ["CpmAntTransformerBlock"]

    def __init__(self, config: CpmAntConfig):
        super().__init__(config, CpmAntModel(config))

    @property
    def model(self) -> CpmAntModel:
        """The body (`cpmant`), by the name autolm's code uses in every family."""
        return self.cpmant

    def tie_weights(self) -> None:
        """Nothing: the head is its own whatever tie_word_embeddings says (transformers ties no CPM-Ant weight)."""

    def blocks(self) -> list[str]:
        body = [f"cpmant.{n}" for n in ("input_embedding", "segment_embedding", "position_bias")]
        layers = [f"{self.layers_prefix}.{i}" for i in range(len(self.model.layers))]
        return [*body, *layers, "cpmant.encoder.output_layernorm", "lm_head"]

    @property
    def device(self) -> torch.device:
        device_map = device_map_of(self)
        if device_map:
            d = device_map[self.embeddings_name]
            return torch.device("cpu" if d == "disk" else d)
        return self.model.input_embedding.weight.device

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        raise ConfigError(
            "resize_token_embeddings: CPM-Ant's input_embedding holds the prompt tokens' rows after vocab_size; "
            "resizing the vocabulary is not supported"
        )

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep=0,
                output_hidden_states=None, output_attentions=None, return_dict=None, **unused):  # fmt: skip
        """CausalLM's forward; the loss as transformers': cross-entropy of each position's logits against its
        label as given (no shift), -100 ignored."""
        unused.pop("num_items_in_batch", None)  # transformers' CPM-Ant loss takes none
        out: CausalLMOutput = super().forward(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, None, use_cache,
            cache_position, logits_to_keep, output_hidden_states, output_attentions, True, **unused,
        )  # fmt: skip
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def decoder_states(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                       cache_position, output_hidden_states, output_attentions, *rest):  # fmt: skip
        """The body over the new tokens (position_ids and cache_position unused: CPM-Ant's positions are the
        cache's slots)."""
        if inputs_embeds is not None or input_ids is None:
            raise GenerationError("CPM-Ant takes input_ids only (its segments read them): not inputs_embeds")
        cache = self.forward_cache(past_key_values, use_cache, *input_ids.shape)
        hidden, attentions = self.layer_lists(output_hidden_states, output_attentions)
        h = self.model(input_ids, attention_mask, cache, hidden, attentions)
        hidden, attentions = (tuple(a) if a is not None else None for a in (hidden, attentions))
        return h, cache, hidden, attentions
