"""device_map planning and dispatch: which device runs each block, and layers offloaded to disk.

The unit of placement is a block: the embeddings, one decoder layer, the final norm, the LM head.
A block is never split. Blocks placed on "disk" keep meta parameters; a forward pre-hook reads
their tensors from safetensors files (the checkpoint itself, or copies in the offload folder)
into fresh memory for that one forward pass, and a post-hook drops them again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .._util import parse_size
from ..errors import ConfigError

STRATEGIES = ("auto", "balanced", "sequential", "cpu")


def blocks(model: nn.Module, dtype: torch.dtype | None = None) -> list[tuple[str, int]]:
    """The model's placement units in forward order with their bytes, floating tensors counted in `dtype`
    when given (a tensor shared with an earlier block, such as a tied LM head, counts once)."""
    seen: set[int] = set()
    out = []
    for name in model.blocks():
        module = model.get_submodule(name)
        tensors = [t for t in [*module.parameters(), *module.buffers()] if id(t) not in seen]
        seen.update(id(t) for t in tensors)
        size = sum(
            t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
            for t in tensors
        )
        out.append((name, size))
    return out


def _device_order(device: str) -> tuple[int, int]:
    d = torch.device(device) if device != "disk" else None
    if d is None:
        return (3, 0)
    if d.type == "cpu":
        return (2, 0)
    return (0 if d.type == "cuda" else 1, d.index or 0)


def default_max_memory() -> dict[str, int]:
    """Free memory of every visible accelerator (90%), then available RAM on the CPU."""
    mem: dict[str, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            mem[f"cuda:{i}"] = int(torch.cuda.mem_get_info(i)[0] * 0.9)
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mem["mps"] = int(torch.mps.recommended_max_memory() * 0.9)
    try:
        mem["cpu"] = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.9)
    except (ValueError, OSError, AttributeError):
        mem["cpu"] = 2**62
    return mem


def plan(
    units: list[tuple[str, int]],
    max_memory: dict[str, int | str],
    strategy: str = "auto",
    tied: bool = False,
    embeddings: str = "model.embed_tokens",
) -> dict[str, str]:
    """Assign each block to a device in forward order, never splitting one.

    "sequential" fills each device before the next; "balanced" and "auto" spread blocks evenly over
    the accelerators (each gets about total / n), then fill the CPU, then "disk". A tied LM head
    goes where the embeddings are, since they share one tensor.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"device_map {strategy!r} is not supported (expected one of {STRATEGIES} or a dict)"
        )
    if strategy == "cpu":
        return {name: "cpu" for name, _ in units}
    budget = {str(d): parse_size(v) for d, v in max_memory.items()}
    devices = sorted(budget, key=_device_order)
    accelerators = [d for d in devices if d not in ("cpu", "disk")]
    total = sum(size for _, size in units)
    if strategy in ("auto", "balanced") and len(accelerators) > 1:
        # Even shares; the last accelerator keeps its whole budget, so rounding never spills to the CPU.
        share = -(-total // len(accelerators))
        for d in accelerators[:-1]:
            budget[d] = min(budget[d], share)
    result: dict[str, str] = {}
    used = dict.fromkeys(devices, 0)
    k = 0
    for name, size in units:
        if tied and name == "lm_head":
            result[name] = result[embeddings]
            continue
        while k < len(devices) and devices[k] != "disk" and used[devices[k]] + size > budget[devices[k]]:
            k += 1
        if k == len(devices):
            raise ConfigError(
                f"the model needs {total / 1e9:.2f} GB but max_memory {dict(max_memory)} cannot hold block "
                f"{name!r} ({size / 1e6:.1f} MB); give more memory or add 'disk' with an offload_folder"
            )
        result[name] = devices[k]
        used[devices[k]] += size
    return result


def resolve_device_map(
    model: nn.Module, device_map, max_memory=None, dtype: torch.dtype | None = None
) -> dict[str, str]:
    """A strategy name or a {prefix: device} dict -> {block: device}, checked and complete; block sizes are
    counted in `dtype` (the dtype the weights will load in)."""
    units = blocks(model, dtype)
    tied = model.config.tie_word_embeddings and model.lm_head is not None  # a classifier has no LM head
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in STRATEGIES:
        return {name: str(torch.device(device_map)) for name, _ in units}  # one device, e.g. "cuda:0"
    if isinstance(device_map, str):
        mem = dict(max_memory) if max_memory else default_max_memory()
        return plan(units, mem, device_map, tied, model.embeddings_name)
    if not isinstance(device_map, dict):
        raise ConfigError(
            f"device_map must be a strategy {STRATEGIES}, a device, or a dict; got {device_map!r}"
        )
    names = [n for n, _ in units]
    for key in device_map:
        if key == "" or any(n == key or n.startswith(key + ".") for n in names):
            continue
        if any(key.startswith(n + ".") for n in names):
            raise ConfigError(
                f"device_map key {key!r} would split block {key.rsplit('.', 1)[0]!r}; place whole blocks"
            )
        raise ConfigError(
            f"device_map key {key!r} names no module of the model (blocks: {names[0]} ... {names[-1]})"
        )
    result = {}
    for name in names:
        prefixes = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        if not prefixes:
            if name == "lm_head" and tied:
                continue
            raise ConfigError(f"device_map does not place block {name!r}")
        result[name] = _normalize(device_map[max(prefixes, key=len)])
    if tied:
        result["lm_head"] = result[model.embeddings_name]
    return result


def _normalize(device) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return "disk" if device == "disk" else str(torch.device(device))


def execution_device(device: str) -> torch.device:
    """Where a block computes: its own device, or the CPU for blocks kept on disk."""
    return torch.device("cpu") if device == "disk" else torch.device(device)


@dataclass(frozen=True)
class _Stored:
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int


class OffloadStore:
    """Where each offloaded tensor lives on disk; `read` copies one into fresh memory."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self.entries: dict[str, _Stored] = {}

    def add(self, name: str, tensor: torch.Tensor, source: tuple[str, int] | None) -> None:
        """Keep a reference into the checkpoint (source = (file, byte offset)) or write a copy."""
        if source is None:
            if self.folder is None:
                raise ConfigError(
                    "device_map puts blocks on 'disk' but no offload_folder was given "
                    "(needed because the checkpoint is not safetensors in the requested dtype)"
                )
            from safetensors.torch import save_file

            from ..sources.safetensors import read_safetensors_header

            os.makedirs(self.folder, exist_ok=True)
            path = os.path.join(self.folder, f"{name}.safetensors")
            tmp = path + ".tmp"
            save_file({"t": tensor.contiguous()}, tmp)
            os.replace(tmp, path)
            info = read_safetensors_header(path)[0]["t"]
            source = (path, info.start)
        self.entries[name] = _Stored(source[0], tensor.dtype, tuple(tensor.shape), source[1])

    def read(self, name: str, device: torch.device) -> torch.Tensor:
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=e.dtype)
        nbytes = out.numel() * out.element_size()
        view = out.view(-1).view(torch.uint8).numpy() if nbytes else None
        with open(e.path, "rb") as f:
            f.seek(e.start)
            if nbytes and f.readinto(memoryview(view)) != nbytes:
                raise ConfigError(f"{e.path}: offloaded tensor {name!r} is truncated")
        return out.to(device)


def dispatch(model: nn.Module, device_map: dict[str, str], store: OffloadStore) -> None:
    """Hooks that move activations to each block's device and bring disk blocks in per forward pass."""
    model.hf_device_map = dict(device_map)  # the model reads it: its device, its cache's devices
    tied = _tied_names(model)
    for block, device in device_map.items():
        module = model.get_submodule(block)
        target = execution_device(device)
        module.register_forward_pre_hook(_mover(target), with_kwargs=True)
        if device == "disk":
            names = [(n, f"{block}.{n}") for n in _stored(module)]
            # not the tensors of blocks placed on their own inside this one (HRM-Text's body, for its z_L_init)
            inner = tuple(b + "." for b in device_map if b.startswith(block + "."))
            names = [(n, full) for n, full in names if not full.startswith(inner)]
            if block == "lm_head" and model.config.tie_word_embeddings:
                names = [("weight", f"{model.embeddings_name}.weight")]
            # a tensor tied to an earlier one (Zamba2's shared blocks): read under that one's name where it is on
            # disk, else left as it is (in memory with its block)
            names = [(n, tied.get(full, full)) for n, full in names]
            names = [(n, full) for n, full in names if full in store.entries or full not in tied.values()]
            module.register_forward_pre_hook(_bring_in(names, store, target))
            module.register_forward_hook(_send_back(names))


def _tied_names(model: nn.Module) -> dict[str, str]:
    """The name of each parameter that is an earlier-named one -> that earlier name."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.update({name: first[id(p)]} if id(p) in first else {})
        first.setdefault(id(p), name)
    return out


def _mover(device: torch.device):
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (tuple, list)):
            return type(x)(move(v) for v in x)
        return x

    def hook(module, args, kwargs):
        return move(args), {k: move(v) for k, v in kwargs.items()}

    return hook


def _stored(module: nn.Module) -> list[str]:
    """The names of a block's tensors the checkpoint holds: its parameters and persistent buffers (a router's
    correction bias, a quantized layer's weights)."""
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    for n, _ in module.named_buffers(remove_duplicate=False):
        path, _, leaf = n.rpartition(".")
        owner = module.get_submodule(path) if path else module
        if leaf not in owner._non_persistent_buffers_set:
            names.append(n)
    return names


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _bring_in(names, store: OffloadStore, device: torch.device):
    def hook(module, args):
        for local, full in names:
            _set(module, local, store.read(full, device))

    return hook


def _send_back(names):
    def hook(module, args, output):
        for local, _ in names:
            path, _, leaf = local.rpartition(".")
            owner = module.get_submodule(path) if path else module
            tensors = owner._buffers if leaf in owner._buffers else owner._parameters
            _set(module, local, tensors[leaf].to("meta"))

    return hook
