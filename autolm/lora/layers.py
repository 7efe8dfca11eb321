"""LoRA layers in peft's module layout: LoraLinear and LoraEmbedding (base_layer, lora_A / lora_B per adapter) on
what they share (AdapterLayer: the adapters' bookkeeping, DoRA's norms, merging)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError


class DoraMagnitude(nn.Module):
    """DoRA's magnitude of each output row (peft's DoraLinearLayer): `weight` (out_features,)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def rows_of(names: list[str], device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """(adapter, the indices of the rows naming it) for each adapter a mixed batch names."""
    return [
        (n, torch.tensor([i for i, m in enumerate(names) if m == n], device=device))
        for n in dict.fromkeys(names)
    ]


class AdapterLayer(nn.Module):
    """What LoRA layers share: the base layer, the adapters' scalings, which run, which are merged, whether all are
    off, and DoRA's norms and merging. The subclasses register their adapters' modules after base_layer, in peft's
    order, and say how their weight is laid out: base_weight() with the rows DoRA scales, delta_weight(),
    _factors() (A, B) and _dora_factor()."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self._norms: dict[str, tuple] = {}  # DoRA's row norms outside training: adapter -> (key, norms)
        self._merged_norms: dict[str, torch.Tensor] = {}  # a merged DoRA adapter's row norms, to unmerge it
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: list[str] | None = None  # a mixed batch: each row's adapter (lora.mixed)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def runs(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor | None]]:
        """(adapter, the batch rows it applies to, None for all) for this forward: the active adapters that are
        not merged, or in a mixed batch each adapter's rows."""
        if self.row_adapters is None:
            return [
                (n, None) for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters
            ]
        return [(n, rows) for n, rows in rows_of(self.row_adapters, x.device) if n in self.lora_A]

    def _placement(self) -> tuple[torch.device | None, torch.dtype]:
        """Where a new adapter's tensors go: the base weight's device (none for meta) and float dtype."""
        w = self.base_layer.weight
        return (w.device if w.device.type != "meta" else None), (
            w.dtype if w.dtype.is_floating_point else torch.float32
        )

    def _settle(self, name: str, dora: bool, dtype: torch.dtype) -> None:
        """A new adapter, its A, B and scaling made: DoRA's magnitudes (the adapted weight's norms of the rows
        base_weight() lays out: the output unchanged) or none, and it runs."""
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self._norms.pop(name, None)
        if dora:
            norm = self.row_norms(self.base_weight().to(dtype), self.delta_weight(name, rows=True).to(dtype))
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)
        if name not in self.active_adapters:
            self.active_adapters = [name]

    @staticmethod
    def row_norms(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """||weight + delta|| of each output row, (out,), in weight's dtype, outside autograd (DoRA's norm)."""
        return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype).detach()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters (peft's layer signature; default: the active ones) into the base weight (a DoRA
        adapter: W <- m / ||W + s B A||_row * (W + s B A), the norm that of the weight as it is before this merge,
        kept to unmerge; rows as base_weight() lays them out). A quantized base layer (int8, int4) takes the merged
        weight quantized again, as peft merges into 4- and 8-bit layers: the sum rounded to the layer's grid once
        more. safe_merge: an adapter whose merged weight has NaN or Inf is refused before it is put in."""
        for name in adapter_names or self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                merged = self.float_weight(name) + self.delta_weight(name)
                if name in self.lora_magnitude_vector:
                    norm = self.row_norms(self.base_weight().float(), self.delta_weight(name, rows=True))
                    self._merged_norms[name] = norm
                    merged = self._dora_factor(name, norm) * merged
                if safe_merge and not torch.isfinite(merged).all():
                    raise AdapterError(
                        f"NaNs (or infinities) in the merged weight: the adapter {name!r} seems broken"
                    )
                self._merge_bias(name, 1)
                self._put_weight(merged)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            unmerged = self.float_weight(name)
            if name in self._merged_norms:
                unmerged = unmerged / self._dora_factor(name, self._merged_norms.pop(name))
            self._put_weight(unmerged - self.delta_weight(name))
            self._merge_bias(name, -1)

    def _merge_bias(self, name: str, sign: int) -> None:
        """lora_bias: its bias times the scaling added to (sign 1) or taken from (-1) the base layer's bias."""
        extra = getattr(self.lora_B[name], "bias", None)
        if extra is None:
            return
        if getattr(self.base_layer, "bias", None) is None:
            raise AdapterError(
                f"cannot merge adapter {name!r} with lora_bias=True: the base layer has no bias"
            )
        self.base_layer.bias.data += sign * extra.detach().to(self.base_layer.bias.dtype) * self.scaling[name]

    def check_mergeable(self, adapter: str) -> None:
        """Refuse `adapter`'s merge into a layer kept in a form autolm does not quantize to (a GGUF file's Q2_K,
        Q3_K or IQ4 blocks)."""
        base = self.base_layer
        if base.weight.is_floating_point() or getattr(base, "requantizable", hasattr(base, "requantize")):
            return
        raise AdapterError(
            f"cannot merge adapter {adapter!r} into a {type(base).__name__} of ggml type "
            f"{getattr(base, 'ggml_type', '?')} (autolm does not quantize to it): load the model in floating point "
            "(quantization=None) to merge it"
        )

    def float_weight(self, adapter: str) -> torch.Tensor:
        """The base layer's weight in float32 as stored (dequantized where quantized); see check_mergeable."""
        self.check_mergeable(adapter)
        w = self.base_layer.weight
        return w.data.float() if w.is_floating_point() else self.base_layer.dequantize()

    def _put_weight(self, w: torch.Tensor) -> None:
        if self.base_layer.weight.is_floating_point():
            self.base_layer.weight.data = w.to(self.base_layer.weight.dtype)
        else:
            self.base_layer.requantize(w)

    def _dora_norm(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """||W + s B A||_row in dtype; outside training (and compilers) kept until W, A, B or s change (each token
        of a generation would otherwise recompute the whole adapted weight: 3.3x slower decoding)."""
        (a, b), s = self._factors(name), self.scaling[name]

        def norms() -> torch.Tensor:
            return self.row_norms(self.base_weight().to(dtype), s * (b @ a).detach().to(dtype))

        if self.training or torch.compiler.is_compiling():
            return norms()
        try:  # the tensors' addresses and version counters: an in-place change (training, loading) moves them
            key = (dtype, s, *((id(t), t.data_ptr(), t._version) for t in (self.base_layer.weight, a, b)))
        except RuntimeError:  # tensors made under inference_mode keep no version counter
            return norms()
        cached = self._norms.get(name)
        if cached is None or cached[0] != key:
            cached = self._norms[name] = (key, norms())
        return cached[1]


class LoraLinear(AdapterLayer):
    """A Linear layer with LoRA adapters: y = base(x) + sum_a B_a(A_a(dropout(x))) * scaling_a. A DoRA adapter
    (use_dora, an entry in lora_magnitude_vector) rescales each output row of the adapted weight W + s B A to its
    learned magnitude m instead: y = m / ||W + s B A||_row * (x W^T + s B(A(x))) (+ bias), the norm taken as a
    constant, as peft computes it."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float,
        rslora: bool,
        init: bool | str,
        dora: bool = False,
        bias: bool = False,
    ) -> None:
        device, dtype = self._placement()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=bias, device=device, dtype=dtype)
        if bias and init:
            nn.init.zeros_(self.lora_B[name].bias)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if init is True or init == "default":
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            nn.init.zeros_(self.lora_B[name].weight)
        elif init:  # PiSSA or OLoRA: from the base weight, which keeps the residual
            self._decompose(name, init)
        self._settle(name, dora, dtype)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _decompose(self, name: str, init: str) -> None:
        """peft's PiSSA and OLoRA: B A the base weight's r principal components (SVD: sqrt(S / s) on each side;
        pissa_niter_n: torch's randomized svd_lowrank) or its QR's first r columns of Q and rows of R, the base
        weight left with W - s B A, so the layer computes what it did (an int8 / int4 one quantized again)."""
        self.float_weight(name)  # GGUF blocks: refused by name, before dequantizing their weight
        w, s, r = self.base_weight().float(), self.scaling[name], self.lora_A[name].weight.shape[0]
        if init == "olora":
            q, rr = torch.linalg.qr(w)
            a, b = rr[:r], q[:, :r]
        else:
            if init == "pissa":
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            else:
                u, sv, v = torch.svd_lowrank(w, r, niter=int(init.rsplit("_", 1)[1]))
                vh = v.t()
            root = (sv[:r] / s).sqrt()
            a, b = root[:, None] * vh[:r], u[:, :r] * root
        with torch.no_grad():
            self.lora_A[name].weight.copy_(a)
            self.lora_B[name].weight.copy_(b)
        residual = w - s * b @ a
        self._put_weight(residual.t() if getattr(self.base_layer, "fan_in_fan_out", False) else residual)

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as (out, in), dequantized where the layer keeps it quantized."""
        base = self.base_layer
        w = base.dequantize() if hasattr(base, "dequantize") else base.weight
        return w.t() if getattr(base, "fan_in_fan_out", False) else w

    def delta_weight(self, name: str, rows: bool = False) -> torch.Tensor:
        """scaling * B @ A in fp32, laid out as the base weight: (out, in), or (in, out) for a Conv1D (`rows`:
        (out, in) always)."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.t() if getattr(self.base_layer, "fan_in_fan_out", False) and not rows else delta

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """m / norm, shaped to scale the base weight's output rows (a column of them for a Conv1D's (in, out))."""
        f = (self.lora_magnitude_vector[name].weight.float() / norm.float()).view(-1, 1)
        return f.t() if getattr(self.base_layer, "fan_in_fan_out", False) else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disable_adapters:
            if self.merged_adapters:
                raise AdapterError("cannot disable adapters while they are merged: unmerge_adapter() first")
            return y
        for name, rows in self.runs(x):
            a = self.lora_A[name]
            part = (x if rows is None else x[rows]).to(a.weight.dtype)
            if name in self.lora_magnitude_vector:
                delta, scale = self._dora(name, part, y if rows is None else y[rows]).to(y.dtype), 1.0
            else:
                delta, scale = (
                    self.lora_B[name](a(self.lora_dropout[name](part))).to(y.dtype),
                    self.scaling[name],
                )
            y = y + delta * scale if rows is None else y.index_add(0, rows, delta, alpha=scale)
        return y

    def _dora(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What a DoRA adapter adds to the output so far `y`, as peft computes it: (m / n - 1) * base + m / n *
        s * B(A(x)), n the adapted weight's row norms (constant for autograd), base the output so far less the bias
        (with dropout while training: x W^T of the dropped-out input instead)."""
        a, b, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        scale = (self.lora_magnitude_vector[name].weight / self._dora_norm(name, x.dtype)).view(1, -1)
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = y if bias is None else y - bias
        else:
            x = dropout(x)
            base = x @ self.base_weight().to(x.dtype).t()
        return (scale - 1) * base + scale * b(a(x)) * s


class LoraEmbedding(AdapterLayer):
    """An Embedding with LoRA adapters, as peft's lora.Embedding: y = base(ids) + A^T[ids] @ B^T * scaling, A
    (r, num_embeddings) and B (embedding_dim, r) the parameters lora_embedding_A / lora_embedding_B[name]
    (peft's names, in memory and on disk). A starts at zero and B normal (peft's init; init_lora_weights=False:
    both normal). No dropout (peft applies none to an embedding's ids). A DoRA adapter scales each embedding
    dimension (a column of the weight, its norm over the vocabulary) to its learned magnitude, as peft's
    DoraEmbeddingLayer: y = m / ||W + s (B A)^T||_col * (base(ids) + s A^T[ids] @ B^T)."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()

    @property
    def lora_A(self) -> nn.ParameterDict:  # the adapters this layer holds, named as LoraLinear's
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.ParameterDict:
        return self.lora_embedding_B

    def add_adapter(self, name, r, alpha, dropout, rslora, init, dora=False, bias=False) -> None:
        if bias:
            raise AdapterError(f"lora_bias=True is not supported for an embedding ({name!r}), as in peft")
        device, dtype = self._placement()
        num, dim = self.base_layer.num_embeddings, self.base_layer.embedding_dim
        a = torch.randn(r, num, device=device, dtype=dtype)
        b = torch.randn(dim, r, device=device, dtype=dtype)
        if init:  # any method but False: A at zero, as peft initialises an embedding's adapter
            a.zero_()
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.lora_dropout[name] = nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        self._settle(name, dora, dtype)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def base_weight(self) -> torch.Tensor:
        """The weight's columns as rows (embedding_dim, num_embeddings): the ones DoRA scales."""
        return self.base_layer.weight.t()

    def delta_weight(self, name: str, rows: bool = False) -> torch.Tensor:
        """scaling * (B @ A)^T in fp32, laid out as the weight (num_embeddings, embedding_dim); `rows`: as
        base_weight() (embedding_dim, num_embeddings)."""
        delta = (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()) * self.scaling[
            name
        ]
        return delta if rows else delta.t()

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """m / norm, shaped to scale the weight's columns."""
        return (self.lora_magnitude_vector[name].weight.float() / norm.float()).view(1, -1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        if self.disable_adapters:
            if self.merged_adapters:
                raise AdapterError("cannot disable adapters while they are merged: unmerge_adapter() first")
            return y
        base = self.base_layer
        for name, rows in self.runs(ids):
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            picked = F.embedding(ids if rows is None else ids[rows], a.t(), base.padding_idx, base.max_norm,
                                 base.norm_type, base.scale_grad_by_freq, base.sparse)  # fmt: skip
            delta = (picked @ b.t()) * self.scaling[name]
            if name in self.lora_magnitude_vector:  # peft: m / n * (y so far) + m / n * delta
                scale = self.lora_magnitude_vector[name].weight / self._dora_norm(name, a.dtype)
                before = y if rows is None else y[rows]
                after = (scale * before.to(a.dtype) + scale * delta).to(y.dtype)
                y = after if rows is None else y.index_copy(0, rows, after)
            else:
                y = y + delta.to(y.dtype) if rows is None else y.index_add(0, rows, delta.to(y.dtype))
        return y
