"""Where weights come from. A source yields a config and (file, HF name, tensor) triples:

- `CheckpointSource`: an HF directory, safetensors (single or sharded, memory-mapped, zero-copy)
  or PyTorch `.bin` (weights_only, never arbitrary unpickling);
- `GGUFSource`: a llama.cpp GGUF file, metadata -> config, tensors dequantized with HF names.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from .._util import read_json
from ..config import PretrainedConfig
from ..errors import CheckpointError
from ..generation import GenerationConfig
from ..hub import inside
from ..models import config_from_file
from .bnb import Bitsandbytes
from .compressed import CompressedTensors
from .fp8 import FP8Scales
from .gguf_eog import KEEP, end_of_generation
from .gptq import METHODS, PackedLinears
from .safetensors import SafetensorsFile, read_safetensors_header

_LAYOUTS = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def load_bin(path: str) -> dict[str, torch.Tensor]:
    """Read a PyTorch .bin checkpoint with weights_only=True: tensors only, no code runs. Memory-mapped,
    unless the archive's entries are compressed (a mapping would then hold the compressed bytes)."""
    try:
        compressed = False
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                compressed = any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist())
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=not compressed)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
        AttributeError,
        ImportError,
        TypeError,
        KeyError,
        RecursionError,
        NotImplementedError,
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a loadable weights-only PyTorch checkpoint ({first}); autolm never unpickles "
            "arbitrary objects — convert it to safetensors if you trust its source"
        ) from None
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise CheckpointError(f"{path}: expected a dict of tensor names to tensors")
    return sd


def _read_index(directory: str, index_name: str) -> list[str]:
    path = os.path.join(directory, index_name)
    index = read_json(path, CheckpointError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{path}: expected a non-empty 'weight_map' object of tensor name -> shard file"
        )
    shards: list[str] = []
    for name, rel in weight_map.items():
        full = inside(directory, rel, path)
        if full not in shards:
            if not os.path.isfile(full):
                raise CheckpointError(f"{path}: tensor {name!r} maps to shard {rel!r}, which does not exist")
            shards.append(full)
    return shards


class CheckpointSource:
    """An HF checkpoint directory: config.json plus safetensors (preferred) or .bin weights."""

    dtype_note = "auto: config dtype / checkpoint dtype"
    slow = False

    def __init__(self, directory: str, use_safetensors: bool | None = None, variant: str | None = None):
        self.directory = directory
        layouts = [
            lay for lay in _LAYOUTS if use_safetensors is None or (lay[0] == "safetensors") == use_safetensors
        ]
        for fmt, single, index in layouts:
            if variant:
                stem, ext = os.path.splitext(single)
                single, index = f"{stem}.{variant}{ext}", index.replace(ext, f".{variant}{ext}")
            if os.path.isfile(os.path.join(directory, index)):
                self.format, self.files = fmt, _read_index(directory, index)
                return
            if os.path.isfile(os.path.join(directory, single)):
                self.format, self.files = fmt, [inside(directory, single, directory)]
                return
        names = ", ".join(f"{s}, {i}" for _, s, i in layouts)
        raise CheckpointError(f"{directory}: no weights found (expected {names})")

    def config(self, **overrides: Any) -> PretrainedConfig:
        return config_from_file(os.path.join(self.directory, "config.json"), **overrides)

    def generation_config(self, config) -> GenerationConfig:
        """generation_config.json when present, else the model config's special tokens."""
        return GenerationConfig.from_model_dir(self.directory, config)

    def tensors(self, keep_blocks=None) -> Iterator[tuple[str, str, torch.Tensor]]:
        """Yield (file, tensor name, tensor) for every tensor, file by file; a name in two files is an error."""
        seen: dict[str, str] = {}
        unpack = self._prequantized()
        for path in self.files:
            if self.format == "safetensors":
                st = SafetensorsFile(path)
                items = ((name, lambda n=name, st=st: st.get(n)) for name in st.keys())  # noqa: SIM118
            else:
                sd = load_bin(path)
                items = ((name, lambda n=name, sd=sd: sd[n]) for name in list(sd))
            for name, get in items:
                if name in seen:
                    raise CheckpointError(f"tensor {name!r} appears in two files: {seen[name]} and {path}")
                seen[name] = path
                took = (name, get()) if unpack is None else unpack.take(name, get, keep_blocks)
                if took is not None:
                    yield path, *took

    def int4_group(self) -> int | None:
        """The group size of a checkpoint stored as 4-bit integers in groups (compressed-tensors, GPTQ, AWQ), else
        None."""
        unpack = self._prequantized()
        return unpack.int4_group() if isinstance(unpack, (CompressedTensors, PackedLinears)) else None

    def _prequantized(self) -> FP8Scales | CompressedTensors | PackedLinears | Bitsandbytes | None:
        """How the weights of a checkpoint stored quantized by its makers read as floats: FP8 blocks with their
        scales (sources.fp8), compressed-tensors' formats (sources.compressed), GPTQ's and AWQ's packed int32
        words (sources.gptq), bitsandbytes' 4- and 8-bit weights (sources.bnb); None for any other."""
        if self.format != "safetensors":
            return None
        names = {f: list(read_safetensors_header(f)[0]) for f in self.files}
        quant = self._quantization()
        if isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors":
            return CompressedTensors.of(names, quant)
        if isinstance(quant, dict) and quant.get("quant_method") in METHODS:
            return PackedLinears.of(names, quant)
        if isinstance(quant, dict) and quant.get("quant_method") == "bitsandbytes":
            return Bitsandbytes.of(names)
        return FP8Scales.of(names, quant)

    def _quantization(self) -> Any:
        """config.json's quantization_config (None without one)."""
        config = os.path.join(self.directory, "config.json")
        return (read_json(config, CheckpointError) if os.path.isfile(config) else {}).get(
            "quantization_config"
        )

    def shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Every tensor's shape, read from the safetensors headers alone (None for .bin)."""
        if self.format != "safetensors":
            return None
        shapes = {n: i.shape for f in self.files for n, i in read_safetensors_header(f)[0].items()}
        companions = (
            ".weight_scale",
            ".weight_scale_inv",
            ".weight_zero_point",
            ".weight_shape",
            ".weight_g_idx",
        )
        quant = self._quantization()
        if isinstance(quant, dict) and quant.get("quant_method") in METHODS:
            return PackedLinears.shapes(shapes, quant)
        return {n.removesuffix("_packed"): s for n, s in shapes.items() if not n.endswith(companions)}


class GGUFSource:
    """A GGUF file: config from its metadata, tensors dequantized to float32 under HF names."""

    dtype_note = "auto: GGUF dequantizes to float32"
    slow = True  # dequantizing

    def __init__(self, path: str):
        from .gguf import GGUFFile

        self.directory, self.format, self.files = os.path.dirname(path), "gguf", [path]
        # the model's load reads no vocabulary, only where its end-of-generation markers stand
        self.file = GGUFFile(path, strings=False, keep=KEEP)

    def generation_config(self, config) -> GenerationConfig:
        """The config's, ending a generation at every token llama.cpp ends one at (sources.gguf_eog)."""
        out = GenerationConfig.from_model_config(config)
        ends = end_of_generation(self.file.metadata)
        if len(ends) > 1:
            out.eos_token_id = ends
        return out

    def config(self, **overrides: Any) -> PretrainedConfig:
        from .gguf import config_from_gguf

        config = config_from_gguf(self.file, **overrides)
        config.name_or_path = self.files[0]
        return config

    def tensors(self, keep_blocks=None) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(file, HF name, fp32 tensor), or gguf.Int4Blocks for the 4-bit tensors keep_blocks(name) asks for."""
        from .gguf import gguf_tensors

        return gguf_tensors(self.file, self.config(), keep_blocks or (lambda name: False))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        from .gguf import hf_name

        return {
            hf_name(t.name, self.file): tuple(int(x) for x in reversed(t.shape))
            for t in self.file.tensors
            if hf_name(t.name, self.file) is not None
        }


def open_source(
    directory: str,
    gguf_file: str | None = None,
    use_safetensors: bool | None = None,
    variant: str | None = None,
) -> CheckpointSource | GGUFSource:
    """The source of a model directory (or of one GGUF file in it)."""
    if gguf_file is not None:
        return GGUFSource(inside(directory, gguf_file, directory))
    return CheckpointSource(directory, use_safetensors, variant)
