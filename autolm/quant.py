"""Weight-only int8 / int4 quantization of the decoder's Linear layers.

int8: per output channel, a scale and an offset (value = q * scale + offset, q in -127..127; the
offset centres each row's range, which measured clearly better than symmetric scales). int4: groups of `group_size` input columns, each
with a scale and a zero point (dequantized value = (q - 8) * scale + zero, q in 0..15), the
convention of PyTorch's int4 kernels. On the CPU the matmuls run in PyTorch's own kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) with bf16 activations, which is where
they pay; elsewhere a dequantize-then-matmul fallback gives the same numbers.

On disk (safetensors + `quantization_config` in config.json) int4 weights are stored portably:
two values per byte, the even input column in the low nibble.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import ConfigError
from .kernels.quant import COMPUTE as _COMPUTE
from .kernels.quant import pack_nibbles, quantize_int4, quantize_int8, unpack_nibbles
from .nn.conv1d import out_in
from .nn.linear import share_concatenated, shareable
from .quant_experts import quantize_experts, quantized_sizes


@dataclass
class QuantConfig:
    """bits 8 or 4 for the decoder's Linear layers; group_size for int4; lm_head=True also quantizes the LM
    head (a copy when tied) with head_bits. The default head is int8: at batch 1 the head is a third of the
    weights a SmolLM2 token reads, int8 halves it at no measurable cost, int4 costs ~4% perplexity."""

    bits: int = 8
    group_size: int = 32
    lm_head: bool = True
    head_bits: int = 8
    skip: tuple[str, ...] = ()  # modules left in floating point: those whose names contain one of these

    def __post_init__(self):
        for field, bits in (("bits", self.bits), ("head_bits", self.head_bits)):
            if bits not in (4, 8):
                raise ConfigError(f"quantization {field} must be 8 or 4, got {bits!r}")
        if 4 in (self.bits, self.head_bits) and self.group_size not in (32, 64, 128, 256):
            raise ConfigError(f"int4 group_size must be 32, 64, 128 or 256, got {self.group_size!r}")

    @classmethod
    def parse(cls, value) -> QuantConfig:
        """'int8' | 'int4' | a QuantConfig | a quantization_config dict from config.json."""
        if isinstance(value, QuantConfig):
            return value
        if value in ("int8", "int4"):
            return cls(bits=int(value[3:]))
        bnb = value.to_dict() if hasattr(value, "load_in_4bit") and hasattr(value, "to_dict") else value
        if isinstance(bnb, dict) and (bnb.get("load_in_4bit") or bnb.get("load_in_8bit")):
            # transformers' BitsAndBytesConfig: autolm's int4 (groups of 64, bitsandbytes' 4-bit block) or int8 in
            # its place, the head and llm_int8_skip_modules left in floating point, as bitsandbytes leaves them
            skip = tuple(bnb.get("llm_int8_skip_modules") or ())
            return cls(bits=4 if bnb.get("load_in_4bit") else 8, group_size=64, lm_head=False, skip=skip)
        if isinstance(value, dict) and value.get("quant_method") == "autolm":
            bits = value.get("bits", 8)
            return cls(
                bits=bits,
                group_size=value.get("group_size", 32),
                lm_head=value.get("lm_head", False),
                head_bits=value.get("head_bits", bits),
                skip=tuple(value.get("skip", ())),
            )  # saved before head_bits: the head had `bits`
        raise ConfigError(
            f"quantization {value!r} is not supported (expected 'int8', 'int4', a QuantConfig, "
            "a BitsAndBytesConfig, or a quantization_config with quant_method 'autolm')"
        )

    def to_dict(self) -> dict:
        out = {
            "quant_method": "autolm",
            "bits": self.bits,
            "group_size": self.group_size,
            "lm_head": self.lm_head,
            "head_bits": self.head_bits,
        }
        return {**out, "skip": list(self.skip)} if self.skip else out

    def bits_for(self, name: str) -> int:
        """The bits of the module `name` ('lm_head' or a decoder Linear)."""
        return self.head_bits if name == "lm_head" else self.bits


@dataclass
class BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig, for code that loads with quantization_config=BitsAndBytesConfig(...):
    load_in_4bit loads autolm's int4 (groups of 64 columns, affine: not bitsandbytes' NF4 / FP4 codes, so
    logits differ from bitsandbytes' within 4-bit rounding), load_in_8bit its int8 (per row); the head and
    llm_int8_skip_modules stay in floating point. The other fields are kept and change nothing here."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: object = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: object = None
    quant_method: str = "bitsandbytes"

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("BitsAndBytesConfig: load_in_4bit and load_in_8bit are both set: choose one")

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def _aligned_parts(modules: list[nn.Module], row_bytes: int) -> bool:
    """Whether each module's rows start 64-byte aligned inside their concatenation (the CPU kernels' vector
    loads need that of every part that still runs on its own)."""
    offsets = torch.tensor([m.out_features for m in modules]).cumsum(0)[:-1] * row_bytes
    return bool((offsets % 64 == 0).all())


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))
        self.register_buffer("offsets", torch.empty(out_features, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    @staticmethod
    def quantize(w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        q, s, o = quantize_int8(w)
        return {"weight": q, "scales": s.to(dtype), "offsets": o.to(dtype)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].data_ptr() % 64:
            # The CPU kernel reads with aligned vector loads; weights memory-mapped at odd offsets would crash it.
            state_dict[key] = state_dict[key].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def concat(cls, modules: list[Int8Linear], copy: bool = True) -> Int8Linear | None:
        """One Int8Linear computing the concatenated outputs of `modules` (see nn.linear.fuse); with copy=False
        only where their tensors already are consecutive views of one tensor."""
        if (
            len({m.bias is None for m in modules}) != 1
            or not shareable(modules, ["scales", "offsets", "bias"])
            or not _aligned_parts(modules, modules[0].in_features)
        ):
            return None
        first = modules[0]
        with torch.device("meta"):
            fused = cls(
                first.in_features,
                sum(m.out_features for m in modules),
                first.bias is not None,
                first.scales.dtype,
            )
        for name in ("weight", "scales", "offsets", "bias"):
            if getattr(first, name) is not None:
                t = share_concatenated(modules, name, copy=copy)
                if t is None:
                    return None
                setattr(fused, name, nn.Parameter(t, requires_grad=False) if name == "bias" else t)
        return fused

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight these values stand for."""
        return self.weight.float() * self.scales.float()[:, None] + self.offsets.float()[:, None]

    def requantize(self, w: torch.Tensor) -> None:
        """Hold the float (N, K) weight `w` instead, quantized as loading does (in place: views of the tensors,
        a fused layer's, see it)."""
        for key, t in self.quantize(w, self.scales.dtype).items():
            getattr(self, key).copy_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x @ (q * s + o)^T = (x @ q^T) * s + sum(x) * o
        y = kernels.int8_linear(x, self.weight, self.scales, self.offsets, self.bias)
        if y is None:
            y = F.linear(x, self.dequantize().to(x.dtype), self.bias)
        return y


class Int4Linear(nn.Module):
    """Holds `weight` in the CPU kernel's packed layout where that kernel exists (`packed`), the portable
    nibble layout elsewhere."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer(
            "scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=_COMPUTE)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )
        self.packed = False  # weight in the CPU kernel's layout (set when loaded on the CPU)

    @staticmethod
    def quantize(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        q, sz = quantize_int4(w, group_size)
        return {"weight": pack_nibbles(q), "scales_and_zeros": sz.to(_COMPUTE)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key, sz = prefix + "weight", prefix + "scales_and_zeros"
        if sz in state_dict:
            state_dict[sz] = state_dict[sz].to(_COMPUTE)  # whatever dtype the rest of the model loads in
        if key in state_dict:  # (a state dict without this layer's weight leaves it as it is)
            packed = kernels.int4_pack(state_dict[key]) if state_dict[key].device.type == "cpu" else None
            self.packed = packed is not None
            if packed is not None:
                state_dict[key] = packed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def concat(cls, modules: list[Int4Linear], copy: bool = True) -> Int4Linear | None:
        """One Int4Linear computing the concatenated outputs of `modules` (see nn.linear.fuse; copy as there).
        The CPU kernel's packed layout interleaves blocks of 64 rows: packed weights concatenate like plain ones
        where every part but the last has whole blocks."""
        first = modules[0]
        if first.packed and any(m.out_features % 64 for m in modules[:-1]):
            return None
        if (
            len({(m.bias is None, m.packed, m.group_size) for m in modules}) != 1
            or not shareable(modules, ["scales_and_zeros", "bias"])
            or not _aligned_parts(modules, first.in_features // 2)
        ):
            return None
        with torch.device("meta"):
            fused = cls(
                first.in_features,
                sum(m.out_features for m in modules),
                first.bias is not None,
                first.scales_and_zeros.dtype,
                first.group_size,
            )
        fused.packed = first.packed
        weight = share_concatenated(modules, "weight", copy=copy)
        sz = share_concatenated(modules, "scales_and_zeros", dim=1, copy=copy)  # (groups, N, 2)
        bias = None if first.bias is None else share_concatenated(modules, "bias", copy=copy)
        if weight is None or sz is None or (first.bias is not None and bias is None):
            return None
        fused.weight, fused.scales_and_zeros = weight, sz
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight"] = pack_nibbles(self._unpack_cpu())

    def _unpack_cpu(self) -> torch.Tensor:
        """Recover q (N, K) from the CPU kernel layout."""
        return kernels.int4_unpack(self.weight, self.group_size, self.in_features, self.scales_and_zeros)

    def requantize(self, w: torch.Tensor) -> None:
        """Hold the float (N, K) weight `w` instead, quantized and laid out as loading does (in place: views of
        the tensors, a fused layer's, see it)."""
        new = self.quantize(w, self.group_size)
        if self.packed:
            new["weight"] = kernels.int4_pack(new["weight"])
        self.weight.copy_(new["weight"])
        self.scales_and_zeros.copy_(new["scales_and_zeros"].to(self.scales_and_zeros.dtype))

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight these values stand for."""
        q = self._unpack_cpu() if self.packed else unpack_nibbles(self.weight)
        q = q.float().reshape(self.out_features, -1, self.group_size)  # (N, G, group)
        sz = self.scales_and_zeros.transpose(0, 1).float()  # (N, G, 2)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.packed:
            y = kernels.int4_linear(x, self.weight, self.group_size, self.scales_and_zeros, self.bias)
        if y is None:
            y = F.linear(x, self.dequantize().to(x.dtype), self.bias)
        return y


def targets(model: nn.Module, cfg: QuantConfig) -> dict[str, nn.Linear]:
    """The Linear layers to quantize: every one inside the decoder layers (+ lm_head if asked) that fits."""
    out = {}
    for name, module in model.named_modules():
        inside = name.startswith(model.layers_prefix + ".") or (cfg.lm_head and name == "lm_head")
        if inside and isinstance(module, nn.Linear) and not any(key in name for key in cfg.skip):
            # a layer that quantizes its own weights in forward (BitNet's AutoBitLinear) cannot be int8 / int4
            if getattr(module, "quantizes_itself", False):
                raise ConfigError(f"{name} ({type(module).__name__}) quantizes its weights itself; it cannot "
                                  f"also be int{cfg.bits_for(name)}: load the model without quantization")  # fmt: skip
            if cfg.bits_for(name) == 4 and module.in_features % cfg.group_size:
                continue  # the grouping needs whole groups; such a layer stays in floating point
            out[name] = module
    return out


def replace_linears(model: nn.Module, cfg: QuantConfig, dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """Swap target Linear modules for empty quantized ones (on their device); returns {name: float weight shape}."""
    names = targets(model, cfg)
    shapes = {name: tuple(lin.weight.shape) for name, lin in names.items()}
    for name, lin in names.items():
        bias = lin.bias is not None
        with torch.device(lin.weight.device):
            new = (
                Int8Linear(lin.in_features, lin.out_features, bias, dtype)
                if cfg.bits_for(name) == 8
                else Int4Linear(lin.in_features, lin.out_features, bias, dtype, cfg.group_size)
            )
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    model.config.extra["quantization_config"] = cfg.to_dict()
    return shapes


def quantize_weight(
    cfg: QuantConfig, name: str, w: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A float (N, K) weight of module `name` -> the state-dict entries (suffix -> tensor) of its quantized module."""
    return (
        Int8Linear.quantize(w, dtype) if cfg.bits_for(name) == 8 else Int4Linear.quantize(w, cfg.group_size)
    )


def quantize(model: nn.Module, cfg: QuantConfig | str) -> nn.Module:
    """Quantize an already loaded model in place, one Linear at a time."""
    cfg = QuantConfig.parse(cfg)
    dtype = model.dtype
    originals = dict(targets(model, cfg).items())
    replace_linears(model, cfg, dtype)
    for name, lin in originals.items():
        w = out_in(lin, lin.weight.detach())  # (out, in): a Conv1D stores it transposed
        state = {f"{name}.{k}": v for k, v in quantize_weight(cfg, name, w, dtype).items()}
        if lin.bias is not None:
            state[f"{name}.bias"] = lin.bias.detach()
        model.get_submodule(name).load_state_dict({k.removeprefix(name + "."): v for k, v in state.items()})
    quantize_experts(model, cfg)
    return model


def memory_report(model: nn.Module) -> tuple[int, int, int]:
    """(weight bytes now, weight bytes the model would take unquantized in its float dtype, the unquantized
    model's parameter count). A tied model's quantized head is a copy: unquantized it costs nothing; one over
    the embeddings' GGUF blocks holds no bytes of its own. Layers that keep a GGUF file's blocks (nn.ggml) count
    the weights they stand for (`float_shape`)."""
    tensors = {(t.data_ptr(), t.numel(), t.dtype): t for t in [*model.parameters(), *model.buffers()]}
    now = sum(t.numel() * t.element_size() for t in tensors.values())
    item = model.dtype.itemsize
    tied = model.config.tie_word_embeddings
    saved, params = 0, sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for name, m in model.named_modules():
        ggml = hasattr(m, "float_shape")
        if isinstance(m, (Int8Linear, Int4Linear)) or ggml:
            q = sum(t.numel() * t.element_size() for t in m.buffers(recurse=False) if t is not None)
            if tied and name == "lm_head":
                n, q = 0, 0 if ggml else q  # over the embeddings' blocks: counted with them
            else:
                n = math.prod(m.float_shape) if ggml else m.in_features * m.out_features
            saved += n * item - q
            params += n
    experts_now, experts_full = quantized_sizes(model)
    return now, now + saved + experts_full - experts_now, params + experts_full // item
