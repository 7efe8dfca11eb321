"""GGUF (llama.cpp's format) -> config and dequantized tensors with HF names.

Read with the `gguf` package. llama.cpp's converter permutes the rows of q/k weights for the llama
architecture (interleaved RoPE); we undo that so the HF rotate-half convention applies.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from .._util import no_mmap
from ..errors import GGUFError
from ..kernels.ggml import BLOCKS, dequantize, llama_qk_order
from ..malloc import huge_page_tensor
from ..models import config_class, gguf_architectures, gguf_family, gguf_layouts
from . import ggml
from .gguf_header import read_header
from .safetensors import read_exactly

_CONFIG_KEYS = {  # llama.cpp key (after "<arch>.") -> HF config field
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class TensorInfo(NamedTuple):
    """One tensor of a GGUF file: GGUF's dimension order (ne0 first), ggml type, absolute offset, size."""

    name: str
    shape: tuple[int, ...]
    tensor_type: int
    data_offset: int
    n_bytes: int
    data: Any  # uint8 (rows, bytes per row) over the memory map, as gguf.quants.dequantize takes it


class GGUFFile:
    """A GGUF file: metadata as plain Python values and tensor descriptions, read by read_header over a
    memory map (gguf.GGUFReader takes seconds over a 49k-token vocabulary); errors as GGUFError. A model's load
    passes `strings=False`: the tokenizer's arrays of strings (0.1 s of decoding for 49k tokens and their
    merges) are stepped over, only their lengths kept (SkippedStrings; and where the strings in `keep` stand).
    The tensors' bytes are views of a memory map of the file, or, with AUTOLM_NO_MMAP=1, of the file read into
    memory of its own (`memory`; not for a reader that takes no weights: `weights=False`)."""

    def __init__(
        self, path: str, strings: bool = True, weights: bool = True, keep: frozenset[str] = frozenset()
    ):
        self.path = path
        if not os.path.isfile(path):
            raise GGUFError(f"{path}: file not found")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{path}: {size} bytes is too small for a GGUF file")
            header = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # bytes slices: fast for the header
            # AUTOLM_NO_MMAP: the tensors read into memory, nothing mapped (a tokenizer's read takes no weights)
            self.memory = _read_whole(f, size, path) if no_mmap() and weights else None
            self._map = self.memory if self.memory is not None else np.memmap(f, dtype=np.uint8, mode="r")
        try:
            self.metadata, infos, start = read_header(path, header, size, strings, keep)
        finally:
            header.close()
        self.tensors: list[TensorInfo] = []
        for name, shape, kind, offset in infos:
            block, type_size = _block_size(path, name, kind)
            if not shape or shape[0] % block:
                raise GGUFError(f"{path}: tensor {name!r} has shape {shape}, not whole blocks of {block}")
            rows = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
            row_bytes = shape[0] // block * type_size
            begin = start + offset
            if begin % 8:  # the blocks' fp16 scales and float tensors are read as views of the bytes
                raise GGUFError(
                    f"{path}: tensor {name!r} starts at byte {begin}, not a multiple of 8 (GGUF aligns tensor "
                    "data to general.alignment, which must be a multiple of 8)"
                )
            n_bytes = rows * row_bytes
            data = (
                self._map[begin : begin + n_bytes].reshape(rows, row_bytes)
                if begin + n_bytes <= size
                else None
            )  # a truncated file: gguf_tensors says so when the tensor is read
            self.tensors.append(TensorInfo(name, shape, kind, begin, n_bytes, data))
        self.architecture = self.metadata.get("general.architecture")
        self.family = gguf_family(self.metadata)
        if self.family is None:
            raise GGUFError(f"{path}: architecture {self.architecture!r} is not supported (expected one of "
                            f"{gguf_architectures()})")  # fmt: skip
        self.layout = next(g for g in gguf_layouts(self.family) if g.arch == self.architecture)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.layout.unprefixed:
            return self.metadata.get(key, default)
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def values(self, t: TensorInfo) -> list[float]:
        """A small tensor that holds config values (see GGUFLayout.rope_tensors), as a list of floats."""
        return _values(self, t)


def _read_whole(f, size: int, path: str) -> np.ndarray:
    """The whole file as a uint8 array in memory of its own (on huge pages where the OS has them)."""
    whole = huge_page_tensor(size).numpy()
    read_exactly(f, 0, size, path, memoryview(whole))
    return whole


def _read(g: GGUFFile, t: TensorInfo) -> np.ndarray:
    """Tensor t's bytes (rows, bytes per row), read from the file into memory of their own. Not through the
    memory map: a page touched there maps the large folio around it too (up to megabytes of the tensors next to
    a norm), which then stays in this process's resident set until the file is closed."""
    buf = bytearray(t.n_bytes)
    with open(g.path, "rb") as f:
        f.seek(t.data_offset)
        if f.readinto(buf) != t.n_bytes:
            raise GGUFError(f"{g.path}: tensor {t.name!r} runs past the end of the file (truncated?)")
    rows = int(np.prod(t.shape[1:], dtype=np.int64))
    return np.frombuffer(buf, np.uint8).reshape(rows, t.n_bytes // max(rows, 1))


def _dequantized(g: GGUFFile, t: TensorInfo) -> np.ndarray:
    """Tensor t's values (float32 or float16, flat per row): F32 and F16 as read, the types autolm computes on by
    its torch dequantization (kernels.ggml.dequantize, ggml's arithmetic), the rest by gguf's numpy code."""
    data = _read(g, t)
    if t.tensor_type in (0, 1):
        return data.view(np.float32 if t.tensor_type == 0 else np.float16)
    if t.tensor_type == 26:  # I32: an integer table (DeepSeek-V4's tid2eid), exact as float32 below 2 ** 24
        return data.view(np.int32)
    if t.tensor_type in BLOCKS:
        return _torch_dequantized(data, t.tensor_type)
    import gguf

    try:
        return gguf.quants.dequantize(data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
        name = gguf.GGMLQuantizationType(t.tensor_type).name
        raise GGUFError(f"{g.path}: cannot dequantize tensor {t.name!r} of type {name} ({e})") from None


def _block_size(path: str, name: str, kind: int) -> tuple[int, int]:
    """(weights, bytes) of one block of ggml type `kind`: autolm's own table for the types it computes on (no
    import of the gguf package, a twentieth of a second), gguf's for the rest."""
    if kind in BLOCKS:
        return BLOCKS[kind]
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise GGUFError(f"{path}: tensor {name!r} has an unknown type {kind}") from None


def config_from_gguf(g: GGUFFile, **overrides):
    """The HF config this file's metadata describes."""
    d: dict[str, Any] = {"model_type": g.family.config_class.model_type}
    for key, name in [*_CONFIG_KEYS.items(), *g.layout.config]:
        value = g.get(key)
        if value is not None:
            d[name] = value
    if "vocab_size" not in d and "tokenizer.ggml.tokens" in g.metadata:
        d["vocab_size"] = len(g.metadata["tokenizer.ggml.tokens"])
    rope = {"rope_theta": g.get("rope.freq_base", 10000.0)}
    scaling = g.get("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=g.get("rope.scaling.factor"))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = g.get("rope.scaling.original_context_length")
    d["rope_parameters"] = rope
    names = {t.name for t in g.tensors}
    d["tie_word_embeddings"] = "output.weight" not in names
    d.update(g.layout.fixed)
    for tensor, name in g.layout.present:  # True where the file has it; "blk.{}.x": the blocks that have it
        pattern = re.escape(tensor).replace(r"\{\}", r"(\d+)")
        found = sorted(int(m.group(1)) if m.groups() else 0 for n in names if (m := re.fullmatch(pattern, n)))
        if found:
            d[name] = found if "{}" in tensor else True
    d.update((name, list(t.shape)) for tensor, name in g.layout.shaped for t in g.tensors if t.name == tensor)
    for t in g.tensors:
        if t.name in dict(g.layout.rope_tensors):
            rope[dict(g.layout.rope_tensors)[t.name]] = g.values(t)
        if t.name == ROPE_FREQS and t.name not in dict(g.layout.rope_tensors):  # else the layout's own
            if (g.layout.derive is not None and not g.layout.rope_freqs) or scaling is not None:
                raise GGUFError(
                    f"{g.path}: {ROPE_FREQS} with {g.layout.arch}'s own RoPE settings is not supported"
                )
            rope.update(rope_freqs(g.values(t), d.get("max_position_embeddings")))
    if g.layout.derive is not None:
        g.layout.derive(d, g.get)
    for key, name in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in g.metadata:
            value = g.metadata[f"tokenizer.ggml.{key}"]
            if not isinstance(value, int) or isinstance(value, bool):
                raise GGUFError(f"{g.path}: tokenizer.ggml.{key} must be an integer, found {value!r}")
            d[name] = value
    d["dtype"] = "float32"
    return config_class(d["model_type"], source=g.path).from_dict(d, source=g.path, **overrides)


ROPE_FREQS = "rope_freqs.weight"


def rope_freqs(factors: list[float], length: int | None) -> dict[str, Any]:
    """llama.cpp's rope_freqs (what its converter writes for Llama 3's RoPE scaling: each frequency divided by
    its factor, at every position) as rope_parameters: LongRoPE's form with one set of factors and no attention
    scaling, which computes exactly that."""
    return {
        "rope_type": "longrope",
        "short_factor": factors,
        "long_factor": factors,
        "factor": 1.0,
        "attention_factor": 1.0,
        "original_max_position_embeddings": length or 1 << 20,
    }


def _values(g: GGUFFile, t: TensorInfo) -> list[float]:
    """A small tensor that holds config values (see GGUFLayout.rope_tensors), as a list of floats."""
    return [float(x) for x in np.asarray(_dequantized(g, t)).reshape(-1)]


def hf_name(gguf_name: str, g: GGUFFile) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (file g's layout: its extra names, and
    its family's layers' prefix); None for unknown tensors."""
    family, layout = g.family, g.layout
    if re.fullmatch(r"(blk\.\d+\.)?\w+(\.\w+)?", gguf_name) and gguf_name.rpartition(".")[2] in layout.bare:
        gguf_name += ".weight"  # a tensor llama.cpp names without the suffix (GGUFLayout.bare)
    m = re.fullmatch(r"blk\.(\d+)\.(\w+(?:\.\w+)?)\.(weight|bias|scale)", gguf_name)  # LFM2: shortconv.conv
    if m:
        part = dict(layout.layer).get(m.group(2)) or _LAYER_NAMES.get(m.group(2))
        if layout.block_prefix is None:
            prefix = f"{family.layers_prefix}.{m.group(1)}"
        else:  # the family's own numbering of its layers (GGUFLayout.block_prefix)
            prefix = layout.block_prefix(int(m.group(1)), g.get)
        return None if part is None or prefix is None else f"{prefix}.{part}.{m.group(3)}"
    m = re.fullmatch(r"(\w+(?:\.\w+)?)\.(weight|bias)", gguf_name)  # HRM-Text: hrm.z_l_init
    top = {**_TOP_NAMES, **dict(layout.top)}
    if m and m.group(1) in top:
        return f"{top[m.group(1)]}.{m.group(2)}"
    return None


def _torch_dequantized(data: np.ndarray, kind: int) -> np.ndarray:
    """Rows of raw blocks (rows, bytes) -> float32 (rows, columns) by torch's threads, a few thousand rows at a
    time (the intermediates stay small): gemma 3's 262k-row Q8_0 embedding in 0.6 s, where numpy took 7.8 s."""
    raw = torch.from_numpy(data)
    weights, nbytes = BLOCKS[kind]
    out = torch.empty(raw.shape[0], raw.shape[1] // nbytes * weights, dtype=torch.float32)
    step = max(1, (1 << 22) // max(out.shape[1], 1))
    for i in range(0, raw.shape[0], step):
        out[i : i + step] = dequantize(raw[i : i + step], kind)
    return out.numpy()


def gguf_tensors(
    g: GGUFFile, config, int4: Callable[[str], bool] = lambda name: False
) -> Iterator[tuple[str, str, Any]]:
    """Yield (file, HF name, tensor) for every tensor of the file: dequantized to fp32, or as its own blocks
    (sources.ggml.GGMLBlocks) where int4(HF name) asks for that and autolm computes on its type."""

    size = os.path.getsize(g.path)
    for t in g.tensors:
        name = hf_name(t.name, g)
        if name is None:
            if t.name == ROPE_FREQS or t.name in dict(g.layout.rope_tensors):
                continue  # RoPE factors (llama3's; the family's rope_tensors): the config carries them
            block = re.match(r"blk\.(\d+)\.", t.name)
            if block and int(block.group(1)) >= config.num_hidden_layers:
                continue  # a block the model does not run (GLM-4.5's next-token-prediction layer)
            raise GGUFError(f"{g.path}: tensor {t.name!r} has no known HF name")
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{g.path}: tensor {t.name!r} runs past the end of the file (truncated?)")
        if int4(name) and t.tensor_type != 0 and ggml.keepable(int(t.tensor_type)) and len(t.shape) <= 3:
            yield g.path, name, ggml.blocks(g, t, config)  # the placer asked for the file's own blocks
            continue
        # llama.cpp stores GPT-2's Conv1D weights (out, in); the model holds them (in, out), as the checkpoint
        transposed = name.endswith(".weight") and t.name.split(".")[-2] in g.layout.transposed
        w = np.asarray(_dequantized(g, t), dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        heads = ggml.permuted_heads(g, t, config)
        if heads:  # llama's q/k rows back in the model's order
            w = w[llama_qk_order(torch.arange(w.shape[0]), heads).numpy()]
        if g.layout.permute_qk_norm and re.search(r"\.attn_[qk]_norm\.", t.name) and w.ndim == 2:
            w = w[:, llama_qk_order(torch.arange(w.shape[1]), 1).numpy()]  # each head's columns (Chameleon)
        order = ggml.row_order(g, t, config)
        if order is not None:  # rows the converter regrouped (GPT-NeoX's q/k/v) back in the model's order
            w = w[order.numpy()]
        if g.layout.norm_shift and name.endswith(g.layout.norm_shift_suffix):
            w = w - np.float32(g.layout.norm_shift)
        if transposed:
            w = w.T
        if not w.flags.writeable or not w.flags.c_contiguous:
            w = np.array(w, order="C")  # unquantized tensors are read-only views of the memory map
        for part, value in _unstacked(g, t.name, name, torch.from_numpy(w)):
            yield g.path, part, value


def _unstacked(g: GGUFFile, gguf_name: str, name: str, w: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """[(HF name, tensor)]: a tensor the converter stacked from the members of a ModuleList (GGUFLayout.stacked:
    StableLM's per-head q/k norms in a block, the list's path inside the layer; Gemma 3n's AltUp projections outside
    the blocks, the list's full path) as one tensor per member, its rows; else the tensor under its name."""
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", gguf_name)
    members = dict(g.layout.stacked).get(m.group(2)) if m else None
    if members is None:
        return [(name, w)]
    prefix = members if m.group(1) is None else f"{g.family.layers_prefix}.{m.group(1)}.{members}"
    return [(f"{prefix}.{i}.{m.group(3)}", row) for i, row in enumerate(w.unbind(0))]
