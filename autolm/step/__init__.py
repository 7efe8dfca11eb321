"""The decode step, chosen in one place: how generation computes the next token's logits.

Every step is derived from the model's own modules, never a second copy of its layers:

- `OneTokenStep`: one new token per row on the CPU, the rows' real tokens ending at the same cache slot (one
  sequence, or a left-padded batch as generate() and the server lay them out). The model's layers run under
  a `OneToken` context (no masks beyond each row's first real slot, the cache written and read in place,
  fp32 attention); where graphs compiled ahead of time for this exact model structure are cached
  (`precompile`, or any earlier process), each layer is one call of a compiled graph instead (graphs.py).
- the torch.compile'd step (`compile_decode`): the general forward over the cache's whole capacity, compiled
  by inductor (CUDA graphs on GPUs), for any batch.
- otherwise the general forward, one token per row.

`decoder(model, cache, attention_mask)` picks one for a generation from what the model declares and what the
inputs are; a model's `decode_mode` ("auto", "eager" to keep to eager steps, "forward" for the general forward
every time) and AUTOLM_EAGER=1 (no compiled graphs) override it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..errors import GenerationError
from ..kernels import native
from ..nn import OneToken, pad_mask_to
from . import graphs

_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (signature, compiled plan or None)
_BATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the same for plans of 2 rows and more
_PLAIN = (torch.Tensor, nn.Parameter)


def _signature(model: nn.Module) -> tuple:
    """The modules and where their tensors live: a replaced module or weight makes a compiled plan stale."""
    return tuple(
        (id(m), *(t.data_ptr() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None))
        for m in model.modules()
    )


def _hooked(model: nn.Module) -> bool:
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules()
    )


def _per_row(model: nn.Module) -> bool:
    """Whether a module computes each row its own way for now (a mixed batch of LoRA adapters): the compiled
    graphs hold the modules as they were traced, so the step runs eagerly."""
    return any(getattr(m, "row_adapters", None) is not None for m in model.modules())


def row_starts(cache, attention_mask) -> torch.Tensor | bool | None:
    """Each row's first real cache slot where the rows are left-padded (zeros, then ones, as wide as the cache
    holds); None where every slot is real; False where the mask has another shape (only masks serve it)."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, : cache.length].bool()
    if mask.shape[1] != cache.length or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        return False  # right padding, holes, or a mask that does not cover the cache
    pads = (~mask).sum(-1)
    return pads if bool(pads.any()) else None


def one_token_model(model) -> bool:
    """Whether the model's layers form a plain stack the one-token step may run."""
    return getattr(model, "one_token_step", True)


def compilable(model) -> bool:
    """Whether the compiled one-token graphs can serve the model: its layers each run on their own buffers and
    recurrent state, and whatever else they read from the context the same for every layer (graphs.context_inputs;
    not one whose layers take per-layer inputs or read another layer's cache)."""
    return one_token_model(model) and getattr(model, "compiled_graphs", True)


def _one_token_ok(model, cache, attention_mask) -> bool:
    """Whether the one-token step gives this generation the general forward's results (not on a cache that only
    the forward's update() may write: a quantized one)."""
    if getattr(model, "decode_mode", "auto") == "forward" or not one_token_model(model):
        return False
    if getattr(cache, "appends_only", False):
        return False
    if (
        getattr(model, "hf_device_map", None)
        or torch.is_grad_enabled()
        or row_starts(cache, attention_mask) is False
    ):
        return False
    tensors = [*model.parameters(), *model.buffers()]
    return all(type(t) in _PLAIN and t.device.type == "cpu" for t in tensors)


def compiled_plan(model, compile_missing: bool = False, progress: bool = False, batched: bool = False):
    """The model's compiled one-token plan (one row, or `batched`: 2 rows and more) if its graphs are cached (or
    compile_missing compiles them), else None; remembered per model until its modules or weights change."""
    if not compilable(model):
        return None
    plans = _BATCHED if batched else _PLANS
    sig = _signature(model)
    cached = plans.get(model)
    if cached is None or cached[0] != sig or (compile_missing and cached[1] is None):
        with torch.inference_mode(False), torch.no_grad():
            plan = graphs.build(model, compile_missing, progress, batched)
        cached = (sig, plan)
        plans[model] = cached
    return cached[1]


def precompile(model, progress: bool = False, batched: bool = False) -> bool:
    """Compile (or load) the one-token step's graphs ahead of time (with `batched`, those for many rows too);
    see CausalLM.precompile_decode."""
    params = [*model.parameters(), *model.buffers()]
    if (
        not compilable(model)
        or getattr(model, "hf_device_map", None)
        or not all(type(t) in _PLAIN and t.device.type == "cpu" for t in params)
    ):
        return False
    native.available()  # autolm's C++ kernels too, which the eager step runs where they are built
    one = compiled_plan(model, compile_missing=True, progress=progress) is not None
    return one and (not batched or compiled_plan(model, True, progress, batched=True) is not None)


def forget_plans(model) -> None:
    """Look the model's compiled plans up again at the next generation (graphs another process compiled since
    the last lookup found none, and maybe autolm's C++ kernels, which they call)."""
    native.forget_missing()
    _PLANS.pop(model, None)
    _BATCHED.pop(model, None)


def install_plan(model, plan, batched: bool = False) -> None:
    """Use `plan` (graphs.build's or graphs.exported's) for this model's one-token step until it changes."""
    (_BATCHED if batched else _PLANS)[model] = (_signature(model), plan)


class OneTokenStep:
    """The next token's logits for each row, from the model's layers under a OneToken context (compiled graphs
    when a plan is given). `starts`: each row's first real slot (None: all slots are real)."""

    def __init__(self, model, plan, starts: torch.Tensor | None = None):
        self.model, self.plan, self.starts = model, plan, starts

    def __call__(
        self, tokens: torch.Tensor, attention_mask, position_ids: torch.Tensor, cache
    ) -> torch.Tensor:
        model, body = self.model, self.model.model
        slot = cache.length
        cache.reserve(slot + 1)
        if getattr(body, "slot_positions", False):  # positions are the cache's slots (BART's decoders)
            position_ids = torch.full_like(position_ids, slot)
        x = body.scale_inputs(body.embed(tokens), position_ids)
        tables = body.rotary.slot_tables(position_ids, torch.full((1,), slot, device=x.device), x.dtype)
        if self.plan is not None:
            inputs = graphs.context_inputs(body, x)
            logits = graphs.run(self.plan, x, tables, cache, slot, self.starts, inputs)
        else:
            ctx = OneToken(
                tables, cache.keys, cache.values, slot + 1, starts=self.starts, states=cache.states
            )
            logits = model.logits(body.run(x, ctx))
        cache.length = slot + 1
        return logits[:, -1]


def decoder(model, cache, attention_mask: torch.Tensor | None = None) -> Callable:
    """The step for this generation: step(tokens (B, 1), attention_mask (B, L), position_ids (B, 1), cache)
    -> logits (B, V). `model` may be a wrapper (a PeftModel); its base model's modules run."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.decode_step is not None and not getattr(cache, "appends_only", False):
        return lambda tokens, mask, positions, c: _static_step(base, tokens, mask, positions, c)
    if _one_token_ok(base, cache, attention_mask):
        eager = getattr(base, "decode_mode", "auto") == "eager" or os.environ.get("AUTOLM_EAGER", "0") != "0"
        plan = (
            None
            if eager or _hooked(base) or _per_row(base)
            else compiled_plan(base, batched=cache.batch_size > 1)
        )
        return OneTokenStep(base, plan, row_starts(cache, attention_mask))
    return lambda tokens, mask, positions, c: model(
        tokens, attention_mask=mask, position_ids=positions, past_key_values=c
    ).logits[:, -1]


def compiled_step(model, x, attention_mask, position_ids, cache, cache_position) -> torch.Tensor:
    """One token per row over the cache's whole capacity (every shape fixed by the cache): what compile_decode
    compiles."""
    h = model.model(x, attention_mask, position_ids, cache, cache_position, cache.capacity)
    return model.logits(h)


def _static_step(model, tokens, attention_mask, position_ids, cache) -> torch.Tensor:
    x = model.model.embed(tokens)
    B = x.shape[0]
    past = cache.length
    if past + 1 > cache.capacity:
        raise GenerationError(
            f"the compiled decode step's cache holds {cache.capacity} tokens; {past + 1} needed"
        )
    mask = attention_mask if attention_mask is not None else torch.ones(B, past + 1, dtype=torch.long)
    cache_position = torch.arange(past, past + 1, device=x.device)
    logits = model.decode_step(
        x, pad_mask_to(mask.to(x.device), cache.capacity), position_ids, cache, cache_position
    )
    cache.length = past + 1
    return logits[:, -1]


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
    devices = sorted({str(d) for d in (getattr(base, "hf_device_map", None) or {}).values()})
    if len(devices) > 1 or any(hasattr(p, "to_local") for p in base.parameters()):
        raise GenerationError(
            "compile_decode needs the whole model on one device, not spread by a device_map "
            f"({', '.join(devices)}) or sharded across ranks"
        )
    base.decode_step = torch.compile(base.step, **compile_kwargs)
    return model


__all__ = [
    "OneTokenStep",
    "compile_decode",
    "compiled_plan",
    "compiled_step",
    "decoder",
    "forget_plans",
    "precompile",
]
