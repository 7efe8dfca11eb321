"""Other heads on a family's body: transformers' `<Family>ForSequenceClassification` (reward models, classifiers),
`<Family>ForTokenClassification` (a label per token) and `<Family>Model` (the body alone: embedding models),
derived from the family's causal LM class so the body, its checkpoint names, placement and training support are the
same; only the head differs. `sequence_classification(cls)`, `token_classification(cls)` and `base_model(cls)`
make (once) the class for a causal LM class."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..nn import Linear
from ..nn.checkpoint import CheckpointRules, Ignored, Rename
from .base import CausalLM
from .output import CausalLMOutput, ModelOutput

logger = logging.getLogger("autolm")


class SequenceClassifierOutput(CausalLMOutput):
    """transformers' SequenceClassifierOutputWithPast: logits (B, num_labels), the row's last real token's."""


@dataclass
class TokenClassifierOutput(ModelOutput):
    """transformers' TokenClassifierOutput: logits (B, T, num_labels)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class Headless:
    """What a model without the LM head changes in its causal LM class: nothing ties to a head, placement and
    tensor parallelism have no `lm_head` block, generation is refused, the saved config names this class."""

    lm_head = None  # what reads `model.lm_head` (placement, tying) finds none
    head_blocks: tuple[str, ...] = ()  # the head's placement blocks, after the body's

    def __init__(self, config):
        super().__init__(config)
        del self.lm_head
        # what save_pretrained writes (a causal LM's config names the causal class)
        config.architectures = [type(self).__name__]

    def tie_weights(self) -> None:
        pass

    def blocks(self) -> list[str]:
        return [*super().blocks()[:-1], *self.head_blocks]

    def tp_plan(self) -> dict[str, str]:
        return {k: v for k, v in super().tp_plan().items() if k != "lm_head"}

    def get_output_embeddings(self) -> None:
        return None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"{type(self).__name__} has no LM head: generation is for causal LMs")

    def generate(self, *args, **kwargs):
        raise ConfigError(f"{type(self).__name__} has no LM head: generation is for causal LMs")


class BaseModel(Headless):
    """transformers' `<Family>Model` (AutoModel): the body alone, its normed hidden states as last_hidden_state
    (embedding models pool them). Its checkpoints, its adapters' files and its state_dict() name tensors without
    the body's prefix (`layers.0...`), as transformers' base model does; load_state_dict takes those names or the
    body's, and a causal LM's checkpoint loads too. (Its modules keep the body's prefix: `named_parameters()`
    gives `model.layers.0...`.)"""

    def __init__(self, config):
        super().__init__(config)
        self.register_state_dict_post_hook(_transformers_names)
        self.register_load_state_dict_pre_hook(_body_names)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **unused,
    ):
        return self.base_model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                               output_attentions, output_hidden_states, return_dict, cache_position)  # fmt: skip

    def __getattr__(self, name: str):
        """The body's modules as attributes (`model.layers`, `model.embed_tokens`, `model.norm`), where
        transformers' base model holds them itself."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            body = self._modules.get(self.base_model_prefix)
            if body is not None and name in body._modules:
                return body._modules[name]
            raise

    def adapter_key(self, key: str) -> str:
        """An adapter tensor's name in peft's file for this model: the body's prefix dropped."""
        return key.removeprefix(self.base_model_prefix + ".")


def _transformers_names(module: BaseModel, state_dict, prefix: str, local_metadata) -> None:
    """state_dict's post-hook: the body's prefix dropped from the base model's names (see _util.own_names)."""
    if module.__dict__.get("_own_names"):
        return
    body = f"{prefix}{module.base_model_prefix}."
    for key in [k for k in state_dict if k.startswith(body)]:
        state_dict[prefix + key[len(body) :]] = state_dict.pop(key)


def _body_names(module: BaseModel, state_dict, prefix: str, *args) -> None:
    """load_state_dict's pre-hook: transformers' base-model names put back under the body's prefix."""
    body = f"{prefix}{module.base_model_prefix}."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(body)]:
        state_dict[body + key[len(prefix) :]] = state_dict.pop(key)


class SequenceClassification(Headless):
    """The body and a `score` Linear (hidden -> num_labels, no bias) read at each row's last token that is not
    the pad token, as transformers' GenericForSequenceClassification; the loss by config.problem_type
    (regression, single- or multi-label, inferred from num_labels and the labels' dtype where unset)."""

    loss_type = "ForSequenceClassification"
    head_blocks = ("score",)
    new_if_missing = ("score.weight",)  # a causal LM's checkpoint loads with a fresh head, as in transformers
    score_tokens: tuple[str, list[int]] | None = None  # set by the load (load.build.score_from_tokens)

    def __init__(self, config):
        super().__init__(config)
        self.score = Linear(config.embedding_width, config.num_labels, bias=False)

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def adopt(self, name: str, t: torch.Tensor) -> bool:
        """Keep the rows a score made from tokens (score_tokens) needs of the checkpoint's LM head, which the
        classifier does not hold; whether it took them."""
        if name != "lm_head.weight" or self.score_tokens is None or not t.is_floating_point():
            return False
        self._head_rows = t[self.score_tokens[1]].to(torch.float32)
        return True

    def init_new(self, names: list[str]) -> str | None:
        """Give the head the checkpoint lacked fresh weights (normal, std initializer_range), as transformers does
        (with its warning); or, with score_tokens, the LM head's rows for those tokens as vLLM makes them
        (from_2_way_softmax: true's row less false's, in float32). Returns the load report's note."""
        if self.score_tokens is not None:
            w = self.score.weight
            device = w.device if w.device.type != "meta" else self.get_input_embeddings().weight.device
            method, ids = self.score_tokens
            rows = getattr(self, "_head_rows", None)
            if rows is None and self.config.tie_word_embeddings:
                rows = self.get_input_embeddings().weight.detach()[ids].to(torch.float32)
            if rows is None:
                raise CheckpointError(f"{self.config.source}: classifier_from_token needs the checkpoint's "
                                      "lm_head.weight, which it does not hold")  # fmt: skip
            score = rows[1:] - rows[:1] if method == "from_2_way_softmax" else rows
            self.score.weight = nn.Parameter(
                score.to(device=device, dtype=w.dtype), requires_grad=w.requires_grad
            )
            self._head_rows = None
            return f"score.weight made from the LM head's rows of tokens {ids} ({method})"
        return _fresh(self, self.score, names)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **unused,
    ):
        h, cache, hidden, attentions = self.decoder_states(input_ids, attention_mask, position_ids, past_key_values,
                                                           inputs_embeds, use_cache, cache_position,
                                                           output_hidden_states, output_attentions)  # fmt: skip
        logits = self.score(h)
        pooled = logits[
            torch.arange(h.shape[0], device=logits.device), self._last_tokens(input_ids, h.shape[0])
        ]
        loss = None if labels is None else self._loss(pooled, labels.to(pooled.device))
        out = SequenceClassifierOutput(loss, pooled, cache, hidden, attentions)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def _last_tokens(self, input_ids: torch.Tensor | None, batch: int) -> torch.Tensor | int:
        """Each row's last token that is not the pad token (left or right padding); -1 without a pad token."""
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ConfigError(
                f"{type(self).__name__}: a batch of {batch} rows needs config.pad_token_id to find each row's "
                "last token (set it to the tokenizer's pad_token_id)"
            )
        if pad is None or input_ids is None:
            return -1
        real = (input_ids != pad).to(torch.int32)
        return (torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32) * real).argmax(
            -1
        )

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        config, n = self.config, self.config.num_labels
        if config.problem_type is None:
            integer = labels.dtype in (torch.long, torch.int)
            kind = "regression" if n == 1 else "single_label" if integer else "multi_label"
            config.extra["problem_type"] = f"{kind}_classification" if kind != "regression" else kind
        kind = config.problem_type
        if kind == "regression":
            return F.mse_loss(pooled.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(pooled, labels)
        if kind == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, n), labels.view(-1), ignore_index=-100)
        if kind == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(pooled, labels)
        raise ConfigError(
            f"config.problem_type {kind!r} is not one of regression, single_label_classification, "
            "multi_label_classification"
        )


def _fresh(model, head: nn.Module, names: list[str]) -> None:
    """A head the checkpoint lacked: weights normal(0, initializer_range), bias zero, as transformers initializes
    them (with its warning)."""
    w = head.weight
    device = w.device if w.device.type != "meta" else model.get_input_embeddings().weight.device
    std = float(model.config.extra.get("initializer_range", 0.02))
    head.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device=device).normal_(0.0, std))
    if getattr(head, "bias", None) is not None:
        head.bias = nn.Parameter(torch.zeros(head.bias.shape, dtype=head.bias.dtype, device=device))
    logger.warning("Some weights of %s were not initialized from the checkpoint and are newly initialized: "
                   "%s; train the model before using it for predictions", type(model).__name__, names)  # fmt: skip


class TokenClassification(Headless):
    """The body and a Linear (hidden -> num_labels, with a bias unless config.token_classification_bias is false)
    over every position's normed hidden state, after a dropout (config.classifier_dropout, else hidden_dropout,
    else 0.1; training only), as transformers' GenericForTokenClassification; cross-entropy over the tokens whose
    label is not -100. The head is `score` on families whose body is `model`, `classifier` on the older ones
    (GPT-2, GPT-NeoX, Falcon, BLOOM, MPT, ...), as transformers names them."""

    loss_type = "ForTokenClassification"
    head_name = "score"

    def __init__(self, config):
        super().__init__(config)
        given = (getattr(config, k, None) for k in ("classifier_dropout", "hidden_dropout"))
        self.dropout = nn.Dropout(next((p for p in given if p is not None), 0.1))
        bias = bool(getattr(config, "token_classification_bias", True)) if self.head_name == "score" else True
        setattr(self, self.head_name, Linear(config.embedding_width, config.num_labels, bias=bias))

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def init_new(self, names: list[str]) -> None:
        _fresh(self, getattr(self, self.head_name), names)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | None = None,
        **unused,
    ):
        h, _, hidden, attentions = self.decoder_states(input_ids, attention_mask, position_ids, past_key_values,
                                                       inputs_embeds, False, cache_position, output_hidden_states,
                                                       output_attentions)  # fmt: skip
        logits = getattr(self, self.head_name)(self.dropout(h))
        loss = None
        if labels is not None:
            flat, target = logits.float().view(-1, self.num_labels), labels.to(logits.device).view(-1)
            if num_items_in_batch is None:
                loss = F.cross_entropy(flat, target, ignore_index=-100)
            else:
                loss = F.cross_entropy(flat, target, ignore_index=-100, reduction="sum") / num_items_in_batch
        out = TokenClassifierOutput(loss, logits, hidden, attentions)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()


@cache
def sequence_classification(cls: type[CausalLM], family: str | None = None) -> type:
    """`<family>ForSequenceClassification` for a family's causal LM class (family: the name transformers gives
    the family's classes, else the causal class's): its body, a `score` head; a causal checkpoint's LM head is
    skipped while loading."""
    name = (family or _family_name(cls)) + "ForSequenceClassification"
    rules = CheckpointRules([*cls.checkpoint_rules.rules, Ignored(r"lm_head\.(weight|bias)")])
    return type(
        name, (SequenceClassification, cls), {"checkpoint_rules": rules, "__module__": cls.__module__}
    )


@cache
def token_classification(cls: type[CausalLM], family: str | None = None) -> type:
    """`<family>ForTokenClassification` for a family's causal LM class: its body, a per-token head (`score`, or
    `classifier` where the body is not `model`); a causal checkpoint's LM head is skipped while loading."""
    name = (family or _family_name(cls)) + "ForTokenClassification"
    head = "score" if cls.base_model_prefix == "model" else "classifier"
    rules = CheckpointRules([*cls.checkpoint_rules.rules, Ignored(r"lm_head\.(weight|bias)")])
    attrs = {"checkpoint_rules": rules, "__module__": cls.__module__, "head_name": head, "head_blocks": (head,),
             "new_if_missing": (f"{head}.weight", f"{head}.bias")}  # fmt: skip
    return type(name, (TokenClassification, cls), attrs)


@cache
def base_model(cls: type[CausalLM], family: str | None = None) -> type:
    """`<Family>Model` for a family's causal LM class: its body; a base model's checkpoint names its tensors
    without the body's prefix, a causal LM's or a classifier's with it (its head skipped, as transformers does)."""
    p = cls.base_model_prefix
    rules = CheckpointRules([*cls.checkpoint_rules.rules, Rename(rf"^(?!{p}\.|lm_head\.|score\.)", f"{p}.", rf"^{p}\.", ""),
                             Ignored(r"(lm_head|score)\.(weight|bias)")])  # fmt: skip
    name = (family or _family_name(cls)) + "Model"
    return type(name, (BaseModel, cls), {"checkpoint_rules": rules, "__module__": cls.__module__})


def _family_name(cls: type) -> str:
    return cls.__name__.removesuffix("LMHeadModel").removesuffix("ForCausalLM")
