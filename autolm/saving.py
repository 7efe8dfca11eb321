"""save_pretrained in the HF layout: shards + index, config, generation config; every write is atomic.

A save goes into a temporary directory beside the target, and replaces the target only once
everything is written: an interrupted save leaves the previous model untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors.torch import save_file

from .distributed import full, world
from .errors import AutolmError

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as HF uses); '2GiB' is binary; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise AutolmError(f"size {size!r} is not understood (expected e.g. 5GB, 500MB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def atomic_write_text(path: str, text: str) -> None:
    """Write text to path through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_directory(target: str) -> Iterator[str]:
    """Yield a fresh temporary directory; on success it replaces `target` (files in target not rewritten
    are kept), on failure it is removed and `target` is left as it was."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Keep the user's other files (README, tokenizer, ...) unless the save rewrote them; drop stale shards.
    if os.path.isdir(target):
        for name in os.listdir(target):
            stale_weights = name.startswith(("model-", "model.safetensors", "pytorch_model"))
            if not os.path.exists(os.path.join(tmp, name)) and not stale_weights:
                src = os.path.join(target, name)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, os.path.join(tmp, name), symlinks=True)
                else:
                    shutil.copy2(src, os.path.join(tmp, name), follow_symlinks=False)
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.old-")
        os.rmdir(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (the first name wins, as transformers keeps the embedding).

    Sharded (DTensor) weights are gathered whole, which every rank must take part in.
    """
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = t.data_ptr() if t.device.type != "meta" and not hasattr(t, "full_tensor") else id(t)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = full(t.detach()).to("cpu").contiguous()
    return out


def shard_state_dict(sd: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    """Split into shards of at most max_shard_size bytes each (a bigger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def write_weights(directory: str, sd: dict[str, torch.Tensor], max_shard_size: int | str = "5GB",
                  prefix: str = "model") -> list[str]:
    """Write model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    shards = shard_state_dict(sd, parse_size(max_shard_size))
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, f"{prefix}.safetensors"), metadata=meta)
        return [f"{prefix}.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, f"{prefix}.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return names


def save_pretrained(model: torch.nn.Module, directory: str, max_shard_size: int | str = "5GB",
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save weights, config.json and generation_config.json in the HF layout, atomically.

    Under torch.distributed, sharded weights are gathered on every rank and rank 0 writes.
    """
    sd = state_dict if state_dict is not None else _unique_state_dict(model)
    if any(t.device.type == "meta" for t in sd.values()):
        raise AutolmError("cannot save a model with weights still on the meta device")
    if world()[0] != 0:
        return
    config = model.config
    # The model's own class, not a wrapper that torch.distributed made around it (FSDPLlamaForCausalLM).
    cls = next(c for c in type(model).__mro__ if not c.__module__.startswith("torch."))
    with atomic_directory(directory) as tmp:
        write_weights(tmp, sd, max_shard_size)
        d = config.to_dict()
        d["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        d.setdefault("architectures", [cls.__name__])
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump(gen.to_dict(), f, indent=2, sort_keys=True)
