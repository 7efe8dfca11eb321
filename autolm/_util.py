"""Small helpers every layer uses: bounded JSON reading, atomic writes, sizes, dtypes, rank and world."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write text to path through a temporary file, fsync and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: str, owned: Any = None) -> Iterator[str]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target`, on failure it
    is removed and `target` is left as it was.

    Files already in `target` are kept unless the new save writes a file of the same name or
    `owned(name)` says autolm wrote it (its own shards and index): nothing else of the user's is lost.
    A symlinked target is followed (the link stays). Files and folders get the permissions the umask gives.
    """
    target = os.path.realpath(os.path.abspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise AutolmError(f"{target}: exists and is not a directory")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(target)
    for stale in sorted(os.listdir(parent)):  # folders left by saves that were killed
        if stale.startswith(f".{base}.old-") and not os.path.lexists(target):
            os.replace(os.path.join(parent, stale), target)  # killed between its two renames: put it back
        elif stale.startswith((f".{base}.tmp-", f".{base}.old-")):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.tmp-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                os.chmod(path, 0o666 & ~_umask())
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if os.path.isdir(target):
            for name in os.listdir(target):
                if os.path.lexists(os.path.join(tmp, name)) or (owned is not None and owned(name)):
                    continue
                src = os.path.join(target, name)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, os.path.join(tmp, name), symlinks=True)
                else:
                    shutil.copy2(src, os.path.join(tmp, name), follow_symlinks=False)
            st = os.stat(target)
            os.chmod(tmp, st.st_mode & 0o7777)
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AutolmError(
            f"{target}: could not write ({e.strerror or e}); the previous contents are unchanged"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(target):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{base}.old-")
        os.rmdir(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(parent)


def world() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def full_tensor(t):
    """The whole tensor behind a DTensor (a collective: every rank must call it), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
