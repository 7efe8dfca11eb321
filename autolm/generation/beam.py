"""Beam search with transformers' semantics, vectorised over batch and beams."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import GenerationConfig
from .decode import max_new_tokens
from .sampling import process_logits


@torch.inference_mode()
def beam_search(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: GenerationConfig, processors: list = ()
) -> torch.Tensor:
    """Vectorised beam search with transformers' semantics (length penalty, early stopping, EOS)."""
    nb, B, P = cfg.num_beams, input_ids.shape[0], input_ids.shape[1]
    steps = max_new_tokens(cfg, P)
    max_len = P + steps
    dev = input_ids.device
    eos = torch.tensor(cfg.eos_ids, device=dev, dtype=torch.long)
    keep_k = max(2, 1 + len(eos)) * nb
    top_nb = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep_k - nb, dtype=torch.bool)]).to(dev)
    fill = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids[0] if cfg.eos_ids else -1)

    def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # t (B, k, ...) by idx (B, k')
        return torch.gather(
            t, 1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
        )

    running = torch.full((B, nb, max_len), fill, dtype=torch.long, device=dev)
    running[:, :, :P] = input_ids[:, None]
    sequences = running.clone()
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = -1e9
    scores = torch.full((B, nb), -1e9, device=dev)
    finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    gen_len = torch.zeros(B, nb, dtype=torch.long, device=dev)  # generated length of each finished beam

    mask = attention_mask.repeat_interleave(nb, 0)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = model.make_cache(B * nb, max_len)
    logits = model(
        input_ids.repeat_interleave(nb, 0),
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        logits_to_keep=1,
    ).logits[:, -1]
    next_pos = positions[:, -1:] + 1
    cur = P
    while True:
        flat = running[:, :, :cur].reshape(B * nb, cur)
        logp = F.log_softmax(logits.float(), dim=-1)
        logp = process_logits(logp, flat, cfg, cur - P, keep=len(eos) + 1, processors=processors)
        V = logp.shape[-1]
        logp = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        if cfg.do_sample:
            idx = torch.multinomial(logp.softmax(-1), keep_k)
            top_logp = torch.gather(logp, 1, idx)
        else:
            top_logp, idx = torch.topk(logp, keep_k)
        beam_idx, tok = idx // V, idx % V
        top_seqs = gather(running, beam_idx)
        top_seqs[:, :, cur] = tok
        hits = torch.isin(tok, eos) if len(eos) else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= max_len:
            hits = torch.ones_like(hits)
        # Running beams for the next step: the best continuations that did not stop.
        run_logp = top_logp + hits.float() * -1e9
        nxt = torch.topk(run_logp, nb)[1]
        running, running_scores = gather(top_seqs, nxt), gather(run_logp, nxt)
        parent = gather(beam_idx, nxt)  # which old beam each new running beam continues
        # Finished beams: merge the new finished candidates (top nb only) with the kept ones.
        just_done = hits & top_nb[None]
        cand = top_logp / ((cur + 1 - P) ** cfg.length_penalty)
        full = finished.all(-1, keepdim=True) & (cfg.early_stopping is True)
        cand = cand + full.float() * -1e9 + (~improvable).float() * -1e9 + (~just_done).float() * -1e9
        m_seqs = torch.cat([sequences, top_seqs], 1)
        m_scores = torch.cat([scores, cand], 1)
        m_fin = torch.cat([finished, just_done], 1)
        m_len = torch.cat([gen_len, torch.full_like(tok, cur + 1 - P)], 1)
        best = torch.topk(m_scores, nb)[1]
        sequences, scores, finished, gen_len = (
            gather(m_seqs, best),
            gather(m_scores, best),
            gather(m_fin, best),
            gather(m_len, best),
        )
        cur += 1
        # Can a running beam still beat the worst finished one?
        if cfg.early_stopping == "never" and cfg.length_penalty > 0:
            best_len = max_len - P
        else:
            best_len = cur - P
        best_running = running_scores[:, :1] / (best_len**cfg.length_penalty)
        worst_done = torch.where(finished, scores.min(1, keepdim=True)[0], torch.tensor(-1e9, device=dev))
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        go_on = (
            bool(improvable.any())
            and not (bool(finished.all()) and cfg.early_stopping is True)
            and not bool(hits.all())
        )
        if not go_on:
            break
        flat_parent = (parent + torch.arange(B, device=dev)[:, None] * nb).view(-1)
        cache.reorder(flat_parent)
        mask = torch.cat([mask.index_select(0, flat_parent), mask.new_ones(B * nb, 1)], dim=1)
        next_pos = next_pos.index_select(0, flat_parent)
        logits = model(
            running[:, :, cur - 1].reshape(B * nb, 1),
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
        ).logits[:, -1]
        next_pos = next_pos + 1
    n = cfg.num_return_sequences
    out_len = P + int(gen_len[:, :n].max())
    return sequences[:, :n, :out_len].reshape(B * n, out_len)
