"""transformers' `<Family>ForQuestionAnswering` (extractive QA: a start and an end logit per token) on a family's
body, derived from its causal LM class as the other heads are (models.heads). The body keeps transformers' name
for it: the Llama-style families' QA classes name it `transformer`, not `model`, for backward compatibility, so
their checkpoints, state_dict() and adapter files say `transformer.layers...`; the others keep the body's own
prefix. `question_answering(cls)` makes (once) the class for a causal LM class."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from ..nn import Linear
from ..nn.checkpoint import CheckpointRules, Ignored, Rename
from .base import CausalLM
from .heads import Headless, _family_name, _fresh
from .output import ModelOutput

# the families whose QA class transformers builds on GenericForQuestionAnswering with base_model_prefix
# "transformer" (kept for backward compatibility); every other QA class names its body as the causal LM does
TRANSFORMER_PREFIX = frozenset(("Llama", "Arcee", "DiffLlama", "Exaone4", "Ministral", "Nemotron", "Qwen2", "Qwen3",
                                "Qwen3Moe", "Qwen3Next", "SeedOss", "SmolLM3"))  # fmt: skip


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    """transformers' QuestionAnsweringModelOutput: start and end logits (B, T)."""

    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class QuestionAnswering(Headless):
    """The body and `qa_outputs` (hidden -> 2, with a bias) over every position's normed hidden state: its two
    columns are the start and end logits. The loss is the mean of the start's and the end's cross-entropy, the
    positions clamped to the sequence's length and that length ignored (an answer cut off by truncation), as
    transformers' ForQuestionAnsweringLoss."""

    loss_type = "ForQuestionAnswering"
    head_blocks = ("qa_outputs",)
    new_if_missing = ("qa_outputs.weight", "qa_outputs.bias")  # a causal checkpoint gets a fresh head
    qa_prefix = "model"  # the body's name in transformers' QA checkpoints (TRANSFORMER_PREFIX)

    def __init__(self, config):
        super().__init__(config)
        self.qa_outputs = Linear(config.embedding_width, 2, bias=True)
        if self.qa_prefix != self.base_model_prefix:
            self.register_state_dict_post_hook(_qa_names)
            self.register_load_state_dict_pre_hook(_body_names)

    def init_new(self, names: list[str]) -> None:
        _fresh(self, self.qa_outputs, names)

    def adapter_key(self, key: str) -> str:
        """An adapter tensor's name in peft's file: the body under transformers' name for it."""
        return _renamed(key, self.base_model_prefix, self.qa_prefix)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **unused,
    ):
        h, _, hidden, attentions = self.decoder_states(input_ids, attention_mask, position_ids, past_key_values,
                                                       inputs_embeds, False, cache_position, output_hidden_states,
                                                       output_attentions)  # fmt: skip
        start, end = (t.squeeze(-1).contiguous() for t in self.qa_outputs(h).split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (_span_loss(start, start_positions, num_items_in_batch)
                    + _span_loss(end, end_positions, num_items_in_batch)) / 2  # fmt: skip
        out = QuestionAnsweringModelOutput(loss, start, end, hidden, attentions)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()


def _span_loss(logits: torch.Tensor, positions: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """Cross-entropy of one end of the span; a position past the sequence is ignored."""
    if positions.dim() > 1:
        positions = positions.squeeze(-1)
    ignored = logits.shape[1]
    positions = positions.to(logits.device).clamp(0, ignored)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, positions, ignore_index=ignored)
    total = F.cross_entropy(logits, positions, ignore_index=ignored, reduction="sum")
    return total / (
        num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    )


def _renamed(key: str, old: str, new: str) -> str:
    return new + key[len(old) :] if key.startswith(old + ".") else key


def _qa_names(module: QuestionAnswering, state_dict, prefix: str, local_metadata) -> None:
    """state_dict's post-hook: the body under transformers' name for it (see _util.own_names)."""
    if module.__dict__.get("_own_names"):
        return
    old, new = prefix + module.base_model_prefix, prefix + module.qa_prefix
    for key in [k for k in state_dict if k.startswith(old + ".")]:
        state_dict[_renamed(key, old, new)] = state_dict.pop(key)


def _body_names(module: QuestionAnswering, state_dict, prefix: str, *args) -> None:
    """load_state_dict's pre-hook: transformers' name for the body put back as the module's."""
    old, new = prefix + module.qa_prefix, prefix + module.base_model_prefix
    for key in [k for k in state_dict if k.startswith(old + ".")]:
        state_dict[_renamed(key, old, new)] = state_dict.pop(key)


@cache
def question_answering(cls: type[CausalLM], family: str | None = None) -> type:
    """`<family>ForQuestionAnswering` for a family's causal LM class: its body (under transformers' name for it,
    TRANSFORMER_PREFIX) and `qa_outputs`; a causal checkpoint's LM head is skipped while loading."""
    family = family or _family_name(cls)
    p = cls.base_model_prefix
    qa_prefix = "transformer" if family in TRANSFORMER_PREFIX else p
    rules = [*cls.checkpoint_rules.rules, Ignored(r"lm_head\.(weight|bias)")]
    if qa_prefix != p:
        rules.insert(0, Rename(rf"^{qa_prefix}\.", f"{p}.", rf"^{p}\.", f"{qa_prefix}."))
    attrs = {"checkpoint_rules": CheckpointRules(rules), "__module__": cls.__module__, "qa_prefix": qa_prefix}
    return type(family + "ForQuestionAnswering", (QuestionAnswering, cls), attrs)
