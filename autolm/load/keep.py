"""quantization="gguf": every weight of a GGUF file stays in its file's own type, as llama.cpp runs it.

The `KeepGGUF` placer swaps each decoder Linear, the embeddings and the LM head for a layer of that tensor's
type before loading: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K, IQ4_NL, IQ4_XS and MXFP4 weights stay in their
blocks where autolm's C++ kernel computes on them (kernels.native: a CPU with AVX2 and a C++ compiler), over
the file's memory map (advised to use huge pages: sources.ggml.file_map), the q/k rows that llama's converter
permuted included (the layer gives its outputs back in the model's order: GGMLLinear.heads); else Q4_0 / Q4_1 /
Q4_K weights become int4 layers (their blocks are exactly autolm's int4 layout, groups of 32; PyTorch's int4
kernel computes them), every other quantized type and F16 / BF16 a GGML layer (autolm.nn.ggml): Q5_0 to Q8_0
repacked exactly into int8 quants and per-group scales, the rest (Q2_K, Q3_K, IQ4_*, MXFP4, F16, BF16) over the file's
memory map as they are. F32 stays a float layer. The embeddings stay over the memory map (a lookup reads only
its rows' pages). A tied head is a layer of its own made from the same blocks. A mixture-of-experts layer's
experts, stacked by llama.cpp's converter (ffn_gate_exps, ffn_up_exps, ffn_down_exps), stay in their blocks over
the memory map where the C++ kernel computes on all three (GGMLExperts); else they are dequantized while loading.
Tensors of a type autolm does not compute on (IQ2_XXS, ...) are dequantized while loading, with a warning naming
them.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..kernels import native
from ..kernels.ggml import dequantize
from ..kernels.ggml_repack import planar
from ..nn.ggml import GGMLEmbedding, GGMLExperts, GGMLLinear, GGMLStack
from ..nn.moe import Experts
from ..quant import Int4Linear
from ..sources.ggml import INT4_TYPES, keepable, to_int4, type_name

logger = logging.getLogger("autolm")


def file_types(source) -> dict[str, tuple[int, tuple[int, ...]]]:
    """HF tensor name -> (ggml type, shape in the model's order) for every tensor of a GGUF source."""
    from ..sources.gguf import hf_name

    out = {}
    for t in source.file.tensors:
        name = hf_name(t.name, source.file)
        if name is not None:
            shape = tuple(int(x) for x in reversed(t.shape))
            out[name] = (int(t.tensor_type), shape)
    return out


class KeepGGUF:
    """Keeps every tensor of a GGUF file in its own type (see the module docstring); `inner` places them."""

    action = "loading GGUF blocks"

    def __init__(self, source, inner):
        if getattr(source, "format", None) != "gguf":
            raise ConfigError("quantization='gguf' keeps a GGUF file's own blocks: pass gguf_file=")
        self.source, self.inner = source, inner
        self.types = file_types(source)
        self.kept: dict[str, nn.Module] = {}  # weight name -> the layer that keeps it
        self.fallback: list[str] = []
        self.stored: set[str] = set()  # kept experts' biases: under the reader's names, like their blocks
        self.embeddings, self.tied = "model.embed_tokens.weight", False

    def describe(self) -> str:
        return f"{self.inner.describe()}, GGUF blocks"

    def notes(self) -> list[str]:
        counts = Counter(type_name(self.types[self.embeddings if n == "lm_head.weight" else n][0])
                         for n in self.kept)  # fmt: skip
        kept = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
        out = [f"kept in the file's blocks: {kept}"] if kept else []
        if self.fallback:
            out.append(f"dequantized (types autolm does not compute on): {', '.join(self.fallback[:8])}")
        return out + self.inner.notes()

    def _layer(self, name: str, module: nn.Module, kind: int, dtype: torch.dtype) -> nn.Module | None:
        """The layer that keeps `module`'s weight of type `kind` (None: the module stays as it is)."""
        if kind == 0 or getattr(module, "fan_in_fan_out", False):
            return None  # F32, and GPT-2's Conv1D (stored transposed): float layers
        if not keepable(kind):
            self.fallback.append(f"{name}.weight ({type_name(kind)})")
            return None
        with torch.device("meta"):
            if isinstance(module, nn.Embedding):
                return GGMLEmbedding(module.num_embeddings, module.embedding_dim, kind, dtype)
            bias = module.bias is not None
            if native.computes(kind, module.in_features):  # autolm's C++ kernel computes on the blocks
                return GGMLLinear(module.in_features, module.out_features, bias, kind, dtype, planes=False)
            if kind in INT4_TYPES and module.in_features % 32 == 0:
                return Int4Linear(module.in_features, module.out_features, bias, dtype, 32)
            return GGMLLinear(module.in_features, module.out_features, bias, kind, dtype)

    def _experts(self, name: str, module: Experts, dtype: torch.dtype) -> nn.Module | None:
        """GGMLExperts for llama.cpp's stacked experts of `module` where autolm's C++ kernel computes on all of them
        (gate, up and down; up and down for non-gated experts, whose module has up_proj itself) (None: they are
        dequantized while loading, as the model's float parameters)."""
        parts = (
            ("up_proj", "down_proj")
            if "up_proj" in module._parameters
            else ("gate_proj", "up_proj", "down_proj")
        )
        kinds = {p: self.types.get(f"{name}.{p}.weight", (0,))[0] for p in parts}
        sizes = {
            "gate_proj": module.hidden_size,
            "up_proj": module.hidden_size,
            "down_proj": module.intermediate_size,
        }
        if not all(native.computes(kind, sizes[p]) for p, kind in kinds.items()):
            self.fallback += [
                f"{name}.{p}.weight ({type_name(k)})" for p, k in kinds.items() if not keepable(k)
            ]
            return None
        with torch.device("meta"):
            new = GGMLExperts(module, kinds, dtype)
        for p in kinds:
            self.kept[f"{name}.{p}.weight"] = getattr(new, p)
            self.stored.add(f"{name}.{p}.bias")
        return new

    def _replacement(self, name: str, module: nn.Module, model: nn.Module) -> nn.Module | None:
        """The layer that keeps `module`'s tensors in their blocks (registered in self.kept), else None."""
        inside = name.startswith(model.layers_prefix + ".")
        if inside and isinstance(module, Experts):
            return self._experts(name, module, model.dtype)
        if not ((inside and isinstance(module, nn.Linear)) or name in ("lm_head", model.embeddings_name)):
            return None
        weight = self.embeddings if (name == "lm_head" and self.tied) else f"{name}.weight"
        if weight not in self.types:
            return None
        new = self._layer(name, module, self.types[weight][0], model.dtype)
        if new is not None:
            self.kept[f"{name}.weight"] = new
        return new

    def setup(self, model: nn.Module) -> None:
        self.tied = model.config.tie_word_embeddings
        self.embeddings = f"{model.embeddings_name}.weight"
        for name, module in list(model.named_modules()):
            new = self._replacement(name, module, model)
            if new is not None:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, new)
        if self.fallback:
            logger.warning("%s: dequantized while loading (types autolm does not compute on): %s",
                           self.source.files[0], ", ".join(self.fallback[:8]))  # fmt: skip
        self.inner.setup(model)

    def expected(self, model):
        return self.inner.expected(model)

    def plan(self, model, dtype):
        self.inner.plan(model, dtype)

    def keeps_blocks(self, name: str) -> bool:
        return name in self.kept or name in self.stored

    def split(self, name: str, t, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """GGUF blocks -> the keeping layer's entries (the embeddings' blocks also the tied head's)."""
        if not hasattr(t, "kind"):
            return None
        if name in self.stored:  # a kept experts' bias stored as F16 / BF16
            return {name: dequantize(t.raw, t.kind).view(t.shape).to(dtype)}
        layer = self.kept[name]
        module = name.removesuffix(".weight")
        want = getattr(layer, "float_shape", None) or (
            layer.out_features,
            layer.in_features,
        )  # int4: (out, in)
        if tuple(t.shape) != want:
            raise CheckpointError(f"tensor {t.name!r} ({name}): file {tuple(t.shape)} vs model {want}")
        if (
            isinstance(layer, GGMLLinear) and layer.scales is None
        ):  # computes on the file's blocks as they are
            layer.heads = t.heads
        else:
            t = t.in_order()
        if isinstance(layer, GGMLEmbedding):  # a lookup reads only its rows' pages
            head = self.kept.get("lm_head.weight") if self.tied else None
            out = {} if head is None else _entries(head, "lm_head", t)
            out[f"{module}.blocks"] = t.raw
        else:
            out = _entries(layer, module, t)
        if all(v is not t.raw for k, v in out.items() if k.endswith(".weight")):
            t.release()  # copied into another layout: the file's pages are not needed (read again if looked up)
        return out

    def put(self, name, t, path, zero_copy):
        return self.inner.put(name, t, path, zero_copy)

    def finish(self, model, loaded):
        model = self.inner.finish(model, loaded)
        if model.cache_dtype() == torch.float32:  # llama.cpp's cache: keys and values in float16
            model.kv_cache_dtype = torch.float16
        return model


def _entries(layer: nn.Module, module: str, t) -> dict[str, torch.Tensor]:
    """GGUF blocks -> the state entries of `layer` (named `module`) that keeps them."""
    if isinstance(layer, GGMLStack):
        return {f"{module}.weight": t.raw}
    if isinstance(layer, Int4Linear):
        nibbles, sz = to_int4(t)
        return {f"{module}.weight": nibbles, f"{module}.scales_and_zeros": sz}
    if layer.scales is None:
        return {f"{module}.weight": t.raw}
    q, scales, low = planar(t.raw, t.kind)
    out = {f"{module}.weight": q, f"{module}.scales": scales}
    return out if low is None else {**out, f"{module}.low": low}
