"""peft's trainable tokens (LoraConfig's `trainable_token_indices`): chosen rows of the input embeddings trained on
their own (new special tokens of a chat template) while the rest stays frozen, in peft's layout. The embedding
layer is wrapped in a TrainableTokensWrapper whose `token_adapter` (TrainableTokensLayer) holds the base layer
and, per adapter, the rows' trained values (`trainable_tokens_delta`, what the adapter file keeps) and their
originals (to unmerge). An output layer tied to the embeddings gets a wrapper sharing those values (peft's tied
adapter), so the tied rows stay one.

As peft's, the rows replace the base rows (they are not added to them). Unlike peft, a forward does not copy the
whole matrix: the embedding's output rows of those tokens are swapped for the trained ones, and the tied output
layer's logits of those tokens computed from them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from .layers import rows_of


class BufferDict(nn.Module):
    """Tensors by adapter name, as buffers (they move with the model and are no parameters), as peft's BufferDict."""

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        self.register_buffer(name, t)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers


class TrainableTokensLayer(nn.Module):
    """The base layer (an Embedding, or the Linear output layer tied to it) and the adapters' rows."""

    def __init__(self, base_layer: nn.Module, tied: TrainableTokensLayer | None = None):
        super().__init__()
        self.base_layer = base_layer
        # in a list: the tied layer's tensors are not this module's (nor saved under its name)
        self._tied = [tied] if tied is not None else []
        if tied is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = BufferDict()  # the base rows as they were, to unmerge
            self.token_indices: dict[str, list[int]] = {}

    @property
    def source(self) -> TrainableTokensLayer:
        """The layer holding the rows: this one, or the embedding's that a tied output layer follows."""
        return self._tied[0] if self._tied else self

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices, their trained rows) of an adapter, on the base weight's device."""
        src = self.source
        delta = src.trainable_tokens_delta[name]
        return torch.tensor(src.token_indices[name], device=delta.device), delta

    def add_adapter(self, name: str, indices: list[int]) -> None:
        if self._tied:
            raise AdapterError("trainable_token_indices: this layer follows the tied input embeddings' rows; name "
                               "the input embeddings instead")  # fmt: skip
        weight = self.base_layer.weight
        bad = [i for i in indices if not 0 <= i < weight.shape[0]]
        if bad:
            raise AdapterError(
                f"trainable_token_indices {bad[:10]} are outside the embeddings' {weight.shape[0]} rows"
            )
        original = weight.detach()[torch.tensor(indices, device=weight.device)].clone()
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(original.clone())
        self.trainable_tokens_original[name] = original

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight with these adapters' rows in place (peft's get_merged_weights)."""
        weight = self.base_layer.weight
        for name in names:
            index, delta = self.rows(name)
            weight = weight.index_copy(0, index, delta.to(weight.dtype))
        return weight

    def forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        out = self.base_layer(x)
        for name in names:
            index, delta = self.rows(name)
            if isinstance(self.base_layer, nn.Embedding):  # the output rows of those tokens swapped
                hit = x.unsqueeze(-1) == index
                picked = delta[hit.long().argmax(-1)].to(out.dtype)
                out = torch.where(hit.any(-1, keepdim=True), picked, out)
            else:  # the tied output layer: those tokens' logits from the trained rows
                out = out.index_copy(-1, index, F.linear(x, delta.to(x.dtype)).to(out.dtype))
        return out


class TrainableTokensWrapper(nn.Module):
    """peft's TrainableTokensWrapper around an Embedding (or a Linear tied to it): one adapter's rows run at a time."""

    def __init__(self, module: nn.Module, tied: TrainableTokensWrapper | None = None):
        super().__init__()
        if not isinstance(module, (nn.Embedding, nn.Linear)) or not module.weight.is_floating_point():
            raise AdapterError(f"trainable_token_indices: expected a floating-point Embedding or Linear, got "
                               f"{type(module).__name__} (load the model unquantized to train token rows)")  # fmt: skip
        self.token_adapter = TrainableTokensLayer(module, tied.token_adapter if tied is not None else None)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: list[str] | None = None  # a mixed batch: each row's adapter (lora.mixed)

    @property
    def tied(self) -> bool:
        return bool(self.token_adapter._tied)

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def available(self) -> list[str]:
        return list(self.token_adapter.source.trainable_tokens_delta)

    def running(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [n for n in self.active_adapters if n in self.available and n not in self.merged_adapters][:1]

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the model sees it: the running adapter's rows in place (peft's)."""
        return self.token_adapter.merged_weight(self.running())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is None or self.disable_adapters:
            return self.token_adapter(x, self.running())
        out = self.token_adapter(x, [])
        for name, rows in rows_of(self.row_adapters, x.device):
            if name in self.available:
                out = out.index_copy(0, rows, self.token_adapter(x[rows], [name]))
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapters' rows into the base weight (the tied layer's weight is the same tensor)."""
        names = [n for n in (adapter_names or self.active_adapters) if n in self.available]
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        if not self.tied:
            merged = self.token_adapter.merged_weight(names).detach()
            if safe_merge and not torch.isfinite(merged).all():
                raise AdapterError(
                    f"NaNs (or infinities) in the merged weights: the adapter {names[0]!r} seems broken"
                )
            self.base_layer.weight.data.copy_(merged)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if not self.tied:
                index, _ = self.token_adapter.rows(name)
                original = self.token_adapter.trainable_tokens_original[name]
                self.base_layer.weight.data.index_copy_(0, index, original.to(self.base_layer.weight.dtype))

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged: unmerge_adapter() before deleting it")
        src = self.token_adapter
        if not self.tied and name in src.trainable_tokens_delta:
            del src.trainable_tokens_delta[name], src.trainable_tokens_original[name]
            del src.token_indices[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]


def targets(model: nn.Module, indices: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """{module name: token indices}: a list is the input embeddings' (peft's rule), a dict names its modules."""
    if isinstance(indices, dict):
        return {k: list(v) for k, v in indices.items()}
    emb = model.get_input_embeddings()
    return {next(n for n, m in model.named_modules() if m is emb): list(indices)}
