"""The BERT-style encoders run as decoders (transformers' *ForCausalLM with `is_decoder=True`): BERT
(BertLMHeadModel) and the RoBERTa family (RoBERTa, XLM-RoBERTa, CamemBERT, Data2Vec-Text: *ForCausalLM).

- embeddings: word + position (learned, absolute) + token_type (type 0 unless token_type_ids are given), then a
  LayerNorm; BERT's positions, where none are given, are the cache's slots (padding included), RoBERTa's count the
  ids that are not pad_token_id, from pad_token_id + 1 (fairseq's offset; `inputs_embeds`: pad + 1 on, as
  transformers). Given position_ids are read as rows, as transformers reads them (its generate passes the
  padding mask's positions, from 0, for both; autolm's generate does the same);
- post-LN layers: causal self-attention (attention.self.query/key/value, attention.output.dense) with its residual
  sum normed (attention.output.LayerNorm), then intermediate.dense -> activation -> output.dense, normed likewise;
- the head: BERT's cls.predictions (transform.dense -> act -> transform.LayerNorm -> decoder with a bias),
  RoBERTa's lm_head (dense -> gelu -> layer_norm -> decoder with a bias), the decoder tied to the word embeddings
  unless the config unties them.

`is_decoder=False`: as transformers, a warning, then a forward that runs the layers bidirectionally (each real
token sees every real token of its row) and keeps no cache; generate() is refused (GenerationError naming
is_decoder: every token would recompute the whole sequence, which autolm's decoding does not do). `add_cross_attention`
configs load (the cross-attention weights kept, never run); encoder_hidden_states / encoder_attention_mask are
refused by name. autolm's modules are `model`, `head` and `lm_head`; state_dict(), checkpoints and adapters use
transformers' names (checkpoint_rules, models/bert_names.py). llama.cpp's BERT is an encoder without an LM head:
no GGUF. The pre-LN relatives (RoBERTa-PreLayerNorm, XLM-RoBERTa-XL, Megatron-BERT) and BertGeneration build on
these classes in models/bert_prenorm.py.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import nn

from ..errors import GenerationError
from ..nn import (
    ACTIVATIONS,
    Attention,
    CheckpointRules,
    Ignored,
    Linear,
    Rename,
    Rotary,
    embedding,
    resize_bias,
    transformers_state_dict,
)
from .base import CausalLM, DecoderModel
from .bert_config import (
    BertConfig,
    CamembertConfig,
    Data2VecTextConfig,
    ElectraConfig,
    ErnieConfig,
    RobertaConfig,
    XLMRobertaConfig,
)
from .bert_names import _rules

logger = logging.getLogger("autolm")


class BertSelfAttention(Attention):
    """Multi-head causal attention (no RoPE) with transformers' `query`, `key`, `value`."""

    def __init__(self, config: BertConfig, layer_idx: int):
        n = config.num_attention_heads
        super().__init__(config.hidden_size, n, n, config.head_dim, layer_idx, bias=True, rope=None)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        size = self.num_heads * self.head_dim
        self.query, self.key, self.value = (Linear(hidden, size, bias=True) for _ in range(3))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query(x), self.key(x), self.value(x)

    @property
    def o_proj(self) -> nn.Module:
        """Attention.forward's output projection: none here (BertSelfOutput's dense follows, before its norm)."""
        return nn.Identity()


class BertSelfOutput(nn.Module):
    """dense, then LayerNorm over the sum with the residual (transformers' SelfOutput and Output)."""

    def __init__(self, config: BertConfig, width: int):
        super().__init__()
        self.dense = Linear(width, config.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(y) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, layer_idx: int, cross: bool = False):
        super().__init__()
        if cross:  # the cross-attention's weights: loaded and saved, never run
            h = config.hidden_size
            self.self = nn.Module()
            self.self.query, self.self.key, self.self.value = (Linear(h, h, bias=True) for _ in range(3))
        else:
            self.self = BertSelfAttention(config, layer_idx)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.output(self.self(x, ctx), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """attention (post-LN), crossattention (add_cross_attention: never run), intermediate, output (post-LN)."""

    def __init__(self, config: BertConfig, layer_idx: int):
        super().__init__()
        self.attention = BertAttention(config, layer_idx)
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, layer_idx, cross=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = self.attention(x, ctx)
        return self.output(self.intermediate(x), x)


class BertEmbeddings(nn.Module):
    """position_embeddings, token_type_embeddings and the LayerNorm (word_embeddings are the body's embed_tokens;
    configs without token types or without the LayerNorm, e.g. BertGeneration's, Megatron-BERT's, have none)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = getattr(config, "embedding_size", config.hidden_size)  # ELECTRA's embeddings are narrower
        self.position_embeddings = embedding(config.max_position_embeddings, h)
        if getattr(config, "token_types", True):
            self.token_type_embeddings = embedding(config.type_vocab_size, h)
        if getattr(config, "embeddings_norm", True):
            self.LayerNorm = nn.LayerNorm(h, eps=config.rms_norm_eps)
        if getattr(config, "use_task_id", False):  # ERNIE's task types
            self.task_type_embeddings = embedding(config.task_type_vocab_size, h)


class BertModel(DecoderModel):
    """embed_tokens, embeddings (positions, token types, LayerNorm), layers (`layer_cls`); no final norm (post-LN
    layers; pre-LN relatives set `norm`)."""

    layer_cls: ClassVar[type[nn.Module]] = BertLayer

    def __init__(self, config: BertConfig):
        nn.Module.__init__(self)
        self.config = config
        width = getattr(config, "embedding_size", config.hidden_size)
        self.embed_tokens = embedding(config.vocab_size, width)
        self.embeddings = BertEmbeddings(config)
        # ELECTRA: the embeddings projected to hidden_size where they are narrower
        h = config.hidden_size
        self.embeddings_project = Linear(width, h, bias=True) if width != h else None
        self.layers = nn.ModuleList(self.layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = None
        self.gradient_checkpointing = False
        self.rotary = Rotary({}, config.head_dim, config.max_position_embeddings, False)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """LayerNorm(input vectors + token type 0 + the positions' rows (B, T)); given token_type_ids: forward."""
        emb = self.embeddings
        n = emb.position_embeddings.num_embeddings
        if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
            raise GenerationError(f"position {int(position_ids.max())} is past the {n} learned positions "
                                  "(max_position_embeddings): shorten the prompt or max_new_tokens")  # fmt: skip
        # token type 0 (given token_type_ids: forward adds theirs)
        types = getattr(emb, "token_type_embeddings", None)
        x = (x if types is None else x + types.weight[0]) + emb.position_embeddings(position_ids)
        if hasattr(emb, "task_type_embeddings"):  # ERNIE's task 0 (task_type_ids given: forward adds theirs)
            x = x + emb.task_type_embeddings.weight[0]
        x = emb.LayerNorm(x) if hasattr(emb, "LayerNorm") else x
        return x if self.embeddings_project is None else self.embeddings_project(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm is None else self.norm(x)

    def forward(self, x, attention_mask, position_ids, cache, cache_position, kv_length, *rest, **kwargs):
        """DecoderModel's forward; without is_decoder (an encoder, as transformers runs it) every real slot is one
        block that attends both ways (Forward's block_ids), padding in none."""
        if not self.config.is_decoder:
            real = torch.ones(len(x), kv_length, dtype=torch.long, device=x.device)
            if attention_mask is not None:
                real = attention_mask[:, :kv_length].to(device=x.device, dtype=torch.long)
            kwargs["block_ids"] = real - 1
        return super().forward(
            x, attention_mask, position_ids, cache, cache_position, kv_length, *rest, **kwargs
        )


class BertPredictionHead(nn.Module):
    """act(dense(x)) normed: BERT's cls.predictions.transform (LayerNorm), RoBERTa's lm_head (layer_norm, GELU)."""

    def __init__(self, config: BertConfig, norm_name: str, act: str):
        super().__init__()
        width = getattr(
            config, "embedding_size", config.hidden_size
        )  # ELECTRA's: back to the embeddings' width
        self.dense = Linear(config.hidden_size, width, bias=True)
        self.act = ACTIVATIONS[act]
        self.norm_name = norm_name
        setattr(self, norm_name, nn.LayerNorm(width, eps=config.rms_norm_eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.norm_name)(self.act(self.dense(x)))


class BertLMHeadModel(CausalLM):
    """transformers' BertLMHeadModel: the head's transform, then the decoder (biased; tied unless untied)."""

    config_class = BertConfig
    causal_only: ClassVar[str] = "an encoder"  # transformers' other heads for these types are the encoder's
    hf_prefix: ClassVar[str] = "bert"
    hf_head: ClassVar[str] = "cls.predictions"
    checkpoint_rules = _rules("bert", "cls.predictions")
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan
    _no_split_modules: ClassVar[list[str]] = ["BertLayer"]
    body_cls: ClassVar[type[BertModel]] = BertModel

    def __init__(self, config: BertConfig):
        super().__init__(config, self.body_cls(config))
        self.head = self.make_head(config)
        width = getattr(config, "embedding_size", config.hidden_size)
        self.lm_head = Linear(width, config.vocab_size, bias=True)
        self._modules = {k: self._modules[k] for k in ("model", "head", "lm_head")}  # forward's order
        # untied: the decoder's own bias; the head's `bias` kept (unused, as in transformers; ELECTRA has none)
        if not config.tie_word_embeddings and self.hf_head != "generator_lm_head":
            self.head.bias = nn.Parameter(torch.zeros(config.vocab_size))
            self.checkpoint_rules = _rules(self.hf_prefix, self.hf_head, tied=False)
        if not config.is_decoder:  # transformers' warning; the forward runs bidirectionally, with no cache
            logger.warning(
                "If you want to use `%s` as a standalone, add `is_decoder=True.`", type(self).__name__
            )
            self.one_token_step = False
        transformers_state_dict(self)  # state_dict() in transformers' names

    def make_head(self, config: BertConfig) -> nn.Module:
        """The transform before the decoder: RoBERTa's and ELECTRA's with GELU whatever hidden_act."""
        fairseq = config.fairseq_positions
        gelu = fairseq or self.hf_head == "generator_lm_head"
        return BertPredictionHead(config, "layer_norm" if fairseq else "LayerNorm",
                                  "gelu" if gelu else config.hidden_act)  # fmt: skip

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.finish_logits(self.lm_head(self.head(h)))

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """CausalLM's; the decoder's bias (an untied model's unused head bias too) resized as transformers does."""
        bias, unused = self.lm_head.bias, getattr(self.head, "bias", None)
        emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        n, tied = emb.weight.shape[0], self.config.tie_word_embeddings
        resize_bias(self.lm_head, bias, n, mean_resizing and not tied)  # tied: padded with zeros
        resize_bias(self.head, unused, n, False)
        return emb

    def blocks(self) -> list[str]:
        layers = [f"model.layers.{i}" for i in range(len(self.model.layers))]
        project = ["model.embeddings_project"] if self.model.embeddings_project is not None else []
        norm = ["model.norm"] if self.model.norm is not None else []  # pre-LN relatives' final norm
        head = ["head"] if any(True for _ in self.head.parameters()) else []  # BertGeneration's: none
        return ["model.embed_tokens", "model.embeddings", *project, *layers, *norm, *head, "lm_head"]

    def adapter_key(self, key: str) -> str:
        """An adapter tensor's name in peft's file: transformers' module names."""
        return self.checkpoint_rules._back(key)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, *args, token_type_ids=None, **kwargs):  # fmt: skip
        """CausalLM's forward; positions where none are given as transformers counts them (see the module's
        doc); token_type_ids add their type's embedding (in place of type 0's); encoder inputs refused."""
        for key in ("encoder_hidden_states", "encoder_attention_mask"):
            if kwargs.pop(key, None) is not None:
                raise GenerationError(f"{type(self).__name__}.forward: {key} given, but autolm runs the decoder "
                                      "alone, without cross-attention: pass input_ids (or inputs_embeds) only")  # fmt: skip
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, inputs_embeds, past_key_values)
        embeddings = self.model.embeddings
        task_ids = kwargs.pop("task_type_ids", None) if hasattr(embeddings, "task_type_embeddings") else None
        for ids, types in ((token_type_ids, "token_type_embeddings"), (task_ids, "task_type_embeddings")):
            if ids is not None:
                table = getattr(embeddings, types, None)
                if table is None:
                    raise GenerationError(f"{type(self).__name__}.forward: token_type_ids given, but the model has "
                                          "no token type embeddings (transformers' takes none): leave them out")  # fmt: skip
                if inputs_embeds is None:
                    inputs_embeds, input_ids = self.model.embed(input_ids), None
                inputs_embeds = inputs_embeds + table(ids) - table.weight[0]
        return super().forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, *args,
                               **kwargs)  # fmt: skip

    def forward_cache(self, past_key_values, use_cache, B: int, T: int):
        """CausalLM's; none without is_decoder (transformers keeps no cache for an encoder), a cache refused."""
        if self.config.is_decoder:
            return super().forward_cache(past_key_values, use_cache, B, T)
        if past_key_values is not None:
            raise GenerationError(f"{type(self).__name__}: past_key_values given, but the config's is_decoder is "
                                  "false (bidirectional attention, no cache): set is_decoder=True")  # fmt: skip
        return None

    def generate(self, *args, **kwargs):
        """GenerationMixin's; refused without is_decoder (see the module's doc)."""
        if not self.config.is_decoder:
            raise GenerationError(f"{type(self).__name__}.generate: the config's is_decoder is false, so the layers "
                                  "attend both ways (an encoder); autolm generates with causal decoders: set "
                                  "is_decoder=True (as transformers asks)")  # fmt: skip
        return super().generate(*args, **kwargs)

    def default_position_ids(self, input_ids, inputs_embeds, cache) -> torch.Tensor:
        """transformers' positions without position_ids: BERT's the cache's slots; RoBERTa's each non-pad id's
        count among this forward's plus the cached length, past pad_token_id (pad ids: pad_token_id's row)."""
        past = cache.length if cache is not None else 0
        x = input_ids if input_ids is not None else inputs_embeds[..., 0]
        B, T = x.shape[:2]
        pad = self.config.pad_token_id
        if not self.config.fairseq_positions:
            return torch.arange(past, past + T, device=x.device).unsqueeze(0).expand(B, -1)
        if input_ids is None:  # transformers: no past counted here
            return torch.arange(pad + 1, pad + 1 + T, device=x.device).unsqueeze(0).expand(B, -1)
        real = input_ids.ne(pad).long()
        return (real.cumsum(-1) + past) * real + pad


def _causal_lm(config_cls: type, name: str, prefix: str) -> type:
    """A RoBERTa-family *ForCausalLM: BertLMHeadModel with the body under `prefix` and the head `lm_head`."""
    return type(name, (BertLMHeadModel,), {"config_class": config_cls, "hf_prefix": prefix,
                                           "hf_head": "lm_head",
                                           "checkpoint_rules": _rules(prefix, "lm_head"),
                                           "__doc__": f"transformers' {name}.",
                                           "_no_split_modules": [name.replace("ForCausalLM", "Layer")]})  # fmt: skip


RobertaForCausalLM = _causal_lm(RobertaConfig, "RobertaForCausalLM", "roberta")
XLMRobertaForCausalLM = _causal_lm(XLMRobertaConfig, "XLMRobertaForCausalLM", "roberta")
CamembertForCausalLM = _causal_lm(CamembertConfig, "CamembertForCausalLM", "roberta")
Data2VecTextForCausalLM = _causal_lm(Data2VecTextConfig, "Data2VecTextForCausalLM", "data2vec_text")


# ELECTRA's generator: body `electra` (with embeddings_project), head generator_predictions (dense, GELU,
# LayerNorm) and generator_lm_head (its own bias), tied to the word embeddings unless untied
_ELECTRA_RULES = CheckpointRules([
    *_rules("electra", "generator_lm_head").rules[:3],
    Rename(r"^electra\.embeddings_project\.", "model.embeddings_project.", r"^model\.embeddings_project\.",
           "electra.embeddings_project."),
    Rename(r"^generator_lm_head\.", "lm_head.", r"^lm_head\.", "generator_lm_head."),
    Rename(r"^generator_predictions\.", "head.", r"^head\.", "generator_predictions."),
    Ignored(r"electra\.embeddings\.(position_ids|token_type_ids)"),  # old files' buffers
])  # fmt: skip


class ElectraForCausalLM(BertLMHeadModel):
    """transformers' ElectraForCausalLM (ELECTRA's generator as a decoder): BERT's layers and positions, the
    embeddings' projection, GELU in the head whatever hidden_act."""

    config_class = ElectraConfig
    hf_prefix: ClassVar[str] = "electra"
    hf_head: ClassVar[str] = "generator_lm_head"
    checkpoint_rules = _ELECTRA_RULES
    _no_split_modules: ClassVar[list[str]] = ["ElectraLayer"]


class ErnieForCausalLM(BertLMHeadModel):
    """transformers' ErnieForCausalLM: BERT's, with the task type embeddings where use_task_id."""

    config_class = ErnieConfig
    hf_prefix: ClassVar[str] = "ernie"
    checkpoint_rules = _rules("ernie", "cls.predictions")
    _no_split_modules: ClassVar[list[str]] = ["ErnieLayer"]
