"""GGUF's header (metadata and tensor descriptions), read with struct over a memory map: every read and every
count bounded by the file's size, errors as GGUFError naming the file and the key."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ..errors import GGUFError

_SCALAR_SIZES = {
    0: 1,
    1: 1,
    2: 2,
    3: 2,
    4: 4,
    5: 4,
    6: 4,
    7: 1,
    10: 8,
    11: 8,
    12: 8,
}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9
MAX_ARRAY_ITEMS = 1 << 20  # per metadata array; real vocabularies and merge lists stay well below
MAX_TOTAL_ITEMS = 1 << 22  # over the whole file: every item becomes a Python object


_NUMPY = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8"}


class SkippedStrings:
    """A metadata array of strings that GGUFFile(strings=False) stepped over: its length, not its strings, but
    `found`: {index: string} of those among the strings the reader was asked to keep (`keep`)."""

    __slots__ = ("found", "n")

    def __init__(self, n: int, found: dict[int, str] | None = None):
        self.n, self.found = n, found or {}

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"<{self.n} strings, not read>"


class _Header:
    """A cursor over a GGUF header in a memory map: every read and every count bounded by the file's size.
    `strings=False` steps over arrays of strings (a vocabulary and its merges) instead of decoding them."""

    def __init__(self, path: str, buf, size: int, strings: bool = True, keep: frozenset[str] = frozenset()):
        self.path, self.buf, self.size, self.pos, self.items = path, buf, size, 8, 0
        self.strings = strings
        self.keep = {
            t.encode(): t for t in keep
        }  # strings a skipped array still reports (SkippedStrings.found)
        self.order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
        self.length = struct.Struct(self.order + "Q").unpack_from

    def fail(self, what: str, problem: str = "header ends inside {} (truncated or corrupt)"):
        raise GGUFError(f"{self.path}: " + problem.format(what))

    def read(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            self.fail(what)
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def count(self, n: int, item_size: int, what: str) -> int:
        if n * item_size > self.size - self.pos:
            self.fail(what, f"{{}} claims {n} items, more than the file's {self.size} bytes can hold")
        return n

    def string(self, what: str) -> str:  # ~100k calls for a vocabulary and its merges: kept lean
        pos = self.pos
        if pos + 8 > self.size:
            self.fail(what)
        n = self.length(self.buf, pos)[0]
        pos += 8
        if n > self.size - pos:
            self.fail(what, f"{{}} claims {n} items, more than the file's {self.size} bytes can hold")
        self.pos = pos + n
        return str(self.buf[pos : pos + n], "utf-8", "replace")

    def skip_strings(self, n: int, what: str) -> SkippedStrings:
        pos, size, length, buf, keep, found = self.pos, self.size, self.length, self.buf, self.keep, {}
        first = {raw[0] for raw in keep}  # the kept strings' first bytes: the rest are stepped over unread
        for i in range(n):  # each string's length, no decoding: ~8x faster than string()
            if pos + 8 > size:
                self.fail(what)
            m = length(buf, pos)[0]
            if m and buf[pos + 8] in first and (text := keep.get(buf[pos + 8 : pos + 8 + m])) is not None:
                found[i] = text
            pos += 8 + m
        if pos > size:
            self.fail(what, "{} runs past the end of the file (truncated or corrupt)")
        self.pos = pos
        return SkippedStrings(n, found)

    def array(self, what: str, depth: int) -> list | SkippedStrings:
        inner = self.read("I", what)
        n = self.count(self.read("Q", what), _SCALAR_SIZES.get(inner, 8), what)
        self.items += n
        if n > MAX_ARRAY_ITEMS or self.items > MAX_TOTAL_ITEMS:
            self.fail(what, f"{{}} has {n} items; autolm reads at most {MAX_ARRAY_ITEMS} per array "
                            f"and {MAX_TOTAL_ITEMS} in all")  # fmt: skip
        if inner in _SCALAR_SIZES:
            out = np.frombuffer(self.buf, self.order + _NUMPY[inner], n, self.pos).tolist()
            self.pos += n * _SCALAR_SIZES[inner]
            return out
        if inner == _STRING and not self.strings:
            return self.skip_strings(n, what)
        if inner == _STRING:
            return [self.string(what) for _ in range(n)]
        return [self.value(inner, what, depth + 1) for _ in range(n)]

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALAR_SIZES:
            fits = self.pos + _SCALAR_SIZES[kind] <= self.size
            out = np.frombuffer(self.buf, self.order + _NUMPY[kind], 1, self.pos)[0].item() if fits else None
            self.pos += _SCALAR_SIZES[kind]
        elif kind == _STRING:
            out = self.string(what)
        elif kind == _ARRAY and depth < 1:
            out = self.array(what, depth)
        elif kind == _ARRAY:
            self.fail(what, "{} is an array of arrays (not used by any supported model)")
        else:
            self.fail(what, f"{{}} has an unknown value type {kind}")
        if self.pos > self.size:
            self.fail(what, "{} runs past the end of the file (truncated or corrupt)")
        return out


def read_header(
    path: str, buf, size: int, strings: bool = True, keep: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata as plain Python values, tensors as (name, shape, ggml type, offset from the data start),
    where the data starts): read with struct from the memory map, every count bounded by the file's size.
    `strings=False`: arrays of strings become SkippedStrings (their length only, and where the strings in `keep`
    stand)."""
    if bytes(buf[:4]) != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
    h = _Header(path, buf, size, strings, keep)
    n_tensors = h.count(h.read("Q", "the tensor count"), 24, "the tensor count")
    n_kv = h.count(h.read("Q", "the metadata count"), 12, "the metadata count")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = h.string(f"metadata key #{i}")
        metadata[key] = h.value(h.read("I", f"metadata key {key!r}"), f"metadata key {key!r}")
    tensors = []
    for i in range(n_tensors):
        name = h.string(f"tensor #{i}'s name")
        n_dims = h.read("I", f"tensor #{i}")
        if n_dims > 8:
            raise GGUFError(f"{path}: tensor #{i} claims {n_dims} dimensions (GGUF allows at most 4)")
        shape = tuple(h.read("Q", f"tensor {name!r}") for _ in range(n_dims))
        kind, offset = h.read("I", f"tensor {name!r}"), h.read("Q", f"tensor {name!r}")
        tensors.append((name, shape, kind, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 16:
        raise GGUFError(f"{path}: general.alignment must be a small positive integer, found {alignment!r}")
    return metadata, tensors, -(-h.pos // alignment) * alignment
