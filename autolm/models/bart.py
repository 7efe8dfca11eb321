"""The decoders of the BART-style encoder-decoders as causal LMs (transformers' *ForCausalLM): BART, mBART, Marian,
Pegasus, Blenderbot, Blenderbot-Small, PLBart, MVP, TrOCR's text decoder, Whisper's decoder (WhisperForCausalLM,
the assistant model of Whisper's speculative decoding) and BigBird-Pegasus' decoder (full attention: BigBird's
block-sparse attention is its encoder's). One decoder covers them all:

- token embeddings times sqrt(d_model) where `scale_embedding`;
- positions: learned, read two rows on (BART, mBART, PLBart, MVP, TrOCR) or not (Blenderbot, Blenderbot-Small,
  Whisper, BigBird-Pegasus);
  a fixed sinusoidal table in the weights (Marian, Pegasus: sines of the even features then cosines of the odd,
  computed where a seq2seq file leaves it out); or, for TrOCR without learned positions, fairseq's sinusoids
  counted over the ids that are not pad_token_id (XGLM's table, the row at pad_token_id zero);
- `layernorm_embedding` after the positions are added (BART, mBART, PLBart, MVP, TrOCR where set), on the token
  embeddings alone before (Blenderbot-Small), or none (Marian, Pegasus, Blenderbot, Whisper);
- OPT's layer with biases (Whisper's k_proj has none; BigBird-Pegasus' attentions have them where use_bias):
  post-norm (BART, Marian, Blenderbot-Small, PLBart, MVP, TrOCR) or pre-norm with a final `layer_norm` (mBART,
  Pegasus, Blenderbot, Whisper; BigBird-Pegasus names its final norm `layernorm_embedding`, none on the embeddings);
- every layer's cross-attention (`encoder_attn`, `encoder_attn_layer_norm`) loads and saves but never runs: autolm
  runs no encoder and refuses encoder_hidden_states (and Whisper's encoder_outputs);
- the head tied to embed_tokens unless the config unties it (TrOCR's is `output_projection` on disk, Whisper's
  `proj_out`); BigBird-Pegasus' head is never tied (transformers' BigBirdPegasusForCausalLM ties none).

As transformers: positions count the cache's slots, padding included (position_ids are not read; TrOCR's
sinusoids count the non-pad ids of each forward plus the cached length). transformers' Whisper decoder reads
position_ids where a caller passes them to forward (its generate never does): autolm counts slots there too. The
loss compares each position's logits with its label as given (no shift). MVP's CausalLM has no prompts (use_prompt is not read by it).
A seq2seq file (…ForConditionalGeneration, MarianMTModel) loads as transformers' *ForCausalLM reads it, the encoder,
the prompts and final_logits_bias skipped, with `model.shared` as the decoder's embeddings where the file does not
hold them apart. llama.cpp has no BART-style decoder LM (its encoder-decoders are T5's): no GGUF.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenerationError
from ..nn import CheckpointRules, Ignored, Linear, Rename, embedding
from .bart_config import (
    BartConfig,
    BigBirdPegasusConfig,
    BlenderbotConfig,
    BlenderbotSmallConfig,
    MarianConfig,
    MBartConfig,
    MvpConfig,
    PegasusConfig,
    PLBartConfig,
    TrOCRConfig,
    WhisperConfig,
)
from .base import CausalLM, DecoderModel
from .opt import OPTDecoderLayer, OPTForCausalLM, OPTModel
from .xglm import sinusoidal_positions


def sinusoid_table(rows: int, dim: int) -> torch.Tensor:
    """Marian's and Pegasus' fixed table (rows, dim) in float32: pos / 10000 ** (2 * (j // 2) / dim) in float64,
    sines of the even features j in the first ceil(dim / 2) columns, cosines of the odd ones after."""
    pos = torch.arange(rows, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64)
    angles = pos / torch.pow(
        torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / dim
    )
    return torch.cat([torch.sin(angles[:, 0::2]), torch.cos(angles[:, 1::2])], dim=1).float()


class CrossAttention(nn.Module):
    """A layer's encoder attention (transformers' `encoder_attn`: k/v read the encoder's features). Its weights load
    and save with the layer; autolm runs no encoder, so it never runs."""

    def __init__(self, hidden: int, encoder_hidden: int, key_bias: bool = True, bias: bool = True):
        super().__init__()
        self.k_proj = Linear(encoder_hidden, hidden, bias=key_bias and bias)
        self.v_proj = Linear(encoder_hidden, hidden, bias=bias)
        self.q_proj = Linear(hidden, hidden, bias=bias)
        self.out_proj = Linear(hidden, hidden, bias=bias)


class BartDecoderLayer(OPTDecoderLayer):
    """OPT's layer (self_attn, self_attn_layer_norm, fc1 -> act -> fc2, final_layer_norm; pre- or post-norm) with
    the cross-attention's modules beside it, in transformers' order."""

    def __init__(self, config: BartConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h = config.hidden_size
        width, bias = getattr(config, "cross_attention_hidden_size", None) or h, config.attention_bias
        cross = CrossAttention(h, width, config.key_bias, bias)
        # Whisper: k_proj without bias; BigBird-Pegasus with use_bias false: none biased (each stays in its place)
        unbiased = (
            ("q_proj", "k_proj", "v_proj", "out_proj") if not bias else () if config.key_bias else ("k_proj",)
        )
        for name in unbiased:
            setattr(self.self_attn, name, Linear(h, h, bias=False))
        norm = nn.LayerNorm(h, eps=config.rms_norm_eps)
        order = ("self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")
        rest = {k: v for k, v in self._modules.items() if k not in order}
        self._modules = {**{k: self._modules[k] for k in order[:2]}, "encoder_attn": cross,
                         "encoder_attn_layer_norm": norm, **{k: self._modules[k] for k in order[2:]}, **rest}  # fmt: skip


class BartDecoder(DecoderModel):
    """embed_tokens, embed_positions (none for TrOCR's computed sinusoids), layernorm_embedding (or none), layers,
    layer_norm (pre-norm types; `norm` names it)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "layer_norm"}
    slot_positions: ClassVar[bool] = True  # the one-token step embeds the slot's position (autolm.step)

    def __init__(self, config: BartConfig):
        h, eps = config.hidden_size, config.rms_norm_eps
        final = nn.LayerNorm(h, eps=eps) if config.do_layer_norm_before else None
        super().__init__(config, BartDecoderLayer, final)
        self.embed_scale = math.sqrt(h) if config.scale_embedding and config.embed_scaling != "none" else 1.0
        kind, rows = config.position_kind, config.max_position_embeddings + config.position_offset
        self.embed_positions = None if kind == "fairseq" else embedding(rows, h)
        if kind == "table":
            self.embed_positions.weight.requires_grad_(False)
            if self.embed_positions.weight.device.type != "meta":
                with torch.no_grad():
                    self.embed_positions.weight.copy_(sinusoid_table(rows, h))
        if config.final_norm_name != "layernorm_embedding":  # BigBird-Pegasus' final norm is named so
            self.layernorm_embedding = nn.LayerNorm(h, eps=eps) if config.embedding_norm else None
        order = ("embed_tokens", "embed_positions", "layernorm_embedding", "layers", "layer_norm")
        if config.final_norm_name == "layernorm_embedding":
            order = ("embed_tokens", "embed_positions", "layers", "layernorm_embedding")
        self._modules = {k: self._modules[k] for k in order if k in self._modules}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings, times sqrt(d_model) where scale_embedding scales the ids' embeddings alone."""
        scaled = self.config.embed_scaling == "ids"
        return self.embed_tokens(input_ids) * self.embed_scale if scaled else self.embed_tokens(input_ids)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input vectors plus their positions' embeddings (layernorm_embedding before or after, where the type
        has one). position_ids: cache slots (TrOCR's sinusoids: fairseq's rows less 2, see decoder_states)."""
        cfg = self.config
        if cfg.embed_scaling == "inputs":  # Marian's and Pegasus' decoders scale inputs_embeds given too
            x = x * self.embed_scale
        if cfg.position_kind == "fairseq":
            pos = sinusoidal_positions(position_ids, x.shape[-1], cfg.pad_token_id).to(x.dtype)
        else:
            n = self.embed_positions.num_embeddings - cfg.position_offset
            if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
                key = cfg.attribute_map.get("max_position_embeddings", "max_position_embeddings")
                raise GenerationError(f"position {int(position_ids.max())} is past the {n} positions of "
                                      f"{cfg.model_type}'s table ({key}): shorten the prompt or max_new_tokens")  # fmt: skip
            pos = self.embed_positions(position_ids + cfg.position_offset)
        if cfg.embedding_norm == "before":
            return self.layernorm_embedding(x) + pos
        x = x + pos
        return x if cfg.embedding_norm is None else self.layernorm_embedding(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm is None else self.norm(x)

    def forward(self, x, attention_mask, position_ids, cache, cache_position, kv_length, *rest, **kwargs):
        """DecoderModel's forward; positions are the cache's slots, padding included, as transformers counts them
        (TrOCR's sinusoids: the positions decoder_states counted)."""
        if self.config.position_kind != "fairseq":
            position_ids = cache_position.to(x.device).unsqueeze(0).expand(len(x), -1)
        return super().forward(
            x, attention_mask, position_ids, cache, cache_position, kv_length, *rest, **kwargs
        )


class BartDecoderWrapper(OPTModel):
    """transformers' *DecoderWrapper, the module named `model`: it holds only the decoder and answers for it."""

    _DELEGATED: ClassVar[tuple[str, ...]] = ("embed_tokens", "embed_positions", "layernorm_embedding", "layers",
                                             "norm", "layer_norm", "gradient_checkpointing")  # fmt: skip

    def __init__(self, config: BartConfig, decoder_class: type = BartDecoder):
        nn.Module.__init__(self)
        self.decoder = decoder_class(config)


# a seq2seq file read as transformers' *ForCausalLM reads it: its decoder; model.shared as the decoder's embeddings
# where the file has no copy of its own; the encoder, MVP's prompts and final_logits_bias skipped
SEQ2SEQ_RULES = [
    Rename(r"^model\.shared\.weight$", "model.decoder.embed_tokens.weight", r"(?!)", ""),
    Ignored(r"model\.encoder\..*"),
    Ignored(r"final_logits_bias"),
    Ignored(r"model\.decoder\.(self_attn|cross_attn)_prompt\..*"),
]


class BartForCausalLM(CausalLM):
    """transformers' BartForCausalLM (and, by its config class, the other types' *ForCausalLM): the head tied to
    embed_tokens unless the config unties it."""

    config_class = BartConfig
    # transformers' other heads for these types (QA, classification, the base model) are encoder-decoders
    causal_only: ClassVar[str] = "an encoder-decoder"
    # learned positions at the cache's slots: served rows run alone (serve.rows)
    rows_apart: ClassVar[bool] = True
    layers_prefix = "model.decoder.layers"
    embeddings_name = "model.decoder.embed_tokens"
    tp_patterns: ClassVar[
        dict[str, str]
    ] = {}  # none: transformers declares no tensor-parallel plan for these
    _no_split_modules: ClassVar[list[str]] = ["BartDecoderLayer"]
    checkpoint_rules = CheckpointRules(SEQ2SEQ_RULES)
    blocks = OPTForCausalLM.blocks
    decoder_class: ClassVar[type] = BartDecoder

    def __init__(self, config: BartConfig):
        super().__init__(config, BartDecoderWrapper(config, self.decoder_class))
        if config.position_kind == "fairseq":
            self.one_token_step = False  # the positions count the ids: every token takes the general forward

    @property
    def new_if_missing(self) -> tuple[str, ...]:
        """Marian's and Pegasus' fixed table, which their seq2seq files leave out."""
        return ("model.decoder.embed_positions.weight",) if self.config.position_kind == "table" else ()

    def init_new(self, names: list[str]) -> str:
        decoder = self.model.decoder
        w, device = decoder.embed_positions.weight, decoder.embed_tokens.weight.device
        table = sinusoid_table(*w.shape).to(device=device, dtype=w.dtype)
        decoder.embed_positions.weight = nn.Parameter(table, requires_grad=False)
        return "computed the sinusoidal position table (model.decoder.embed_positions.weight)"

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, *args, return_dict=None, **kwargs):  # fmt: skip
        """CausalLM's forward (encoder_hidden_states refused: no encoder runs); the loss as transformers': each
        position's logits against its label as given (no shift), -100 ignored."""
        for key in ("encoder_outputs", "encoder_hidden_states", "encoder_attention_mask"):
            if kwargs.pop(key, None) is not None:
                raise GenerationError(f"{type(self).__name__}.forward: {key} given, but autolm runs the decoder "
                                      "alone, without cross-attention: pass input_ids (or inputs_embeds) only")  # fmt: skip
        kwargs.pop("num_items_in_batch", None)  # transformers' loss here takes none
        out = super().forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, None, *args,
                              return_dict=True, **kwargs)  # fmt: skip
        if labels is not None:
            logits = out.logits.float()
            out.loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.to(logits.device).reshape(-1)
            )
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def decoder_states(self, input_ids, attention_mask, position_ids, past_key_values, *rest):
        """CausalLM's; TrOCR's sinusoids are counted as transformers counts them: each non-pad id's count among
        this forward's non-pad ids plus the cached length, past pad_token_id (pad ids: pad_token_id's zero row)."""
        if self.config.position_kind == "fairseq":
            if input_ids is None:
                raise GenerationError("TrOCR's sinusoidal positions count the input_ids that are not pad_token_id: "
                                      "pass input_ids, not inputs_embeds")  # fmt: skip
            past = past_key_values.length if past_key_values is not None else 0
            real = input_ids.ne(self.config.pad_token_id).long()
            position_ids = (
                (real.cumsum(-1) + past) * real + self.config.pad_token_id - 2
            )  # xglm's rows less 2
        return super().decoder_states(input_ids, attention_mask, position_ids, past_key_values, *rest)


def _causal_lm(config_cls: type, name: str) -> type:
    """The type's *ForCausalLM: BartForCausalLM over its config class."""
    return type(name, (BartForCausalLM,), {"config_class": config_cls, "__doc__": f"transformers' {name}.",
                                           "_no_split_modules": [name.replace("ForCausalLM", "DecoderLayer")]})  # fmt: skip


MBartForCausalLM = _causal_lm(MBartConfig, "MBartForCausalLM")
PLBartForCausalLM = _causal_lm(PLBartConfig, "PLBartForCausalLM")
MvpForCausalLM = _causal_lm(MvpConfig, "MvpForCausalLM")
MarianForCausalLM = _causal_lm(MarianConfig, "MarianForCausalLM")
PegasusForCausalLM = _causal_lm(PegasusConfig, "PegasusForCausalLM")
BlenderbotForCausalLM = _causal_lm(BlenderbotConfig, "BlenderbotForCausalLM")
BlenderbotSmallForCausalLM = _causal_lm(BlenderbotSmallConfig, "BlenderbotSmallForCausalLM")


class TrOCRForCausalLM(BartForCausalLM):
    """transformers' TrOCRForCausalLM: the head is `output_projection` in transformers and on disk, `lm_head` in
    autolm's model (renamed while loading and back while saving, as BioGPT's)."""

    config_class = TrOCRConfig
    _no_split_modules: ClassVar[list[str]] = ["TrOCRDecoderLayer"]
    checkpoint_rules = CheckpointRules(
        [*SEQ2SEQ_RULES, Rename(r"^output_projection\.", "lm_head.", r"^lm_head\.", "output_projection.")]
    )


class WhisperForCausalLM(BartForCausalLM):
    """transformers' WhisperForCausalLM (Whisper's decoder alone): the head is `proj_out` in transformers and on
    disk, `lm_head` in autolm's model. A WhisperForConditionalGeneration file loads too, its encoder skipped."""

    config_class = WhisperConfig
    _no_split_modules: ClassVar[list[str]] = ["WhisperDecoderLayer"]
    checkpoint_rules = CheckpointRules(
        [*SEQ2SEQ_RULES, Rename(r"^proj_out\.", "lm_head.", r"^lm_head\.", "proj_out.")]
    )


class BigBirdPegasusDecoder(BartDecoder):
    """BigBird-Pegasus' decoder: its final norm (after the pre-norm layers) is named `layernorm_embedding`."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "layernorm_embedding"}


class BigBirdPegasusForCausalLM(BartForCausalLM):
    """transformers' BigBirdPegasusForCausalLM (BigBird-Pegasus' decoder alone: full attention, the encoder's
    block-sparse attention not part of it): the head its own, never tied (transformers ties none)."""

    config_class = BigBirdPegasusConfig
    _no_split_modules: ClassVar[list[str]] = ["BigBirdPegasusDecoderLayer"]
    decoder_class: ClassVar[type] = BigBirdPegasusDecoder
