"""Speculative decoding: several tokens per forward of the model, with transformers' semantics
(`_assisted_decoding`). Candidates come from a draft model (`assistant_model`) or from the sequence itself
(`prompt_lookup_num_tokens`, candidates.py); one forward of the model over the newest token and k candidates
gives k + 1 next-token distributions, and the longest acceptable prefix of the candidates is kept, plus one
token of the model's own:

- greedy: candidates are kept while they equal the model's argmax, so the tokens are greedy decoding's;
- sampling with a draft model: speculative sampling (Leviathan et al. 2023, algorithm 1): a drafted token d
  is kept with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from max(p - q, 0)
  renormalised, after k acceptances from p. Each token is distributed as plain sampling's;
- sampling with prompt lookup (no draft distribution): a token is drawn from p at each position and the
  candidates are kept while they equal the draws.

p and q are the softmax of the processed scores: the generation's one list of logits processors runs on the
draft's logits and on the model's, each position with its own prefix. Rejected candidates are dropped from
the caches by setting their length back: the next forward overwrites those slots, and every forward and the
one-token step read only slots below the length.

Batches: each row accepts its own number of candidates and the batch keeps the smallest (over the rows whose
tokens still count), so the cache keeps one length; a row that accepted more keeps, at the cut, its own
accepted candidate, itself a draw from p.

Recurrent layers (linear attention, state-space layers) hold a state that cannot drop a token: before the
verifying forward the cache is marked (its states copied), and where a candidate was rejected it goes back to the
mark and the accepted tokens run through again; a draft model with such layers does the same with its own cache. Stopping criteria are checked after every token, so generation
stops exactly where plain decoding does (transformers checks once per forward and can run past a stop string).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import GenerationError
from .candidates import Candidates, Draft, PromptLookup
from .restart import room_before_switch
from .sampling import choose
from .target_draft import TargetDraft, reads_target


def check_speculation(model, cfg, assistant_model) -> None:
    """GenerationError for what speculative decoding cannot do, before anything runs."""
    if assistant_model is not None and cfg.prompt_lookup_num_tokens is not None:
        raise GenerationError(
            "assistant_model and prompt_lookup_num_tokens were both given: speculative decoding takes its "
            "candidates from one of them (a draft model, or n-grams of the prompt)"
        )
    what = "assistant_model" if assistant_model is not None else "prompt_lookup_num_tokens"
    if (cfg.num_beams or 1) > 1:
        raise GenerationError(
            f"{what} works with greedy decoding and sampling, not beam search (num_beams > 1)"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "bidirectional_forward", False):
        raise GenerationError(f"{what} cannot be used with {base.config.model_type}: its forward's tokens attend "
                              "each other both ways, so candidates verified together differ from tokens decoded "
                              "one at a time")  # fmt: skip
    if getattr(base, "reference_prompt", False):
        raise GenerationError(f"{what} cannot be used with {base.config.model_type}: autolm does not run its "
                              "reference sliding window with candidates verified together")  # fmt: skip
    if assistant_model is None:
        return
    draft = (
        assistant_model.get_base_model() if hasattr(assistant_model, "get_base_model") else assistant_model
    )
    if not hasattr(draft, "make_cache"):
        raise GenerationError(
            f"assistant_model must be an autolm model (autolm.AutoModelForCausalLM), got {type(draft).__name__}"
        )
    mine, theirs = model.config.vocab_size, draft.config.vocab_size
    if mine != theirs:
        raise GenerationError(
            f"assistant_model has a vocabulary of {theirs} tokens and the model {mine}: the draft model must "
            "use the model's tokenizer"
        )


def speculate(run, logits: torch.Tensor, steps: int, assistant_model=None) -> Iterator:
    """Yield one Step per token, as generate_tokens does, from the prefill's last logits (B, V) on."""
    cfg = run.cfg
    if assistant_model is not None and reads_target(assistant_model):  # drafts from the prefill's state on
        source = TargetDraft(assistant_model, run, run.states[0][-1])
    elif assistant_model is not None:
        source = Draft(assistant_model, run, run.ids.shape[1] + steps)
    else:
        source = PromptLookup(cfg.prompt_lookup_num_tokens, cfg.max_matching_ngram_size or 2, cfg.eos_ids,
                              run.processors)  # fmt: skip
    per_token = bool(cfg.returned_layers())  # the verifying forwards' states, split per token, where asked
    while True:
        raw = run.checked(logits)
        scores = run.processors(run.ids, raw)
        yield run.emit(choose(scores, cfg, run.generator), raw, scores)
        if run.emitted >= steps or run.done:
            return
        # Until a round finds candidates, tokens come one at a time through the fast decode step.
        while (verified := speculative_round(run, source, steps - run.emitted - 1)) is not None:
            tokens, raw, scores = verified
            for i in range(tokens.shape[1]):
                if per_token:  # the verifying forward's row behind this token
                    run.states = run.round_states[i]
                yield run.emit(tokens[:, i], raw[:, i], scores[:, i])
                if run.emitted >= steps or run.done:
                    return
        logits = run.advance(run.ids[:, -1])


def speculative_round(run, source, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Up to `limit` candidates from `source` verified in one forward of run.model after run.ids' newest token:
    the tokens to emit (B, n + 1) with their raw logits and processed scores (B, n + 1, V), the run's cache,
    mask and positions already past them; None where the source found no candidates (nothing ran).
    `run` is generate()'s decode state or any object with its fields (the server's, autolm.serve.speculation)."""
    room = room_before_switch(run.model, run.cache.length)  # LongRoPE's switch: crossed by a one-token step
    found = source.propose(run, limit if room is None else min(limit, room - 1))
    k = found.tokens.shape[1]
    if not k:
        return None
    mark = (
        run.cache.mark() if run.cache.states else None
    )  # recurrent layers: their states before the candidates
    reads = getattr(source, "reads_target", False)  # a draft that reads the target's last hidden states
    raw, scores, hidden = _verify(run, found.tokens, reads)
    tokens, n = _accept(run, found, scores)
    if mark is not None and n < k:
        _replay(run, mark, found.tokens[:, :n])
    _keep(run, n, k)
    source.accepted(n, k)
    if reads:
        source.follow(hidden, n, run)
    return tokens, raw[:, : n + 1], scores[:, : n + 1]


def _verify(run, candidates: torch.Tensor, hidden: bool):
    """One forward of the model over the newest token and the candidates (B, k): raw logits and processed
    scores (B, k + 1, V), position i scored with the prefix that ends at candidate i; with `hidden`, the last
    hidden states (B, k + 1, h) too (else None)."""
    B, k = candidates.shape
    feed = torch.cat([run.ids[:, -1:], candidates], 1)
    run.mask = torch.cat([run.mask, run.mask.new_ones(B, k + 1)], 1)
    positions = run.pos + torch.arange(k + 1, device=run.pos.device)
    asked = run.cfg.returned_layers()
    out = run.model(feed, attention_mask=run.mask, position_ids=positions, past_key_values=run.cache,
                    logits_to_keep=k + 1, **(dict(asked, output_hidden_states=True) if hidden else asked))  # fmt: skip
    if asked:
        run.round_states = _per_token(out, run.mask.shape[1] - k)
    raw = run.checked(out.logits)
    scores = torch.stack(
        [run.processors(torch.cat([run.ids, candidates[:, :i]], 1), raw[:, i]) for i in range(k + 1)], 1
    )
    return raw, scores, out.hidden_states[-1] if hidden else None


def _per_token(out, keys: int) -> list[tuple[tuple | None, tuple | None]]:
    """A verifying forward's hidden states (B, k + 1, h) and attentions (B, heads, k + 1, slots) per layer,
    split per fed token as plain decoding gives them (transformers' _split_model_outputs): token i's row
    (B, 1, h), and its attention over the `keys` + i slots up to its own."""
    n = out.logits.shape[1]
    hidden = [None if out.hidden_states is None else tuple(h[:, i : i + 1] for h in out.hidden_states)
              for i in range(n)]  # fmt: skip
    attentions = [None if out.attentions is None else tuple(a[:, :, i : i + 1, : keys + i] for a in out.attentions)
                  for i in range(n)]  # fmt: skip
    return list(zip(hidden, attentions))


def _replay(run, mark, accepted: torch.Tensor) -> None:
    """A recurrent layer's state cannot drop the rejected candidates: the cache goes back to its `mark` from
    before the verifying forward, and the newest token and the `accepted` candidates (B, n) run through again."""
    n = accepted.shape[1]
    run.cache.restore(mark)
    feed = torch.cat([run.ids[:, -1:], accepted], 1)
    positions = run.pos + torch.arange(n + 1, device=run.pos.device)
    run.model(feed, attention_mask=run.mask[:, : mark[0] + n + 1], position_ids=positions,
              past_key_values=run.cache, logits_to_keep=1)  # fmt: skip


def _keep(run, n: int, k: int) -> None:
    """Of the k candidates just verified keep n (and the newest token before them) in the cache and the
    mask, which cover the same slots."""
    run.cache.length = run.mask.shape[1] - (k - n)
    run.mask = run.mask[:, : run.cache.length]
    run.pos = run.pos + n + 1


def _accept(run, found: Candidates, scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tokens (B, n + 1) to emit and n, the candidates every counted row accepted."""
    cand, lengths = found.tokens, found.lengths
    B, k = cand.shape
    live = run.live()
    if run.cfg.do_sample and found.scores is not None:
        return _speculative_sampling(run, cand, scores, found.scores, live)
    if run.cfg.do_sample:
        probs = scores.softmax(-1).reshape(B * (k + 1), -1)
        chosen = torch.multinomial(probs, 1, generator=run.generator).view(B, k + 1)
    else:
        chosen = scores.argmax(-1)
    within = torch.arange(k, device=cand.device) < lengths[:, None]
    run_length = ((cand == chosen[:, :k]) & within).long().cumprod(1).sum(1)
    n = int(run_length[live].min()) if bool(live.any()) else 0
    return chosen[:, : n + 1], n


def _speculative_sampling(run, cand, scores, draft_scores, live) -> tuple[torch.Tensor, int]:
    """Algorithm 1 of the speculative decoding paper, per row, cut at the smallest acceptance."""
    k = cand.shape[1]
    p = scores.softmax(-1)  # (B, k + 1, V)
    q = draft_scores.softmax(-1)  # (B, k, V)
    p_i = p[:, :k].gather(2, cand[..., None]).squeeze(2)
    q_i = q.gather(2, cand[..., None]).squeeze(2)
    r = torch.rand(p_i.shape, generator=run.generator, device=p_i.device)
    accepted = (r <= p_i / q_i).long().cumprod(1).sum(1)  # (B,)
    n = int(accepted[live].min()) if bool(live.any()) else 0
    target = p[:, n]
    if n < k:  # rows rejected here draw from what p has beyond q
        residual = (target - q[:, n]).clamp(min=0)
        total = residual.sum(-1, keepdim=True)
        rejected = ((accepted == n) & (total.squeeze(1) > torch.finfo(total.dtype).tiny))[:, None]
        target = torch.where(rejected, residual / total.clamp(min=torch.finfo(total.dtype).tiny), target)
    drawn = torch.multinomial(target, 1, generator=run.generator).squeeze(1)
    if n < k:  # rows that accepted candidate n keep it
        drawn = torch.where(accepted > n, cand[:, n], drawn)
    return torch.cat([cand[:, :n], drawn[:, None]], 1), n
