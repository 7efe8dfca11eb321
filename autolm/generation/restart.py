"""A KV cache made stale by the sequence's own growth, recomputed as transformers recomputes it.

LongRoPE (Phi-3.5, Phi-4-mini) rotates every position with its short factors while the sequence is at most
original_max_position_embeddings long and with its long factors beyond. The keys cached before the sequence
first grows past that length were rotated with the short ones; transformers' Phi-3 then drops its cache and runs
the whole sequence again (its prepare_inputs_for_generation), once. Generation does the same here, so tokens
match transformers' across the switch.
"""

from __future__ import annotations

import torch


def switch_length(model) -> int | None:
    """The sequence length at which the model's RoPE tables change for every position (nn.Rotary.switch_length);
    None where they never do."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rotary = getattr(getattr(base, "model", None), "rotary", None)
    return rotary.switch_length() if rotary is not None else None


def is_stale(model, cache, length: int) -> bool:
    """Whether the cache, about to hold `length` slots, was filled before the model's RoPE switch point that
    `length` reaches (see nn.Rotary.switch_length)."""
    switch = switch_length(model)
    return switch is not None and length >= switch and cache.length < switch


def room_before_switch(model, cached: int) -> int | None:
    """How many tokens one forward may add to `cached` cached ones and stay below the switch (speculative rounds
    stop short of it: the one-token step that crosses it recomputes the sequence); None: no limit."""
    switch = switch_length(model)
    return None if switch is None or cached >= switch else switch - 1 - cached


def recompute(model, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """Empty the cache and run the whole sequence ids (B, L) under its padding mask (B, L) again; returns the
    last position's logits (B, V)."""
    cache.length = 0
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
    return out.logits[:, -1]
