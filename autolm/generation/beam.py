"""Beam search with transformers' semantics (length penalty, early stopping, EOS, stopping criteria),
vectorised over batch and beams, returning transformers' beam outputs (sequences_scores, scores,
beam_indices)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import GenerationError
from .config import GenerationConfig
from .decode import new_token_budget
from .restart import is_stale, recompute
from .sampling import logits_processors
from .stopping import build_criteria

NEG = -1.0e9  # transformers' "never choose this" score


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, k, ...) indexed along dim 1 by idx (B, k')."""
    return torch.gather(t, 1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))


@dataclass
class BeamOutput:
    """What beam search returns, flattened to (B * num_return_sequences, ...) as transformers does."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor
    beam_indices: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None
    logits: tuple[torch.Tensor, ...] | None
    past_key_values: Any
    # per step, the forward's per-layer outputs over the running beams (B * num_beams rows), where asked
    hidden_states: tuple | None = None
    attentions: tuple | None = None


class Beams:
    """The running beams (best continuations still open) and the finished ones of every prompt."""

    def __init__(self, cfg: GenerationConfig, input_ids: torch.Tensor, max_len: int):
        B, P = input_ids.shape
        nb, dev, eos = cfg.num_beams, input_ids.device, cfg.eos_ids
        self.cfg, self.B, self.P, self.nb, self.max_len = cfg, B, P, nb, max_len
        self.keep_k = max(2, 1 + len(eos)) * nb  # enough candidates that nb can continue after EOS hits
        self.top_nb = (torch.arange(self.keep_k, device=dev) < nb)[None]
        # transformers' filler: pad_token_id (unless 0) or the first EOS; -1 without EOS.
        fill = (cfg.pad_token_id or eos[0]) if eos else -1
        self.running = torch.full((B, nb, max_len), fill, dtype=torch.long, device=dev)
        self.running[:, :, :P] = input_ids[:, None]
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros(B, nb, device=dev)
        self.running_scores[:, 1:] = NEG
        self.running_indices = torch.full((B, nb, max_len - P), -1, dtype=torch.int32, device=dev)
        self.indices = self.running_indices.clone()
        self.scores = torch.full((B, nb), NEG, device=dev)
        self.finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
        self.parent = None  # (B * nb,) the flat row each running beam continues, after a step

    def step(self, logp: torch.Tensor, cur: int, criteria, history, generator=None) -> bool:
        """Extend the beams by one token from processed log-probs (B * nb, V); False when search ends."""
        B, nb, P, cfg = self.B, self.nb, self.P, self.cfg
        V = logp.shape[-1]
        logp = (logp.view(B, nb, V) + self.running_scores[:, :, None]).view(B, nb * V)
        if cfg.do_sample:
            idx = torch.multinomial(logp.softmax(-1), self.keep_k, generator=generator)
            top_logp = torch.gather(logp, 1, idx)
        else:
            top_logp, idx = torch.topk(logp, self.keep_k)
        beam, tok = idx // V, idx % V
        top_seqs = _gather(self.running, beam)
        top_seqs[:, :, cur] = tok
        top_indices = _gather(self.running_indices, beam)
        top_indices[:, :, cur - P] = (beam + torch.arange(B, device=beam.device)[:, None] * nb).int()
        hits = criteria(top_seqs[:, :, : cur + 1].reshape(B * self.keep_k, cur + 1), history).view(B, -1)
        # Running beams for the next step: the best continuations that did not stop.
        run_logp = top_logp + hits.float() * NEG
        nxt = torch.topk(run_logp, nb)[1]
        self.running, self.running_scores = _gather(top_seqs, nxt), _gather(run_logp, nxt)
        self.running_indices = _gather(top_indices, nxt)
        self.parent = (_gather(beam, nxt) + torch.arange(B, device=beam.device)[:, None] * nb).view(-1)
        self._merge_finished(top_seqs, top_logp, top_indices, hits & self.top_nb, cur)
        self._check_improvable(cur + 1)
        return (
            bool(self.improvable.any())
            and not (bool(self.finished.all()) and cfg.early_stopping is True)
            and not bool(hits.all())
        )

    def _merge_finished(self, seqs, logp, indices, just_done, cur: int) -> None:
        """Keep the nb best finished beams: the kept ones and the candidates that just finished."""
        cfg = self.cfg
        cand = logp / ((cur + 1 - self.P) ** cfg.length_penalty)
        full = self.finished.all(-1, keepdim=True) & (cfg.early_stopping is True)
        cand = cand + full.float() * NEG + (~self.improvable).float() * NEG + (~just_done).float() * NEG
        best = torch.topk(torch.cat([self.scores, cand], 1), self.nb)[1]
        self.sequences = _gather(torch.cat([self.sequences, seqs], 1), best)
        self.scores = _gather(torch.cat([self.scores, cand], 1), best)
        self.indices = _gather(torch.cat([self.indices, indices], 1), best)
        self.finished = _gather(torch.cat([self.finished, just_done], 1), best)

    def _check_improvable(self, cur: int) -> None:
        """Can a running beam still beat the worst finished one? (transformers' early-stop heuristic)"""
        cfg = self.cfg
        if cfg.early_stopping == "never" and cfg.length_penalty > 0:
            best_len = self.max_len - self.P
        else:
            best_len = cur - self.P
        best_running = self.running_scores[:, :1] / (best_len**cfg.length_penalty)
        worst_done = torch.where(self.finished, self.scores.min(1, keepdim=True)[0], NEG)
        self.improvable = self.improvable & (best_running > worst_done).any(-1, keepdim=True)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequences, sequences_scores, beam_indices) of the num_return_sequences best, cut to the longest."""
        n = self.cfg.num_return_sequences
        indices = self.indices[:, :n].reshape(self.B * n, -1)
        longest = int((indices + 1).bool().sum(dim=1).max())
        sequences = self.sequences[:, :n, : self.P + longest].reshape(self.B * n, -1)
        return sequences, self.scores[:, :n].reshape(-1), indices[:, :longest]


@torch.inference_mode()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: GenerationConfig,
    processors: Sequence[Callable] = (),
    stopping_criteria: Sequence[Callable] = (),
    tokenizer=None,
    generator: torch.Generator | None = None,
    prefix_allowed_tokens_fn: Callable | None = None,
    inputs_embeds: torch.Tensor | None = None,
    *,
    guidance: Callable | None = None,
    prompt_inputs: dict | None = None,
    cache=None,
) -> BeamOutput:
    """Vectorised beam search: the logits processors run on each beam's log-probabilities, as in transformers.
    inputs_embeds (B, P', hidden): the first forward's input, input_ids then what the sequences start from (see
    decode.embeds_prompt); prompt_inputs: the first forward's other arguments; cache: an empty (quantized) one."""
    cfg = cfg.with_defaults()
    nb, (B, P) = cfg.num_beams, input_ids.shape
    budget = new_token_budget(cfg, P, model.config.max_position_embeddings)
    max_len = P + budget
    mask = attention_mask.repeat_interleave(nb, 0)
    procs = logits_processors(
        cfg, P, processors, prefix_allowed_tokens_fn, mask, max_len, input_ids.device, guidance,
        vocab_size=model.config.get_text_config().vocab_size,
    )  # fmt: skip
    criteria = build_criteria(cfg, tokenizer, stopping_criteria, max_length=max_len)
    beams = Beams(cfg, input_ids, max_len)
    keep_scores = bool(cfg.return_dict_in_generate and cfg.output_scores)
    keep_logits = bool(cfg.return_dict_in_generate and cfg.output_logits)
    layers = cfg.returned_layers()  # each step's forward outputs per layer, where generate() returns them
    scores, raw_logits, states = [], [], []
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    capacity = mask.shape[1] + budget
    cache = model.make_cache(B * nb, capacity) if cache is None else cache.ensure_for(model, B * nb, capacity)
    first = {"input_ids": input_ids.repeat_interleave(nb, 0)}
    if inputs_embeds is not None:
        first = {"inputs_embeds": inputs_embeds.to(model.device).repeat_interleave(nb, 0)}
    first.update({k: v.repeat_interleave(nb, 0) for k, v in (prompt_inputs or {}).items()})
    out = model(**first, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1,
                **layers)  # fmt: skip
    logits, pos, cur = out.logits[:, -1], positions[:, -1:] + 1, P
    while True:
        if layers:
            states.append((out.hidden_states, out.attentions))
        flat = beams.running[:, :, :cur].reshape(B * nb, cur)
        logp = procs(flat, F.log_softmax(logits.float(), dim=-1))
        if keep_scores:
            scores.append(logp)
        if keep_logits:
            raw_logits.append(logits.float())
        go_on = beams.step(logp, cur, criteria, tuple(scores) if keep_scores else None, generator)
        cur += 1
        if not go_on:
            break
        cache.reorder(beams.parent)
        mask = torch.cat([mask.index_select(0, beams.parent), mask.new_ones(B * nb, 1)], dim=1)
        pos = pos.index_select(0, beams.parent)
        tokens = beams.running[:, :, cur - 1].reshape(B * nb, 1)
        if is_stale(model, cache, mask.shape[1]):  # LongRoPE's switch: the whole sequence again
            if inputs_embeds is not None or layers:
                raise GenerationError("beam search from inputs_embeds or with output_hidden_states / "
                                      "output_attentions cannot cross LongRoPE's switch length")  # fmt: skip
            logits = recompute(model, beams.running[:, :, :cur].reshape(B * nb, cur), mask, cache)
        else:
            out = model(tokens, attention_mask=mask, position_ids=pos, past_key_values=cache, **layers)
            logits = out.logits[:, -1]
        pos = pos + 1
    sequences, sequences_scores, beam_indices = beams.result()
    return BeamOutput(
        sequences,
        sequences_scores,
        beam_indices,
        tuple(scores) if keep_scores else None,
        tuple(raw_logits) if keep_logits else None,
        cache,
        *_per_step(states, layers),
    )


def _per_step(states: list, asked: dict[str, bool]) -> tuple[tuple | None, tuple | None]:
    """(hidden_states, attentions) per step, each as asked, from the steps' (hidden states, attentions)."""
    return (
        tuple(h for h, _ in states) if asked.get("output_hidden_states") else None,
        tuple(a for _, a in states) if asked.get("output_attentions") else None,
    )
