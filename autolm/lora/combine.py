"""peft's add_weighted_adapter: a new adapter made of others, by peft's arithmetic (its merge_utils): "linear"
(weighted sums of the A and of the B matrices, same ranks only), "cat" (the weighted A's and the B's stacked: the
exact weighted sum of the deltas, at the sum of the ranks), "svd" (the weighted sum of the deltas, truncated by
SVD to svd_rank), and the pruning variants of linear and svd: TIES, DARE (random, from torch's generator) and
magnitude pruning at `density`."""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F

from ..errors import AdapterError
from . import adapters as A

logger = logging.getLogger("autolm")
_DENSITY = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
COMBINATIONS = ("svd", "linear", "cat", *_DENSITY, *(f"{c}_svd" for c in _DENSITY))


def _prune(t: torch.Tensor, density: float, random: bool) -> torch.Tensor:
    """The largest `density` of t by magnitude (others zero), or a random `density` of it rescaled by 1 / density."""
    if density >= 1:
        logger.warning("density %s >= 1: nothing pruned", density)
        return t
    if density < 0:
        raise AdapterError(f"density must be >= 0, got {density}")
    if random:
        return t * torch.bernoulli(torch.full_like(t, density)) / density
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.reshape(t.shape)


def mix(
    kind: str, tensors: list[torch.Tensor], weights: list[float], density, sign_method: str
) -> torch.Tensor:
    """Weighted combination of same-shaped tensors: a sum ("linear", "svd"), after pruning each (magnitude,
    DARE), and TIES' sign election (the weighted values agreeing with the majority sign, averaged)."""
    kind = kind.removesuffix("_svd")
    if kind in _DENSITY:
        if density is None:
            raise AdapterError(f"combination_type {kind!r} needs a density between 0 and 1")
        tensors = [_prune(t, density, random=kind.startswith("dare")) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    if not kind.endswith("ties"):
        return weighted.sum(0)
    if sign_method not in ("total", "frequency"):
        raise AdapterError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    votes = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    agree = stacked.sign() == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def plan(peft_model, names: list[str], kind: str, svd_rank: int | None) -> tuple[str, int, list[str] | str]:
    """(the combination, the new adapter's rank, its target modules) as peft decides them."""
    for name in names:
        if name not in peft_model.peft_config:
            raise AdapterError(f"no adapter named {name!r} (loaded: {sorted(peft_model.peft_config)})")
        if peft_model.peft_config[name].use_dora:
            raise AdapterError(
                f"adapter {name!r} is a DoRA adapter: add_weighted_adapter combines LoRA adapters"
            )
    kind = "linear" if len(names) == 1 else kind
    if kind not in COMBINATIONS:
        raise AdapterError(f"combination_type must be one of {', '.join(COMBINATIONS)}, got {kind!r}")
    configs = [peft_model.peft_config[n] for n in names]
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if kind in ("linear", *_DENSITY) and len(set(ranks)) != 1:
        raise AdapterError(f"combination_type {kind!r} needs adapters of one rank, got {ranks}")
    rank = sum(ranks) if kind == "cat" else svd_rank or max(ranks) if kind.endswith("svd") else ranks[0]
    model = peft_model._model
    targets = [A.resolved_targets(model, c, n) for c, n in zip(configs, names)]
    targets = [  # the family's default targets (None): the modules the adapter holds
        t
        if t is not None
        else sorted(m for m, layer in model.named_modules() if n in getattr(layer, "lora_A", {}))
        for t, n in zip(targets, names)
    ]
    if all(isinstance(t, str) for t in targets):
        return kind, rank, "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise AdapterError(
            "add_weighted_adapter: adapters whose target_modules mix a pattern and a list of names"
        )
    return kind, rank, sorted({m for t in targets for m in t})


def fill(
    layer, new: str, names: list[str], weights: list[float], kind: str, rank: int, options: dict
) -> None:
    """Set adapter `new`'s A and B in one LoRA layer from the adapters `names` it holds (peft's arithmetic)."""
    present = [(n, w) for n, w in zip(names, weights) if n in layer.lora_A]
    if not present:
        raise AdapterError(f"adapter {new!r}: none of {names} adapts this layer")
    a_new, b_new = layer._factors(new)
    if kind.endswith("svd"):
        deltas = [layer.delta_weight(n, rows=True) for n, _ in present]  # s B A, (out, in) as the rows run
        u, s, vh = torch.linalg.svd(mix(kind, deltas, [w for _, w in present], options["density"],
                                        options["majority_sign_method"]),
                                    full_matrices=options["svd_full_matrices"], driver=options["svd_driver"])  # fmt: skip
        u, vh = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
        if options["svd_clamp"] is not None:
            hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), options["svd_clamp"])
            u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
        a, b = vh, u
    elif kind == "cat":
        a = torch.cat([layer._factors(n)[0].float() * w * layer.scaling[n] for n, w in present])
        b = torch.cat([layer._factors(n)[1].float() for n, _ in present], 1)
        a, b = F.pad(a, (0, 0, 0, rank - a.shape[0])), F.pad(b, (0, rank - b.shape[1]))  # rows of absent ones
    else:  # each A by sign * sqrt(|w s|), each B by sqrt(|w s|): their product weighted by w s
        ws = [w * layer.scaling[n] for n, w in present]
        wa, wb = [math.copysign(math.sqrt(abs(x)), x) for x in ws], [math.sqrt(abs(x)) for x in ws]
        factors = [layer._factors(n) for n, _ in present]
        a = mix(
            kind, [f[0].float() for f in factors], wa, options["density"], options["majority_sign_method"]
        )
        b = mix(
            kind, [f[1].float() for f in factors], wb, options["density"], options["majority_sign_method"]
        )
    with torch.no_grad():
        a_new.copy_(a.to(a_new.dtype)), b_new.copy_(b.to(b_new.dtype))


def add_weighted_adapter(peft_model, names: list[str], weights: list[float], new: str, kind: str,
                         svd_rank: int | None, options: dict) -> None:  # fmt: skip
    """PeftModel.add_weighted_adapter: adapter `new` from `names`, frozen; the active adapter stays active."""
    if new in peft_model.peft_config:
        return
    names, weights = list(names), list(weights)
    if len(names) != len(weights):
        raise AdapterError(f"add_weighted_adapter: {len(names)} adapters but {len(weights)} weights")
    kind, rank, targets = plan(peft_model, names, kind, svd_rank)
    first = peft_model.peft_config[names[0]]
    config = dataclasses.replace(first, r=rank, lora_alpha=rank, target_modules=targets, alpha_pattern={},
                                 rank_pattern={})  # fmt: skip
    peft_model._add(config, new)
    for layer in A.lora_layers(peft_model._model):
        if new in layer.lora_A:
            fill(layer, new, names, weights, kind, rank, options)
    for pname, p in peft_model._model.named_parameters():
        if A.of_adapter(pname, new):
            p.requires_grad_(False)
