"""Small helpers every layer uses: bounded JSON reading, atomic writes (from _atomic), sizes, dtypes, rank and
world."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from ._atomic import _fsync_dir, atomic_directory, atomic_write_text, published_file  # noqa: F401 - where callers import them
from .errors import AutolmError, ConfigError

MAX_JSON_BYTES = 64 << 20  # no legitimate config, index or tokenizer config comes near this

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def read_json(
    path: str, error: type[Exception] = ConfigError, max_bytes: int = MAX_JSON_BYTES
) -> dict[str, Any]:
    """Read a JSON object from a file, raising `error` naming the file on any problem (size, syntax, nesting)."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is more than the {max_bytes}-byte limit for a JSON file")
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: expected a file, found a directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as HF uses); '2GiB' is binary; ints pass through."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise AutolmError(f"size {size!r} is not understood (expected e.g. 5GB, 500MB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def world() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def own_names(model) -> Iterator[None]:
    """Inside the block, model.state_dict() names each tensor by the modules' own attributes: a base model
    (AutoModel) otherwise gives transformers' base-model names, its body's prefix dropped (models.heads)."""
    modules = list(model.modules())
    for m in modules:
        m.__dict__["_own_names"] = True
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("_own_names", None)


def full_tensor(t):
    """The whole tensor behind a DTensor (a collective: every rank must call it), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def no_mmap() -> bool:
    """AUTOLM_NO_MMAP=1: checkpoints are read into memory, never memory-mapped (network file systems, files that
    may change while in use: a mapped file cut short kills the process with SIGBUS)."""
    return os.environ.get("AUTOLM_NO_MMAP", "") not in ("", "0")


def autolm_home() -> str:
    return os.environ.get("AUTOLM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "autolm")


_DTYPE_NAMES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
}


def check_device(device: Any, what: str = "device"):
    """A torch.device for `device`, or ConfigError naming it when it is malformed or this machine lacks it
    (e.g. "cuda" on a CPU-only PyTorch build)."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"{what} {device!r} is not a device (expected e.g. 'cpu', 'cuda', 'cuda:1', 'mps')"
        ) from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(
                f"{what} {device!r}: this PyTorch ({torch.__version__}) sees no CUDA GPU; install a "
                "CUDA build of PyTorch on a machine with one, or use the CPU"
            )
        if d.index is not None and d.index >= n:
            raise ConfigError(f"{what} {device!r}: there are {n} CUDA GPUs (cuda:0 ... cuda:{n - 1})")
    elif d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{what} {device!r}: MPS is not available on this machine")
    return d


def parse_dtype(dtype: Any):
    """'auto' (or None), a torch.dtype, or a name such as 'bfloat16' / 'bf16' / 'torch.float16'."""
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return getattr(torch, _DTYPE_NAMES[dtype.removeprefix("torch.")])
    raise ConfigError(
        f"dtype {dtype!r} is not supported (expected 'auto', a torch dtype or one of {sorted(_DTYPE_NAMES)})"
    )


def set_seed(seed: int, deterministic: bool = False) -> None:
    """transformers' set_seed: Python's, NumPy's and torch's random generators (every CUDA device's too) seeded
    with `seed`; deterministic=True also makes torch use deterministic algorithms. Process-wide, as asked."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
