"""MusicGen's decoder-alone generation (transformers' MusicgenForCausalLM.generate): the delay pattern.

Codebook k of a frame is predicted k steps after codebook 0 of that frame. The prompt (batch * K rows) is laid out
shifted k slots right in codebook k over `max_length` slots; slots before a codebook's start and after its end hold
decoder_start_token_id ("P"), the rest are -1, to be predicted (stereo: the two channels' codebooks pair up):

    [P, a, b, -1, -1, P, P, P]
    [P, P, c, d, -1, -1, P, P]

Each step feeds the last slot of the ids with the pattern's fixed tokens written over them (as transformers'
MusicgenForCausalLM, whose cache exists before the first step: the prompt's slots before its last are never read,
its positions start at 0; MusicgenMelodyForCausalLM's feeds the whole prompt first, the model's `whole_prompt`),
takes every row's next token (greedy or sampled, transformers' processors), and the output is the ids under the pattern with every pad_token_id taken out,
shaped (batch, K, length). As transformers: the attention mask (where none is given: ids that are not pad_token_id,
one per batch * K row) is read by its first `batch` rows; beam search and guidance_scale > 1 (it needs the text
encoder's unconditional inputs) are refused; decoder_start_token_id must be set (generation_config.json or an argument).
"""

from __future__ import annotations

import torch

from ..errors import GenerationError
from ..generation.sampling import choose, logits_processors


def delay_pattern(ids: torch.Tensor, K: int, stereo: bool, start: int, max_length: int):
    """transformers' build_delay_pattern_mask: (the prompt's ids up to the first slot to predict (B * K, n),
    the pattern (B * K, max_length), -1 where a token is predicted)."""
    ids = ids.reshape(-1, K, ids.shape[-1])
    B, _, T = ids.shape
    shifted = torch.full((B, K, max_length), -1, dtype=torch.long, device=ids.device)
    channel = K // 2 if stereo else K
    if max_length < 2 * channel - 1:
        return ids.reshape(B * K, -1), shifted.reshape(B * K, -1)
    for k in range(channel):
        rows = (2 * k, 2 * k + 1) if stereo else (k,)
        for r in rows:
            shifted[:, r, k : T + k] = ids[:, r]
    fixed = torch.triu(torch.ones(channel, max_length, dtype=torch.bool), diagonal=max_length - channel + 1)
    fixed = fixed | torch.tril(torch.ones(channel, max_length, dtype=torch.bool))
    if stereo:
        fixed = fixed.repeat_interleave(2, dim=0)
    fixed = fixed.to(ids.device)
    out = torch.where(fixed, torch.full_like(shifted, start), shifted)
    starts = (out[:, 0, :] == -1).nonzero()[:, 1]
    first = int(starts.min()) if len(starts) else T
    return out[..., :first].reshape(B * K, -1), out.reshape(B * K, -1)


def _masked(ids: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """transformers' apply_delay_pattern_mask: the pattern's fixed tokens over the ids."""
    pattern = pattern[..., : ids.shape[-1]]
    return torch.where(pattern == -1, ids, pattern)


def _settings(model, kwargs: dict):
    for key in ("encoder_hidden_states", "encoder_attention_mask", "encoder_outputs", "inputs_embeds"):
        if kwargs.pop(key, None) is not None:
            raise GenerationError(f"MusicgenForCausalLM.generate: {key} given, but autolm runs MusicGen's decoder "
                                  "alone (no text encoder, no cross-attention): pass input_ids")  # fmt: skip
    start = kwargs.pop("decoder_start_token_id", None)
    cfg = model._generation_config(kwargs.pop("generation_config", None), kwargs)
    if (cfg.num_beams or 1) > 1:
        raise GenerationError("MusicgenForCausalLM.generate: num_beams > 1 (beam search), which transformers' "
                              "MusicGen does not run either: greedy or sampling only")  # fmt: skip
    if cfg.guidance_scale is not None and cfg.guidance_scale > 1:
        raise GenerationError("MusicgenForCausalLM.generate: guidance_scale > 1 needs the text encoder's "
                              "unconditional inputs, which autolm does not run")  # fmt: skip
    if start is None:  # generation_config.json's (autolm's GenerationConfig keeps it among its extra keys)
        own = getattr(model, "generation_config", None)
        start = getattr(own, "decoder_start_token_id", None) or getattr(own, "extra", {}).get(
            "decoder_start_token_id"
        )
    if start is None:
        raise GenerationError("MusicgenForCausalLM.generate: decoder_start_token_id is not set (the delay pattern's "
                              "pad token): pass it, or give the checkpoint's generation_config.json")  # fmt: skip
    return cfg, start


@torch.no_grad()
def delay_pattern_generate(self, inputs=None, attention_mask=None, generator=None, **kwargs):
    """Prompt ids (batch * num_codebooks, T) -> (batch, num_codebooks, length) as transformers' generate returns
    them (see the module docstring)."""
    ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    if ids is None:
        raise GenerationError(
            "MusicgenForCausalLM.generate needs input_ids of shape (batch * num_codebooks, T)"
        )
    cfg, start = _settings(self, kwargs)
    K, T = self.config.num_codebooks, ids.shape[-1]
    if ids.dim() != 2 or ids.shape[0] % K:
        raise GenerationError(
            f"input_ids must have shape (batch * num_codebooks, T), found {tuple(ids.shape)}"
        )
    B, pad = ids.shape[0] // K, cfg.pad_token_id
    max_length = T + cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length
    if attention_mask is None:
        attention_mask = (
            ids.ne(pad).long() if pad is not None and bool((ids == pad).any()) else torch.ones_like(ids)
        )
    mask = attention_mask[
        :B
    ]  # transformers' mask functions read the first `batch` rows of the (batch * K) mask
    ids, pattern = delay_pattern(ids, K, self.config.audio_channels == 2, start, max_length)
    processors = logits_processors(cfg, ids.shape[-1], device=ids.device)
    eos = cfg.eos_ids if hasattr(cfg, "eos_ids") else []
    unfinished = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
    cache, seen = None, 0
    while ids.shape[-1] < max_length:
        # as transformers' MusicgenForCausalLM: its cache exists before the first step, so every step, the first
        # too, feeds the last slot alone (the prompt's earlier slots are never read; `whole_prompt`: Melody's
        # feeds the whole prompt first); the mask's first columns cover the keys
        step = _masked(ids, pattern)[:, -1 if cache is not None or not self.whole_prompt else 0 :]
        out = self(
            step, attention_mask=mask[:, : seen + step.shape[-1]], past_key_values=cache, use_cache=True
        )
        cache, seen = out.past_key_values, seen + step.shape[-1]
        scores = processors(ids, out.logits[:, -1].float())
        token = choose(scores, cfg, generator)
        if eos and pad is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad))
        ids = torch.cat([ids, token[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1)
        if eos:
            unfinished &= ~torch.isin(token, torch.tensor(eos, device=token.device))
            if not bool(unfinished.any()):
                break
    ids = _masked(ids, pattern)
    return ids[ids != pad].reshape(B, K, -1)
