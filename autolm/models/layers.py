"""The pieces a Llama-family model is made of: RMSNorm, Linear (dispatching to autolm's kernels),
attention masks and the static KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as transformers does (F.rms_norm without a weight is
        # its x * rsqrt(mean(x^2) + eps) exactly, in one call instead of five).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear whose matmul goes through autolm's kernel dispatch (same arithmetic, faster kernels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)

    def one_row_kernel(self, dtype: torch.dtype):
        """See kernels.one_row."""
        return kernels.linear_one_row(self.weight, self.bias, dtype)

    def graph_kernel(self):
        """(tensors, fn) computing this layer on (1, K) inputs inside a compiled graph (kernels.linear_graph)."""
        return (
            kernels.linear_graph(self.weight, self.bias)
            if type(self.weight) in (torch.Tensor, nn.Parameter)
            else None
        )

    @classmethod
    def concat(cls, modules: list[Linear]) -> Linear | None:
        """One Linear computing the concatenated outputs of `modules` (see fuse_linears)."""
        if len({m.bias is None for m in modules}) != 1 or not shareable(modules, ["weight", "bias"]):
            return None
        fused = cls(modules[0].in_features, sum(m.out_features for m in modules), bias=False, device="meta")
        fused.weight = nn.Parameter(share_concatenated(modules, "weight"), requires_grad=False)
        if modules[0].bias is not None:
            fused.bias = nn.Parameter(share_concatenated(modules, "bias"), requires_grad=False)
        return fused


def fuse_linears(modules: list[nn.Module]) -> nn.Module | None:
    """One module of the same class computing the concatenated outputs of `modules` (Linear layers with the
    same input, e.g. q/k/v), or None where they cannot be fused. The modules keep their names and values;
    their tensors become views of the fused module's, so fusing costs no memory and in-place changes to
    either are seen by both."""
    cls = type(modules[0])
    if len(modules) == 1:
        return modules[0]
    if any(type(m) is not cls for m in modules) or not hasattr(cls, "concat"):
        return None
    return cls.concat(modules)


def shareable(modules: list[nn.Module], names: list[str]) -> bool:
    """Whether these tensors of `modules` are plain tensors of one dtype on one device (so they can be fused)."""
    tensors = [getattr(m, n) for m in modules for n in names if getattr(m, n, None) is not None]
    return (
        all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)
        and len({(t.dtype, t.device) for t in tensors}) == 1
        and tensors[0].device.type != "meta"
    )


def share_concatenated(modules: list[nn.Module], name: str, dim: int = 0) -> torch.Tensor:
    """Concatenate the tensor `name` of each module along dim, then make each module's tensor a view of the
    result (a Parameter keeps its identity: its .data is replaced)."""
    parts = [getattr(m, name) for m in modules]
    fused = _adjacent(parts, dim)
    if fused is not None:  # fused before (a plan rebuilt): the parts already are views of it
        return fused
    fused = torch.cat([t.detach() for t in parts], dim)
    start = 0
    for m, t in zip(modules, parts):
        view = fused.narrow(dim, start, t.shape[dim])
        if isinstance(t, nn.Parameter):
            t.data = view
        else:
            setattr(m, name, view)
        start += t.shape[dim]
    return fused


def _adjacent(parts: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """The contiguous tensor the parts are consecutive views of along dim (what torch.cat would give, without
    copying), or None where they are not."""
    first = parts[0]
    start = 0
    for t in parts:
        others = t.shape[:dim] + t.shape[dim + 1 :]
        if (
            t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or t.dtype != first.dtype
            or t.stride() != first.stride()
            or others != first.shape[:dim] + first.shape[dim + 1 :]
            or t.storage_offset() != first.storage_offset() + start * first.stride(dim)
        ):
            return None
        start += t.shape[dim]
    shape = list(first.shape)
    shape[dim] = start  # ends where the last part ends, inside the storage
    fused = first.detach().as_strided(shape, first.stride(), first.storage_offset())
    return fused if fused.is_contiguous() else None


def embedding(num: int, dim: int) -> nn.Embedding:
    if torch.get_default_device().type == "meta":
        # Weights come from the checkpoint; skipping normal_() on meta saves ~1 s of first-call setup.
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


def resized_rows(old: torch.Tensor, n: int, mean_resizing: bool = True, std: float = 0.02) -> torch.Tensor:
    """`old` (vocab, dim) cut or grown to n rows, as transformers resizes embeddings: added rows are drawn
    from a normal with the old rows' mean and 1e-9 times their covariance (the mean itself when that is
    not positive definite), or from N(0, std) without mean_resizing."""
    new = old.new_empty(n, old.shape[1])
    keep = min(n, old.shape[0])
    new[:keep] = old[:keep]
    added = n - keep
    if added > 0:
        w = old.detach().float()
        if mean_resizing:
            mean = w.mean(0)
            cov = 1e-9 * (w - mean).T @ (w - mean) / w.shape[0]
            if torch.distributions.constraints.positive_definite.check(cov).all():
                rows = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).sample((added,))
            else:
                rows = mean.expand(added, -1)
        else:
            rows = torch.randn(added, old.shape[1], device=old.device) * std
        new[keep:] = rows.to(old.dtype)
    return new


class KVCache:
    """Per-layer key/value buffers (B, n_kv, capacity, hd), written at the positions a forward pass gives.

    The buffers are allocated once; `static=True` marks their addresses fixed for torch.compile, so a
    compiled decode step can be captured in a CUDA graph. In eager mode a write past the end grows
    them (to at least twice the capacity), so the cache also works as a growing cache. `length` counts
    the tokens stored, kept by the model's forward outside any compiled region. Sliding-window layers
    keep every position and rely on the attention mask for the window.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | list = "cpu",
        static: bool = False,
    ):
        shape = (batch_size, num_kv_heads, max(capacity, 1), head_dim)
        devices = (
            device if isinstance(device, list) else [device] * num_layers
        )  # one per layer under a device_map
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.length = 0
        self.static = static
        self.fused = (
            None  # (plan number, usable) once a model checked its fused one-token step against this cache
        )
        if static:
            for t in self.keys + self.values:
                torch._dynamo.mark_static_address(t)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor, kv_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at cache_position (T,); return the first kv_length keys and values."""
        self.keys[layer].index_copy_(2, cache_position, k)
        self.values[layer].index_copy_(2, cache_position, v)
        return self.keys[layer][:, :, :kv_length], self.values[layer][:, :, :kv_length]

    def reserve(self, needed: int) -> None:
        """Make room for `needed` tokens in all (growing to at least twice the capacity when short)."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, buf in enumerate(buffers):
                bigger = buf.new_zeros(buf.shape[0], buf.shape[1], new_cap, buf.shape[3])
                bigger[:, :, : buf.shape[2]] = buf
                buffers[i] = bigger

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i], written in place."""
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf.copy_(buf.index_select(0, index.to(buf.device)))

    @classmethod
    def gather(cls, rows: list[tuple[KVCache, int, int]], capacity: int, static: bool = False) -> KVCache:
        """A new cache of rows (cache, row, n): each row's last n tokens, right-aligned to the longest n.

        This is how a serving loop lets requests join and leave a running batch: the slots to the
        left of a shorter row are padding, hidden by its attention mask.
        """
        first = rows[0][0]
        L = max(n for _, _, n in rows)
        _, n_kv, _, hd = first.keys[0].shape
        new = cls(
            len(first.keys),
            len(rows),
            n_kv,
            hd,
            max(capacity, L),
            first.keys[0].dtype,
            [k.device for k in first.keys],
            static,
        )
        for layer in range(len(first.keys)):
            for i, (c, r, n) in enumerate(rows):
                if n:
                    new.keys[layer][i, :, L - n : L] = c.keys[layer][r, :, c.length - n : c.length]
                    new.values[layer][i, :, L - n : L] = c.values[layer][r, :, c.length - n : c.length]
        new.length = L
        return new


def default_positions(
    attention_mask: torch.Tensor | None, cache_position: torch.Tensor, B: int
) -> torch.Tensor:
    """Positions (B, T) of the new tokens: counted over real tokens when a padding mask is given."""
    if attention_mask is None:
        return cache_position.unsqueeze(0).expand(B, -1)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos.index_select(1, cache_position)


def build_masks(
    windows: set[int | None],
    attention_mask: torch.Tensor | None,
    cache_position: torch.Tensor,
    B: int,
    S: int,
) -> dict[int | None, torch.Tensor | None]:
    """One boolean mask (B, 1, T, S) per window size (None: full attention), for queries at
    cache_position over S key slots; None where plain causal attention does (eager only)."""
    T = cache_position.shape[0]
    device = cache_position.device
    if not torch.compiler.is_compiling():
        has_padding = attention_mask is not None and not bool(attention_mask[:, :S].all())
        starts_at_zero = T == S  # a prompt with no past: the causal kernel applies as is
        plain = not has_padding and (starts_at_zero or T == 1)
        if plain and all(w is None or w >= S for w in windows):
            return dict.fromkeys(windows)
    q = cache_position[:, None]  # slot index of each query (T, 1)
    kv = torch.arange(S, device=device)[None, :]
    causal = kv <= q
    masks: dict[int | None, torch.Tensor | None] = {}
    for window in windows:
        allowed = causal if window is None else causal & (kv > q - window)
        allowed = allowed[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :S].bool()
            # A padding query would see nothing and give NaN: let it see itself (its output is never used).
            allowed = allowed | (kv == q)[None, None]
        masks[window] = allowed
    return masks


def pad_mask_to(attention_mask: torch.Tensor, S: int) -> torch.Tensor:
    """A (B, n) padding mask widened with zeros to (B, S) key slots."""
    return F.pad(attention_mask, (0, S - attention_mask.shape[-1]))
