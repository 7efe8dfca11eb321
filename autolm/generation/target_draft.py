"""Candidates from a draft model that reads the target's state rather than the tokens alone (Gemma 4's assistant,
models.gemma4_assistant), as transformers' SinglePositionMultiTokenCandidateGenerator drafts them. Such a draft
declares it with `reads_target = True` and names the target's layers whose keys and values it attends over with
`shared_kv_layers(target)` (layer type -> layer index); it has no cache or prompt pass of its own. Each drafting
step runs it at the newest token's position over:

- the target's (scaled) embedding of the last token beside a hidden state: first the target's last hidden state
  (its final norm's output) at the token before the newest one, then the draft's own previous output;
- the target's keys and values of those layers, read from its cache as transformers' DynamicCache hands them over
  after the target's last forward (`_shared_kv`): a full layer's over the tokens before the newest one, and after
  a round that rejected a candidate also the slot of the first rejected candidate (transformers cuts the keys to
  the sequence's length, not to what the target verified); a sliding layer's from window - 1 tokens before that
  forward's first token up to its last, rejected candidates included, of which the draft's mask keeps the last
  window + 1.

It drafts up to num_assistant_tokens (the draft's generation config, else generate()'s, else 20) by argmax of its
logits, processors unapplied, as transformers does. When sampling, the drafted tokens' distribution is the
deterministic one they came from, so speculative sampling keeps each token distributed as plain sampling's
(transformers instead weighs them by the softmax of the draft's logits). One row only, as transformers."""

from __future__ import annotations

import torch

from ..errors import GenerationError
from .candidates import Candidates, _none
from .config import GenerationConfig


def reads_target(model) -> bool:
    """Whether a draft model (or a peft wrapper of one) drafts from the target's state."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "reads_target", False))


class TargetDraft:
    """The candidate source (propose / accepted, as candidates.Draft) for a draft that reads the target's state;
    speculative.speculative_round hands it the target's last hidden states after each verification (`follow`)."""

    reads_target = True

    def __init__(self, draft, run, prefill_hidden: torch.Tensor):
        if run.ids.shape[0] != 1:
            raise GenerationError(f"assistant_model {type(draft).__name__} drafts from the target's state for one "
                                  f"row at a time, got a batch of {run.ids.shape[0]}")  # fmt: skip
        self.model = draft
        self.base = draft.get_base_model() if hasattr(draft, "get_base_model") else draft
        self.layers = self.base.shared_kv_layers(run.model)
        own = getattr(self.base, "generation_config", None) or GenerationConfig()
        given = (own.num_assistant_tokens, run.cfg.num_assistant_tokens, 20)
        self.num = next(int(v) for v in given if v is not None)
        self.hidden = prefill_hidden[:, -1:]  # the target's last hidden state before the newest token
        self.span = (run.cache.length - prefill_hidden.shape[1], run.cache.length)  # the last forward's slots
        self.at = run.ids.shape[1] + 1  # the sequence length `hidden` goes with: the prefill's token emitted

    def propose(self, run, limit: int) -> Candidates:
        L = run.ids.shape[1]
        limit = min(limit, self.num)
        if limit <= 0 or self.at != L:  # a token decoded without verification: the hidden state is stale
            return _none(1, run.ids.device)
        kv = self._shared_kv(run, L)
        mask = torch.cat([run.mask, run.mask.new_ones(1, 1)], 1)
        device = self.base.pre_projection.weight.device
        position = torch.tensor([[L - 1]], dtype=torch.long, device=device)
        embed, hidden, token = run.model.model.embed, self.hidden, run.ids[:, -1:]
        width = run.model.config.hidden_size
        tokens = []
        for _ in range(limit):
            x = torch.cat([embed(token)[..., :width], hidden.to(token.device)], -1)
            out = self.model(inputs_embeds=x, attention_mask=mask, position_ids=position, shared_kv_states=kv)
            token, hidden = out.logits.argmax(-1).to(run.ids.device), out.last_hidden_state
            tokens.append(token)
        self.span = (run.cache.length, run.cache.length + limit + 1)  # what the verifying forward writes
        drafted = torch.cat(tokens, 1)
        V = run.model.config.vocab_size
        scores = torch.full((1, limit, V), -float("inf"), device=run.ids.device)
        scores.scatter_(2, drafted[..., None], 0.0)  # the argmax draft's own (one-hot) distribution
        return Candidates(drafted, torch.full((1,), limit, dtype=torch.long, device=run.ids.device), scores)

    def _shared_kv(self, run, length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The target's keys and values by layer type as transformers' candidate generator passes them: what its
        cache returned in the last forward (a sliding layer's: from window - 1 slots before the forward's
        first), cut to the first `length` of them."""
        start, end = self.span
        out = {}
        for kind, i in self.layers.items():
            window = run.model.config.layer_window(i)
            first = 0 if window is None else max(0, start - window + 1)
            last = min(end, first + length)
            out[kind] = (run.cache.keys[i][:, :, first:last], run.cache.values[i][:, :, first:last])
        return out

    def accepted(self, n: int, k: int) -> None:
        """Nothing to keep: the draft has no cache; `follow` brings the next round's hidden state."""

    def follow(self, hidden: torch.Tensor, n: int, run) -> None:
        """After a verification that accepted n candidates: the target's last hidden states there (1, k + 1, h)
        give the one at the last accepted token, which the next round reads once the n + 1 tokens are out."""
        self.hidden, self.at = hidden[:, n : n + 1], run.ids.shape[1] + n + 1
