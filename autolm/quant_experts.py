"""Weight-only int8 / int4 quantization of stacked experts (nn.Experts), with autolm.quant's arithmetic per
expert: int8 per output row (scale and offset), int4 in groups of `group_size` input columns.

The quantized weights are held as (experts, out, in) whatever the float layout (gpt-oss stores its experts
transposed), so each expert's weight is the 2-D matrix PyTorch's CPU kernels take: eager, each expert that got
rows runs one kernel call on a view of its weight (kernels.experts); inside a compiled graph each row reads its
expert's weight by index. Biases stay in floating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels.experts import int4_expert_linear, int8_expert_linear
from .kernels.quant import COMPUTE, pack_nibbles, quantize_int4, quantize_int8
from .nn.moe import Experts

PROJECTIONS = ("gate_up_proj", "down_proj")


class _QuantizedExperts(Experts):
    """What both quantized forms share: the float module's settings and biases, (E, out, in) shapes."""

    def __init__(self, like: Experts, dtype: torch.dtype):
        nn.Module.__init__(self)
        for k in (
            "num_experts",
            "hidden_size",
            "intermediate_size",
            "interleaved",
            "limit",
            "alpha",
            "act_fn",
        ):
            setattr(self, k, getattr(like, k))
        # the quantized weights are (E, out, in); never tensor-parallel
        self.transposed, self.tp = False, None
        self.float_transposed = like.transposed
        self.shapes = {}  # projection -> (E, out, in)
        for name in PROJECTIONS:
            E, a, b = getattr(like, name).shape
            self.shapes[name] = (E, b, a) if like.transposed else (E, a, b)
            bias = getattr(like, f"{name}_bias", None)
            if bias is not None:
                setattr(
                    self,
                    f"{name}_bias",
                    nn.Parameter(torch.empty(bias.shape, dtype=dtype), requires_grad=False),
                )

    def dequantized_parameters(self) -> dict[str, torch.Tensor]:
        """{stacked parameter: the float32 values it stands for, in the float module's layout}."""
        out = {}
        for name in PROJECTIONS:
            w = torch.stack([self.expert_weight(name, e) for e in range(self.num_experts)])
            out[name] = w.transpose(1, 2) if self.float_transposed else w
        return out

    def _bias(self, name: str, y: torch.Tensor, e) -> torch.Tensor:
        b = getattr(self, f"{name}_bias", None)
        return y if b is None else y + b[e].to(y.dtype)


class Int8Experts(_QuantizedExperts):
    """<proj> int8 (E, out, in), <proj>_scales and <proj>_offsets (E, out): w ~ q * scale + offset per row."""

    def __init__(self, like: Experts, dtype: torch.dtype):
        super().__init__(like, dtype)
        for name, (E, N, K) in self.shapes.items():
            self.register_buffer(name, torch.empty(E, N, K, dtype=torch.int8))
            self.register_buffer(f"{name}_scales", torch.empty(E, N, dtype=dtype))
            self.register_buffer(f"{name}_offsets", torch.empty(E, N, dtype=dtype))

    @staticmethod
    def quantize(w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A float (E, out, in) weight -> its entries (suffix "" for the weight, "_scales", "_offsets")."""
        parts = [quantize_int8(w[e]) for e in range(w.shape[0])]
        return {"": torch.stack([p[0] for p in parts]), "_scales": torch.stack([p[1] for p in parts]).to(dtype),
                "_offsets": torch.stack([p[2] for p in parts]).to(dtype)}  # fmt: skip

    def expert_weight(self, name: str, e) -> torch.Tensor:
        """Expert e's float32 (out, in) weight (e a tensor: one per row)."""
        q, s, o = (
            getattr(self, name)[e],
            getattr(self, f"{name}_scales")[e],
            getattr(self, f"{name}_offsets")[e],
        )
        return q.float() * s.float().unsqueeze(-1) + o.float().unsqueeze(-1)

    def project(self, name: str, x: torch.Tensor, e) -> torch.Tensor:
        q, s, o = getattr(self, name), getattr(self, f"{name}_scales"), getattr(self, f"{name}_offsets")
        y = int8_expert_linear(x, q, s, o, e)
        if y is None:
            y = _dequantized(x, self.expert_weight(name, e))
        return self._bias(name, y, e)


class Int4Experts(_QuantizedExperts):
    """<proj> (E, out, in / 2) in the CPU kernel's packed layout where it exists (`packed`), else two values per
    byte (even column low); <proj>_scales_and_zeros (E, in / group, out, 2): w = (q - 8) * scale + zero."""

    def __init__(self, like: Experts, dtype: torch.dtype, group_size: int):
        super().__init__(like, dtype)
        self.group_size, self.packed = group_size, False
        for name, (E, N, K) in self.shapes.items():
            self.register_buffer(name, torch.empty(E, N, K // 2, dtype=torch.uint8))
            self.register_buffer(
                f"{name}_scales_and_zeros", torch.empty(E, K // group_size, N, 2, dtype=COMPUTE)
            )

    @staticmethod
    def quantize(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        """A float (E, out, in) weight -> its entries in the portable layout."""
        parts = [quantize_int4(w[e], group_size) for e in range(w.shape[0])]
        return {"": torch.stack([pack_nibbles(p[0]) for p in parts]),
                "_scales_and_zeros": torch.stack([p[1] for p in parts]).to(COMPUTE)}  # fmt: skip

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if all(prefix + n in state_dict for n in PROJECTIONS):  # (else this layer stays as it is)
            self.packed = False
        cpu = all(state_dict.get(prefix + n, torch.empty(0)).device.type == "cpu" for n in PROJECTIONS)
        for name in PROJECTIONS:
            sz = prefix + f"{name}_scales_and_zeros"
            if sz in state_dict:
                state_dict[sz] = state_dict[sz].to(COMPUTE)
        if cpu and all(prefix + n in state_dict for n in PROJECTIONS):
            packed = {n: [kernels.int4_pack(w) for w in state_dict[prefix + n]]
                      for n in PROJECTIONS}  # fmt: skip
            if all(p is not None for ps in packed.values() for p in ps):
                state_dict.update({prefix + n: torch.stack(ps) for n, ps in packed.items()})
                self.packed = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            for name in PROJECTIONS:
                destination[prefix + name] = torch.stack([pack_nibbles(self._q(name, e))
                                                          for e in range(self.num_experts)])  # fmt: skip

    def _q(self, name: str, e) -> torch.Tensor:
        """Expert e's q (out, in) in 0..15 (e a tensor: one per row, portable layout only)."""
        w = getattr(self, name)[e]
        if not self.packed:
            return torch.stack([w & 0xF, w >> 4], -1).flatten(-2)
        sz = getattr(self, f"{name}_scales_and_zeros")[e]
        return kernels.int4_unpack(w, self.group_size, self.shapes[name][2], sz)

    def expert_weight(self, name: str, e) -> torch.Tensor:
        """Expert e's float32 (out, in) weight (e a tensor: one per row)."""
        sz = getattr(self, f"{name}_scales_and_zeros")[e].transpose(-3, -2).float()  # (..., out, groups, 2)
        q = self._q(name, e).float().unflatten(-1, (-1, self.group_size))  # (..., out, groups, group)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).flatten(-2)

    def project(self, name: str, x: torch.Tensor, e) -> torch.Tensor:
        y = None
        if self.packed:
            sz = getattr(self, f"{name}_scales_and_zeros")
            y = int4_expert_linear(x, getattr(self, name), self.group_size, sz, e)
        if y is None:
            y = _dequantized(x, self.expert_weight(name, e))
        return self._bias(name, y, e)


def _dequantized(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for one weight (out, in), or row by row for one weight per row (rows, out, in)."""
    if w.dim() == 2:
        return F.linear(x, w.to(x.dtype))
    return torch.bmm(w.to(x.dtype), x.unsqueeze(-1)).squeeze(-1)


def experts_to_quantize(model: nn.Module, cfg) -> dict[str, Experts]:
    """The float Experts modules inside the decoder layers that fit the quantization (int4: whole groups)."""
    out = {}
    for name, m in model.named_modules():
        if type(m) is Experts and name.startswith(model.layers_prefix + "."):
            ks = [m.gate_up_proj.shape[1 if m.transposed else 2], m.down_proj.shape[1 if m.transposed else 2]]
            if cfg.bits == 4 and any(k % cfg.group_size for k in ks):
                continue  # the grouping needs whole groups: these experts stay in floating point
            out[name] = m
    return out


def replace_experts(model: nn.Module, cfg, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Swap the float Experts for empty quantized ones (on their device); returns {stacked parameter name: (its
    float shape, whether that is transposed)} for the loader."""
    out = {}
    for name, m in experts_to_quantize(model, cfg).items():
        with torch.device(m.gate_up_proj.device):
            new = Int8Experts(m, dtype) if cfg.bits == 8 else Int4Experts(m, dtype, cfg.group_size)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)
        out.update({f"{name}.{p}": (tuple(getattr(m, p).shape), m.transposed) for p in PROJECTIONS})
    return out


def quantize_stacked(cfg, name: str, w: torch.Tensor, transposed: bool, dtype) -> dict[str, torch.Tensor]:
    """A float stacked expert weight (the parameter `name`) -> the quantized module's entries for it."""
    w = w.transpose(1, 2) if transposed else w
    entries = Int8Experts.quantize(w, dtype) if cfg.bits == 8 else Int4Experts.quantize(w, cfg.group_size)
    return {f"{name}{suffix}": t for suffix, t in entries.items()}


def quantize_experts(model: nn.Module, cfg) -> None:
    """Quantize the loaded model's float experts in place."""
    originals = experts_to_quantize(model, cfg)
    replace_experts(model, cfg, model.dtype)
    for name, m in originals.items():
        state = {}
        for p in PROJECTIONS:
            state.update(quantize_stacked(cfg, p, getattr(m, p).detach(), m.transposed, model.dtype))
            bias = getattr(m, f"{p}_bias", None)
            if bias is not None:
                state[f"{p}_bias"] = bias.detach()
        model.get_submodule(name).load_state_dict(state)


def quantized_sizes(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantized experts' weights hold now, bytes they would hold in the model's float dtype)."""
    now = full = 0
    for m in model.modules():
        if isinstance(m, _QuantizedExperts):
            now += sum(t.numel() * t.element_size() for n, t in m.named_buffers() if not n.endswith("bias"))
            full += sum(E * N * K for E, N, K in m.shapes.values()) * model.dtype.itemsize
    return now, full
