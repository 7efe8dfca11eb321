"""The token iterator every generation path is built on, and the opt-in compiled decode step."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import GenerationError
from .config import GenerationConfig
from .sampling import StopStrings, choose, process_logits


@dataclass
class Step:
    """One generation step: the chosen tokens (B,), which rows are finished (B,), the raw logits and the
    processed scores (B, V) the tokens were chosen from."""

    token: torch.Tensor
    finished: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor


def prepare_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask.to(input_ids.device)


def max_new_tokens(cfg: GenerationConfig, prompt_len: int) -> int:
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    return max((cfg.max_length or 20) - prompt_len, 0)


def check_context(model, prompt_len: int, new_tokens: int) -> None:
    """GenerationError when prompt + new tokens do not fit the model's context window."""
    limit = model.config.max_position_embeddings
    if prompt_len >= limit or (
        prompt_len + new_tokens > limit and model.config.rope_parameters.get("rope_type") != "dynamic"
    ):
        raise GenerationError(
            f"the prompt has {prompt_len} tokens and {new_tokens} more were asked for, but the "
            f"model's context window is {limit} tokens: shorten the prompt or ask for fewer tokens"
        )


def _stopped(criteria: Sequence[Callable], seqs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Rows that the caller's stopping criteria (callables (ids, scores) -> bool or (B,) bool) end now."""
    done = torch.zeros(seqs.shape[0], dtype=torch.bool, device=seqs.device)
    for c in criteria:
        r = c(seqs, scores)
        done |= torch.as_tensor(r, device=seqs.device).expand(seqs.shape[0]).bool()
    return done


@torch.inference_mode()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    tokenizer=None,
    logits_processor: Sequence[Callable] = (),
    stopping_criteria: Sequence[Callable] = (),
) -> Iterator[Step]:
    """Yield one Step per new token; finished rows get the pad token."""
    cfg = config or GenerationConfig()
    input_ids, attention_mask = prepare_inputs(model, input_ids, attention_mask)
    B, P = input_ids.shape
    steps = max_new_tokens(cfg, P)
    if steps == 0:
        return
    cache = model.make_cache(B, P + steps)
    eos = torch.tensor(cfg.eos_ids, device=input_ids.device, dtype=torch.long)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids[0] if cfg.eos_ids else 0)
    stop = StopStrings(cfg.stop_strings, tokenizer) if cfg.stop_strings else None
    can_finish = bool(len(eos)) or stop is not None or bool(stopping_criteria)
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    seqs = input_ids
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        logits_to_keep=1,
    ).logits[:, -1]
    next_pos = positions[:, -1:] + 1
    for step in range(steps):
        raw = logits.float()
        if not torch.isfinite(raw).all():
            raise GenerationError(
                f"the model produced NaN or infinite logits at step {step} (broken weights, or an "
                "overflow in this dtype: try float32 or bfloat16)"
            )
        scores = process_logits(raw, seqs, cfg, step, processors=logits_processor)
        token = choose(scores, cfg, generator)
        if can_finish:
            token = torch.where(unfinished, token, torch.full_like(token, pad))
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        if len(eos):
            unfinished &= ~torch.isin(token, eos)
        if stop is not None:
            unfinished &= ~stop.hit(seqs[:, P:]).to(unfinished.device)
        if stopping_criteria:
            unfinished &= ~_stopped(stopping_criteria, seqs, scores)
        yield Step(token, ~unfinished, raw, scores)
        if step == steps - 1 or (can_finish and not bool(unfinished.any())):
            return
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        logits = model(
            token[:, None], attention_mask=attention_mask, position_ids=next_pos, past_key_values=cache
        ).logits[:, -1]
        next_pos = next_pos + 1


def compile_decode(model, **compile_kwargs):
    """Opt in to a torch.compile'd decode step; returns the model.

    Generation then runs each new token through the model's `step` (the one forward, over the
    cache's whole capacity under a mask, so every shape is fixed by the cache) compiled by
    inductor: matrix-vector products become fused kernels that read the weights at close to the
    memory bandwidth, and norms, RoPE and attention fuse around them. The cache's buffers have
    static addresses, so `mode="reduce-overhead"` can capture the step in a CUDA graph. The first
    generation pays the compile (cached on disk by inductor), and so does the first one with a new
    batch size or cache capacity. Prefill stays eager. The model must sit on one device, unsharded;
    a PeftModel's base model is compiled, LoRA layers included.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    devices = sorted({str(d) for d in (base.hf_device_map or {}).values()})
    if len(devices) > 1 or any(hasattr(p, "to_local") for p in base.parameters()):
        raise GenerationError(
            "compile_decode needs the whole model on one device, not spread by a device_map "
            f"({', '.join(devices)}) or sharded across ranks"
        )
    base.decode_step = torch.compile(base.step, **compile_kwargs)
    return model
