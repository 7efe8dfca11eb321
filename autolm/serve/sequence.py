"""One request's completion as the engine runs it (`Sequence`: its settings, progress and where its events go),
its logits processors, log-probability entries, the rows' adapters and batch cache, and other work for the
engine's thread (`Work`)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation import GenerationConfig, LogitsProcessor, logits_processors
from ..lora.mixed import BASE, mixed_batch
from .events import Entry, PromptLogprobs


@dataclass
class Sequence:
    """One completion being generated: its settings, its progress, and where its events go."""

    prompt: list[int]
    config: GenerationConfig
    stops: list[str]
    emit: Any  # callable(events.Event), called from the engine thread
    generator: torch.Generator | None = None
    logprobs: int | None = None  # alternatives per token (0: the chosen token only); None: no logprobs
    prompt_logprobs: int | None = None  # the same for each prompt token; None: none
    rank: bool = False  # keep the cumulative logprob (best_of)
    bias: dict[int, float] = field(default_factory=dict)
    presence: float = 0.0
    frequency: float = 0.0
    ignore_eos: bool = False
    constraint: Any = None  # structured.Constraint
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    text: str = ""  # the text so far
    detok: Any = None
    pending: list[Entry] = field(default_factory=list)  # logprob entries not yet emitted
    cumulative: float = 0.0
    cancelled: bool = False
    cached: int = 0  # tokens of this sequence in the batch cache
    reused: int = 0  # prompt tokens whose keys and values came from the prefix cache
    last: int = -1  # the latest sampled token, fed to the next decode step
    stop_token_ids: tuple[int, ...] = ()  # the request's own stop tokens (named as the stop_reason)
    include_stop: bool = False  # keep the matched stop string in the text
    skip_special: bool = True  # leave special tokens out of the text
    pending_ids: list[int] = field(default_factory=list)  # sampled tokens not yet emitted
    speculation: Any = None  # where its speculative candidates come from (autolm.serve.speculation)
    adapter: str | None = None  # the LoRA adapter it runs with (None: the base model)

    processors: Any = None  # the request's logits processors, built once from the fields above

    def __post_init__(self) -> None:
        if self.processors is None:
            c = self.config
            cfg = dataclasses.replace(
                c,
                logit_bias=self.bias or c.logit_bias,
                presence_penalty=self.presence or c.presence_penalty,
                frequency_penalty=self.frequency or c.frequency_penalty,
            )
            grammar = [GrammarMask(self.constraint)] if self.constraint is not None else []
            self.processors = logits_processors(cfg, len(self.prompt), grammar)


class GrammarMask(LogitsProcessor):
    """Structured output as a logits processor: the constraint's mask of the tokens it allows next."""

    def __init__(self, constraint):
        self.constraint = constraint

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.constraint.mask(scores)


def entry(logp: torch.Tensor, token: int, top: int) -> Entry:
    """logp: (V,) log-probabilities."""
    alts = []
    if top:
        values, ids = logp.topk(min(top, logp.shape[-1]))
        alts = list(zip(ids.tolist(), values.tolist()))
    chosen = logp[token]
    return token, float(chosen), int((logp > chosen).sum()) + 1, alts


def adapters_of(model, seqs: list[Sequence]):
    """The context a forward over these rows runs in: each row with its LoRA adapter where the model has adapters
    (autolm.lora.mixed; the decode step then runs eagerly)."""
    names = [s.adapter or BASE for s in seqs] if getattr(model, "peft_config", None) else None
    return mixed_batch(model, names, strict=False)


def emit_prompt_logprobs(seq: Sequence, logits: torch.Tensor) -> None:
    """Each prompt token's logprob given the tokens before it (none for the first), as `echo` and
    `prompt_logprobs` return them."""
    entries: list[Entry | None] = [None]
    for t in range(1, len(seq.prompt)):
        logp = torch.log_softmax(logits[t - 1].float(), -1)
        entries.append(entry(logp, seq.prompt[t], seq.prompt_logprobs))
    seq.emit(PromptLogprobs(entries))


def gather(model, rows: list[tuple], longest: int):
    """A batch cache from the model (its rounding, static addresses or not) with room for 64 more tokens per row;
    each row's tokens (cache, row, count) and recurrent states copied in, right-aligned to the longest."""
    cache = model.make_cache(len(rows), longest + 64)
    cache.fill_rows(rows, longest)
    return cache


class Work(concurrent.futures.Future):
    """Something for the engine's thread to do between two steps besides a request (loading an adapter): fn(),
    its result or error through this future."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __call__(self) -> None:
        try:
            self.set_result(self.fn())
        except Exception as e:
            self.set_exception(e)
