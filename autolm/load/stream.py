"""The load loop: every checkpoint tensor, under the model's name for it, cast and handed to the placer.

The loop knows sources and placers only through the protocols below; what differs between them (GGUF's
quantized blocks, quantizing while loading, device maps) is theirs to carry.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import CheckpointError
from ..nn import Assembler
from .report import LoadReport

logger = logging.getLogger("autolm")
# Tensors some checkpoints carry that the model computes itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Source(Protocol):
    """Where weights come from (autolm.sources): a config and (file, name, tensor) triples."""

    directory: str
    format: str
    files: list[str]
    dtype_note: str  # how dtype="auto" is decided for this source, for the load report
    slow: bool  # whether loading is slow enough for a progress bar whatever the size

    def config(self, **overrides: Any): ...
    def shapes(self) -> dict[str, tuple[int, ...]] | None: ...
    def tensors(self, keep_blocks: Callable[[str], bool]) -> Iterator[tuple[str, str, torch.Tensor]]: ...
    def generation_config(self, config): ...


class Placer(Protocol):
    """Where each tensor goes (placers.py)."""

    action: str  # "loading", "loading + quantizing", for the progress bar

    def describe(self) -> str: ...
    def setup(self, model: nn.Module) -> None: ...
    def expected(self, model: nn.Module) -> dict[str, tuple[int, ...]]: ...
    def plan(self, model: nn.Module, dtype: torch.dtype) -> None: ...
    def keeps_blocks(self, name: str) -> bool: ...
    def split(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor] | None: ...
    def put(self, name: str, t: torch.Tensor, path: str, zero_copy: bool) -> torch.Tensor: ...
    def finish(self, model: nn.Module, loaded: dict[str, torch.Tensor]) -> nn.Module: ...
    def notes(self) -> list[str]: ...


@dataclass
class _State:
    """What the loop has seen so far."""

    target: torch.dtype | None
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    deeper: int = 0
    planned: bool = False


def layer_index(name: str, prefix: str) -> int:
    """i for '<prefix>.<i>.…' (prefix: the model's layers, 'model.layers'), else -1."""
    m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def stream(model, source: Source, placer: Placer, target, report: LoadReport, strict: bool, check_finite: bool,
           progress: bool, count: int = 0):  # fmt: skip
    """Hand every checkpoint tensor to the placer (cast to the target dtype first); check names and shapes."""
    from tqdm import tqdm

    name0 = os.path.basename(source.files[0])
    bar = tqdm(total=count or None, desc=f"{placer.action} {name0}", unit=" tensors", disable=not progress,
               leave=False)  # fmt: skip
    expected = placer.expected(model)
    state = _State(target)
    rules = model.checkpoint_rules
    assembler = Assembler(expected)  # stacked experts, and tensors a rule assembles (DeepSeek's kv_b_proj)
    for path, stored, whole in source.tensors(placer.keeps_blocks):
        bar.update(1)
        # a fused tensor the model holds in pieces (nn.checkpoint.Split), else the tensor itself
        for name, t in rules.split(stored, whole) or [(stored, whole)]:
            _one(model, placer, expected, state, report, path, name, t, check_finite, assembler, stored)
    bar.close()
    _check(model, expected, state, report, strict, assembler)
    report.tensors = len(state.loaded)
    model = placer.finish(model, state.loaded)
    if state.new:
        note = (model.get_base_model() if hasattr(model, "get_base_model") else model).init_new(state.new)
        report.notes.append(note or f"newly initialized: {', '.join(state.new)}")
    report.notes += placer.notes()
    return model


def _one(model, placer, expected, state, report, path, name, t, check_finite, assembler, stored) -> None:
    """One checkpoint tensor (or a piece of one) handed to the placer, under the model's name."""
    rules = model.checkpoint_rules
    # blocks the placer keeps are held under the reader's names (llama.cpp's stacked experts as they are)
    name, piece = (name, None) if placer.keeps_blocks(name) else rules.to_model(name)
    if rules.ignores(name):  # a tensor the model does not hold, or takes rows of (models.heads: adopt)
        getattr(model, "adopt", lambda *_: None)(name, t)
        return
    if piece is not None:
        t = assembler.add(name, piece, t, path)
        if t is None:
            return
    # a renamed, split or assembled tensor is no view of the file under its name: placers must copy it
    _take(model, placer, expected, state, report, path, name, t, check_finite, in_file=name == stored)


def _take(model, placer, expected, state: _State, report, path, name, t, check_finite, in_file=True) -> None:
    config = model.config
    tied_head = name == "lm_head.weight" and config.tie_word_embeddings and t.is_floating_point()
    if name.endswith(IGNORED_SUFFIXES) or tied_head:  # a tied head is the embedding (or a copy made from it)
        return
    if layer_index(name, model.layers_prefix) >= config.num_hidden_layers:  # a config with fewer layers
        state.deeper += 1
        return
    if state.target is None and t.is_floating_point():
        state.target = t.dtype
    if not state.planned:
        report.dtype = str(state.target or torch.float32).removeprefix("torch.")
        placer.plan(model, state.target or torch.float32)
        state.planned = True
    parts = placer.split(name, t, state.target)
    for part, value in (parts or {name: t}).items():
        shape = expected.get(part)
        if shape is None:
            state.unexpected.append(part)
            continue
        if parts is None and tuple(value.shape) != shape:
            state.mismatched.append(f"{part}: checkpoint {tuple(value.shape)} vs model {shape} "
                                    f"({os.path.basename(path)})")  # fmt: skip
            continue
        target = _dtype_for(model, part, state.target)
        cast = value.is_floating_point() and target is not None and value.dtype != target
        if cast:
            value = value.to(target)
            report.cast_tensors += 1
        elif in_file and parts is None:
            report.zero_copy_tensors += 1
        if check_finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: tensor {part!r} contains NaN or Inf values")
        report.bytes += value.numel() * value.element_size()
        state.loaded[part] = placer.put(part, value, path, in_file and parts is None and not cast)


def _dtype_for(model, name: str, target: torch.dtype | None) -> torch.dtype | None:
    """The dtype a tensor loads in: the model's, but float32 for the tensors a family keeps in float32 when the
    rest is float16 or bfloat16 (transformers' _keep_in_fp32_modules_strict: a router's correction bias)."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    if target in (torch.float16, torch.bfloat16) and any(k in name for k in keep):
        return torch.float32
    return target


def _check(model, expected, state: _State, report: LoadReport, strict: bool, assembler: Assembler) -> None:
    """CheckpointError listing every missing, unexpected and wrongly shaped tensor; notes for the rest."""
    missing = sorted(set(expected) - set(state.loaded))
    state.new = [
        n for n in missing if n in getattr(model, "new_if_missing", ())
    ]  # a head made fresh (models.heads)
    missing = [n for n in missing if n not in state.new]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if state.unexpected and strict:
        problems.append(f"unexpected tensors: {', '.join(sorted(state.unexpected)[:20])}")
    if state.mismatched:
        problems.append("wrongly shaped tensors: " + "; ".join(state.mismatched[:20]))
    if assembler.missing():
        problems.append(f"experts missing from stacked tensors: {', '.join(assembler.missing()[:20])}")
    if problems:
        where = report.directory or report.source
        raise CheckpointError(f"{where}: checkpoint does not fit the model — " + "; ".join(problems))
    if state.unexpected:
        report.notes.append(f"ignored {len(state.unexpected)} unexpected tensors")
    if state.deeper:
        layers = model.config.num_hidden_layers
        report.notes.append(f"skipped {state.deeper} tensors of layers >= num_hidden_layers ({layers})")
        logger.warning("%s: the config asks for %d layers; the checkpoint's deeper layers were not loaded",
                       report.directory or report.source, layers)  # fmt: skip
