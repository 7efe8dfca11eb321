"""Speculative decoding in the server (`autolm serve --draft-model PATH` or `--prompt-lookup N`): while one
request runs alone, each engine step drafts candidates (from a draft model, or n-grams of the request's own
tokens) and the model verifies them in one forward, as generate() does (autolm.generation.speculative): greedy
requests get plain greedy decoding's tokens, sampled ones the same distribution. With two rows or more the
batch takes the one-token step (a batch already reads each weight once for several tokens), and so do requests
with a grammar (its state moves one token at a time).

A draft model that reads the served model's state (Gemma 4's assistant: `reads_target`, generation.target_draft)
drafts from the served model's last hidden state and shared keys and values: the lone row's first step (and its
first after one-token steps, a batch's or a round's without candidates) is a one-token step whose forward also
returns the last hidden state, from which the next rounds draft (`TargetDraft`); each verifying forward returns
the next one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..generation.candidates import Draft, PromptLookup
from ..generation.speculative import speculative_round
from ..generation.target_draft import TargetDraft, reads_target


@dataclass
class Speculation:
    """Where candidates come from: a draft model with the served model's tokenizer, or prompt lookup of up to
    `prompt_lookup` tokens matched on up to `max_matching_ngram_size` trailing tokens."""

    draft_model: Any = None
    prompt_lookup: int | None = None
    max_matching_ngram_size: int = 2

    def __str__(self) -> str:
        if self.draft_model is not None:
            name = getattr(getattr(self.draft_model, "config", None), "name_or_path", "") or "a draft model"
            return f"candidates from {name}"
        return f"up to {self.prompt_lookup} candidates from its own n-grams (prompt lookup)"

    def source(self, run: RowRun):
        if self.draft_model is not None:
            return Draft(self.draft_model, run, len(run.seq.prompt) + run.cfg.max_new_tokens + 1)
        return PromptLookup(self.prompt_lookup, self.max_matching_ngram_size, run.cfg.eos_ids, run.processors)


class RowRun:
    """The engine's only row, in the fields speculative_round reads and moves (generate()'s decode state):
    its tokens so far, the engine's cache and mask, its sampling settings and logits processors."""

    def __init__(self, engine, seq):
        self.seq, self.model, self.cache, self.mask = seq, engine.model, engine.cache, engine.mask
        self.cfg, self.processors, self.generator = seq.config, seq.processors, seq.generator
        dev = engine.model.device
        eos = [] if seq.ignore_eos else seq.config.eos_ids
        self.eos = torch.tensor(eos, dtype=torch.long) if eos else None
        self.ids = torch.tensor([seq.prompt + seq.tokens], device=dev)
        self.pos = torch.tensor([[seq.cached]], device=dev)

    def checked(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()

    def live(self) -> torch.Tensor:
        return torch.ones(1, dtype=torch.bool, device=self.ids.device)


def eligible(engine, speculation: Speculation | None) -> Any:
    """The row to speculate for at this step, or None: one row alone, no request waiting, no grammar."""
    both = getattr(engine.model, "bidirectional_forward", False)  # verifying would not be decoding (CPM-Ant)
    if speculation is None or both or len(engine.active) != 1 or not engine.pending.empty():
        return None
    seq = engine.active[0]
    left = seq.config.max_new_tokens - len(seq.tokens)
    return seq if seq.constraint is None and not seq.cancelled and left > 1 else None


@torch.inference_mode()
def speculative_step(engine, seq, speculation: Speculation) -> bool:
    """One round of drafting and verifying for the engine's only row, its tokens taken as decode steps take
    theirs; False where no candidates were found (nothing ran: the engine takes its one-token step)."""
    run = RowRun(engine, seq)
    if reads_target(speculation.draft_model):
        if getattr(seq.speculation, "at", None) != run.ids.shape[1]:  # no hidden state at the newest token
            _prime(engine, seq, run, speculation.draft_model)
            return True
    elif seq.speculation is None:
        seq.speculation = speculation.source(run)
    verified = speculative_round(run, seq.speculation, seq.config.max_new_tokens - len(seq.tokens) - 1)
    if verified is None:
        return False
    tokens, raw, _ = verified
    engine.mask = run.mask
    for i in range(tokens.shape[1]):
        seq.cached += 1
        engine.take(seq, raw[0, i], forced=int(tokens[0, i]))
        if seq.cancelled:  # finished (a stop, EOS or length) or failed: the rest is not its text
            break
    return True


def _prime(engine, seq, run: RowRun, draft) -> None:
    """The one-token step for the engine's only row, its forward also returning the served model's last hidden
    state: the TargetDraft the next rounds draft from, as generate()'s prefill over the row's tokens leaves it
    (the keys and values it reads those of every slot cached, a sliding layer's cut by its mask)."""
    run.mask = torch.cat([run.mask, run.mask.new_ones(1, 1)], 1)
    out = run.model(run.ids[:, -1:], attention_mask=run.mask, position_ids=run.pos, past_key_values=run.cache,
                    logits_to_keep=1, output_hidden_states=True)  # fmt: skip
    seq.speculation = TargetDraft(draft, run, out.hidden_states[-1])
    seq.speculation.span = (0, run.cache.length)  # the slots "the last forward" wrote: all, as a prefill's
    engine.mask = run.mask
    engine.steps += 1
    seq.cached += 1
    engine.take(seq, out.logits[0, -1])
