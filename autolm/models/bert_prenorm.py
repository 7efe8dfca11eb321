"""BERT's relatives run as decoders (transformers' *ForCausalLM with `is_decoder=True`), built on models/bert.py:
the pre-LN ones, RoBERTa-PreLayerNorm (RobertaPreLayerNormForCausalLM), XLM-RoBERTa-XL (XLMRobertaXLForCausalLM)
and Megatron-BERT (MegatronBertForCausalLM), and BertGeneration (BertGenerationDecoder).

- pre-LN layers: a LayerNorm over the attention's input (RoBERTa-PreLayerNorm's attention.LayerNorm, XLM-R-XL's
  attention.self_attn_layer_norm, Megatron's attention.ln), causal self-attention (attention.self.query/key/value),
  attention.output.dense added to the residual; a LayerNorm over the MLP's input (intermediate.LayerNorm; the
  layer's LayerNorm; the layer's ln), intermediate.dense -> activation -> output.dense added to the residual; a
  final LayerNorm after the last layer (roberta_prelayernorm.LayerNorm, roberta.encoder.LayerNorm,
  bert.encoder.ln);
- embeddings: word + position + token type (0 unless token_type_ids are given), under a LayerNorm for
  RoBERTa-PreLayerNorm only (XLM-R-XL and Megatron have none); positions as transformers counts them:
  RoBERTa's over the non-pad ids from pad_token_id + 1 (RoBERTa-PreLayerNorm, XLM-R-XL), BERT's cache slots
  (Megatron);
- heads: RoBERTa's lm_head (dense -> GELU -> layer_norm -> decoder) for the RoBERTa two, BERT's cls.predictions
  (transform dense -> activation -> LayerNorm -> decoder) for Megatron;
- BertGeneration: BERT's post-LN layers under `bert` (BertGenerationEncoder's names), word + position embeddings
  under a LayerNorm (no token types: token_type_ids are refused by name, as transformers' forward takes none;
  positions the cache's slots), and its lm_head: the decoder (with its bias) alone, no transform.

As in models/bert.py: the decoder's bias is the head's `bias` in tied files, tied to the word embeddings unless
untied; `is_decoder: false` warns and runs bidirectionally without a cache (generate refused); `add_cross_attention`
checkpoints load (the cross-attention's weights, its LayerNorm included, kept, never run; encoder_hidden_states
refused); transformers' names in checkpoints, state_dict() and adapters; no TP plan, as in transformers.
llama.cpp has none of these architectures as decoders: no GGUF.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import nn

from ..nn import CheckpointRules, Linear, Rename
from .bert import BertAttention, BertIntermediate, BertLMHeadModel, BertModel, _rules
from .bert_config import (
    BertConfig,
    BertGenerationConfig,
    MegatronBertConfig,
    RobertaPreLayerNormConfig,
    XLMRobertaXLConfig,
)


class PreNormOutput(nn.Module):
    """dense, added to the residual (the pre-LN layers' SelfOutput and Output: no norm after the sum)."""

    def __init__(self, config: BertConfig, width: int):
        super().__init__()
        self.dense = Linear(width, config.hidden_size, bias=True)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.dense(y) + residual


class PreNormAttention(BertAttention):
    """A LayerNorm (named `norm_name`) over the input, BERT's self-attention, its dense added to the residual;
    `cross`: the cross-attention's weights (norm included), kept, never run."""

    norm_name: ClassVar[str] = "LayerNorm"

    def __init__(self, config: BertConfig, layer_idx: int, cross: bool = False):
        super().__init__(config, layer_idx, cross)
        self.output = PreNormOutput(config, config.hidden_size)
        setattr(self, self.norm_name, nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.output(self.self(getattr(self, self.norm_name)(x), ctx), x)


class PreNormBertLayer(nn.Module):
    """attention (pre-LN), crossattention (add_cross_attention: never run), then the MLP's LayerNorm
    (`mlp_norm`: a name on the layer, or "intermediate.<name>"), intermediate, output added to the residual."""

    attention_cls: ClassVar[type[PreNormAttention]] = PreNormAttention
    mlp_norm: ClassVar[str] = "intermediate.LayerNorm"

    def __init__(self, config: BertConfig, layer_idx: int):
        super().__init__()
        self.attention = self.attention_cls(config, layer_idx)
        if config.add_cross_attention:
            self.crossattention = self.attention_cls(config, layer_idx, cross=True)
        self.intermediate = BertIntermediate(config)
        owner, _, name = self.mlp_norm.rpartition(".")
        setattr(self.get_submodule(owner), name, nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.output = PreNormOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = self.attention(x, ctx)
        return self.output(self.intermediate(self.get_submodule(self.mlp_norm)(x)), x)


class PreNormBertModel(BertModel):
    """BertModel with pre-LN layers and the final LayerNorm (`norm`)."""

    layer_cls: ClassVar[type[nn.Module]] = PreNormBertLayer

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)


def _with_norm(rules: CheckpointRules, key: str) -> CheckpointRules:
    """`rules` with the final LayerNorm's name in transformers' files (`key`) <-> the body's `norm`."""
    return CheckpointRules([Rename(rf"^{re.escape(key)}\.", "model.norm.", r"^model\.norm\.", f"{key}."),
                            *rules.rules])  # fmt: skip


class PreNormLMHeadModel(BertLMHeadModel):
    """BertLMHeadModel over a pre-LN body; the final norm's name in files is `final_norm_key`."""

    final_norm_key: ClassVar[str]

    def __init__(self, config: BertConfig):
        super().__init__(config)
        if not config.tie_word_embeddings:  # BertLMHeadModel's untied rules, with the final norm's name
            self.checkpoint_rules = _with_norm(self.checkpoint_rules, self.final_norm_key)


def _pre_norm_lm(name: str, config_cls: type, prefix: str, head: str, attn_norm: str, mlp_norm: str,
                 final_norm: str) -> type:  # fmt: skip
    """A pre-LN *ForCausalLM: its layer (the norms' names), body, names in files and transformers' layer name."""
    kind = name.replace("ForCausalLM", "")
    attention = type(f"{kind}Attention", (PreNormAttention,), {"norm_name": attn_norm})
    layer = type(f"{kind}Layer", (PreNormBertLayer,), {"attention_cls": attention, "mlp_norm": mlp_norm})
    body = type(f"{kind}Model", (PreNormBertModel,), {"layer_cls": layer})
    key = f"{prefix}.{final_norm}"
    return type(name, (PreNormLMHeadModel,), {
        "config_class": config_cls, "body_cls": body, "hf_prefix": prefix, "hf_head": head,
        "final_norm_key": key, "checkpoint_rules": _with_norm(_rules(prefix, head), key),
        "__doc__": f"transformers' {name}: pre-LN layers (see the module's doc).",
        "_no_split_modules": [f"{kind}Layer"], "__module__": __name__,
    })  # fmt: skip


RobertaPreLayerNormForCausalLM = _pre_norm_lm("RobertaPreLayerNormForCausalLM", RobertaPreLayerNormConfig,
                                              "roberta_prelayernorm", "lm_head", "LayerNorm",
                                              "intermediate.LayerNorm", "LayerNorm")  # fmt: skip
XLMRobertaXLForCausalLM = _pre_norm_lm("XLMRobertaXLForCausalLM", XLMRobertaXLConfig, "roberta", "lm_head",
                                       "self_attn_layer_norm", "LayerNorm", "encoder.LayerNorm")  # fmt: skip
MegatronBertForCausalLM = _pre_norm_lm("MegatronBertForCausalLM", MegatronBertConfig, "bert", "cls.predictions",
                                       "ln", "ln", "encoder.ln")  # fmt: skip


class BertGenerationDecoder(BertLMHeadModel):
    """transformers' BertGenerationDecoder: BERT's post-LN layers, no token types, the decoder (biased) as the
    whole head."""

    config_class = BertGenerationConfig
    hf_prefix: ClassVar[str] = "bert"
    hf_head: ClassVar[str] = "lm_head"
    checkpoint_rules = _rules("bert", "lm_head")
    _no_split_modules: ClassVar[list[str]] = ["BertGenerationLayer"]

    def make_head(self, config: BertConfig) -> nn.Module:
        """No transform: the hidden states go to the decoder as they are (an untied model's unused `bias` only)."""
        return nn.Identity()
