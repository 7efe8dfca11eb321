"""What the engine tells a request, as typed events: new text, the prompt's log-probabilities, the end, or a
failure. The engine thread calls a sequence's `emit` with one of these; the HTTP side reads them in order."""

from __future__ import annotations

from dataclasses import dataclass, field

# A logprob entry: (token id, its log-probability, its rank in the model's distribution (1 = likeliest),
# [(id, logprob) of the top alternatives]).
Entry = tuple[int, float, int, list[tuple[int, float]]]


@dataclass
class Delta:
    """New output of one sequence: text safe to show, the tokens sampled since the last event, their logprobs."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Entry] = field(default_factory=list)


@dataclass
class PromptLogprobs:
    """Each prompt token's entry given the tokens before it; None for the first, which has no context."""

    entries: list[Entry | None]


@dataclass
class Finished(Delta):
    """The last output of a sequence and its totals. `reason`: "stop", "length" or "abort" (server shutdown);
    `stop_reason`: the stop string or stop token id that ended it (None for EOS or any other reason)."""

    reason: str = "stop"
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's tokens, those taken from the prefix cache
    completion_tokens: int = 0
    cumulative_logprob: float = 0.0
    full_text: str = ""
    all_token_ids: list[int] = field(default_factory=list)


@dataclass
class Failed:
    """The sequence ended with an error inside the engine; the others in its batch go on."""

    message: str


Event = Delta | PromptLogprobs | Finished | Failed
