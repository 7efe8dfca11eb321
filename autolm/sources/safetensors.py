"""safetensors files, validated and memory-mapped: tensors are views of the file's pages (zero-copy).

safetensors' own `safe_open` is not used: it copies each tensor out of the file, and loading would
then cost the weights' size twice over; here a tensor in the checkpoint's dtype shares the page
cache, so loading costs the weights' size once. Every header is checked before it is trusted:
size and JSON, dtypes, shapes, offsets in bounds, contiguous and non-overlapping.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass

import torch

from .._util import no_mmap
from ..errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    end: int


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: returns {name: TensorInfo} and the metadata dict."""
    try:
        with open(path, "rb", buffering=0) as f:
            return _read_header(f, os.fstat(f.fileno()).st_size, path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_header(f: io.FileIO, size: int, path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The header of the open file `f` of `size` bytes, checked against that size."""
    try:
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file")
        raw = read_exactly(f, 8, n, path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
    data_start, data_len = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry, data_start, data_len)
    # Tensors must tile the data area exactly: sorted by offset, each starts where the last ended.
    pos = data_start
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != pos:
            what = "overlaps the previous tensor" if info.start < pos else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} at offset {info.start - data_start} {what}")
        pos = info.end
    if pos != data_start + data_len:
        raise CheckpointError(
            f"{path}: tensors cover {pos - data_start} bytes but the data area holds {data_len}"
        )
    return infos, metadata


def _tensor_info(path: str, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: entry for tensor {name!r} is not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unknown dtype {dtype_name!r} (expected one of {sorted(DTYPES)})"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r} offsets [{start}, {end}] fall outside the {data_len}-byte data area"
        )
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if end - start != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - start} bytes but shape {shape} x {dtype_name} needs {expected}"
        )
    return TensorInfo(dtype, tuple(shape), data_start + start, data_start + end)


def read_exactly(f: io.FileIO, offset: int, n: int, path: str, into: memoryview | None = None) -> bytes:
    """n bytes at offset (into a buffer when given); a file that ends first was cut short while read."""
    buf = into if into is not None else memoryview(bytearray(n))
    f.seek(offset)
    done = 0
    while done < n:
        got = f.readinto(buf[done:])
        if not got:
            raise CheckpointError(
                f"{path}: ends at byte {offset + done}, inside the {n} bytes expected from byte {offset}"
            )
        done += got
    return bytes(buf) if into is None else b""


class SafetensorsFile:
    """A validated, memory-mapped safetensors file; `get` returns tensors that share the file's pages.

    A mapped file that shrinks kills the process with SIGBUS at the next read of a lost page, and one
    rewritten in place changes the weights under the model: every `get` first checks that the file still
    has the size and modification time it had when its header was read (CheckpointError otherwise).
    With AUTOLM_NO_MMAP=1 tensors are read into memory instead (a path that cannot SIGBUS, for network
    file systems, at the cost of a copy), as safetensors users do where mapping is unsafe.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - held while tensors are read; __del__ closes
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        st = os.fstat(self._file.fileno())
        self._seen = (st.st_size, st.st_mtime_ns)
        self.infos, self.metadata = _read_header(self._file, st.st_size, path)
        self._map: mmap.mmap | None = None
        self._no_mmap = no_mmap()

    def __del__(self) -> None:
        if hasattr(self, "_file"):
            self._file.close()

    def keys(self) -> list[str]:
        return list(self.infos)

    def _check(self) -> None:
        st = os.fstat(self._file.fileno())
        if (st.st_size, st.st_mtime_ns) != self._seen:
            raise CheckpointError(
                f"{self.path}: changed while it was being loaded ({self._seen[0]} bytes when opened, "
                f"{st.st_size} now); load it again once whatever writes it has finished"
            )

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            # ACCESS_COPY maps pages privately: shared with the page cache until written, never written back.
            # The length is the size the header was checked against, never what the file has become.
            self._map = mmap.mmap(self._file.fileno(), self._seen[0], access=mmap.ACCESS_COPY)
        return self._map

    def get(self, name: str) -> torch.Tensor:
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        count = math.prod(info.shape)
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        self._check()
        if self._no_mmap or info.start % info.dtype.itemsize:
            # Unaligned data cannot be viewed in place: this one tensor is read (so is every one without mmap).
            t = torch.empty(count, dtype=info.dtype)
            read_exactly(self._file, info.start, info.end - info.start, self.path, _bytes_of(t))
            self._check()  # a file rewritten during the read may have given a mix of old and new bytes
            return t.reshape(info.shape)
        return torch.frombuffer(self._mapped(), dtype=info.dtype, count=count, offset=info.start).reshape(
            info.shape
        )


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable view of a new contiguous tensor's bytes."""
    return memoryview(t.view(torch.uint8).numpy())


class Shards:
    """Tensors by name from whichever file of a sharded checkpoint holds them (each file opened once): the parts
    that a quantized weight is read with (sources.fp8, compressed, gptq)."""

    def __init__(self, where: dict[str, str]):
        self.where = where  # tensor name -> its file
        self._files: dict[str, SafetensorsFile] = {}

    def _part(self, name: str) -> torch.Tensor | None:
        """Tensor `name`, or None where no file holds it."""
        path = self.where.get(name)
        if path is None:
            return None
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path].get(name)
