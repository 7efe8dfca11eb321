"""The mixture-of-experts block, with transformers 5's names: a router (`gate`, or gpt-oss's `router`), the
experts stacked in two parameters (`experts.gate_up_proj` (E, 2I, h) and `experts.down_proj` (E, h, I);
transposed for gpt-oss) and, for Qwen 2 MoE, a shared expert gated by a sigmoid.

Routing differs by family only in its order of operations (`Router`); the experts' arithmetic is
kernels.mixture: grouped matmuls over the rows each expert was given, or each row's expert by index inside a
compiled graph. Checkpoints on the Hub keep one tensor per expert; the families' CheckpointRules stack them.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..errors import ConfigError
from ..kernels.experts import expert_linear
from .mlp import ACTIVATIONS


class Router(nn.Module):
    """Top-k routing over `num_experts` logits (x @ weight.T + bias):

    - "softmax_topk" (Mixtral, Qwen MoE): softmax in fp32 over all experts, the top k, renormalised when
      `normalize`; `keep_fp32` leaves the weights in fp32 (Mixtral), else they take the logits' dtype;
    - "topk_softmax" (gpt-oss): the top k logits, softmax over them in the logits' dtype.

    `GroupedRouter` adds DeepSeek V3's sigmoid routing.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, bias: bool = False,
                 order: str = "softmax_topk", normalize: bool = True, keep_fp32: bool = False):  # fmt: skip
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.top_k, self.num_experts, self.order = top_k, num_experts, order
        self.normalize, self.keep_fp32 = normalize, keep_fp32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, h) -> (expert ids (N, k), routing weights (N, k))."""
        logits = kernels.linear(
            x, self.weight, self.bias
        )  # (N, E); in a compiled step, a loop fused with the rest
        if self.order == "topk_softmax":
            top, ids = torch.topk(logits, self.top_k, dim=-1)
            return ids, torch.softmax(top, dim=-1, dtype=top.dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return ids, top if self.keep_fp32 else top.to(logits.dtype)


class GroupedRouter(Router):
    """DeepSeek V3's routing (GLM-4.5, dots.llm1, Kimi K2): sigmoid scores in fp32; experts chosen by score +
    `e_score_correction_bias` (a buffer the checkpoint holds), only among the `topk_group` of `n_group` groups whose
    best two choices sum highest; their plain scores weighted, renormalised when `normalize` (+ 1e-20), times
    `scaling` (routed_scaling_factor). The weights stay fp32, as transformers multiplies the experts' outputs."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, n_group: int = 1, topk_group: int = 1,
                 normalize: bool = True, scaling: float = 1.0):  # fmt: skip
        super().__init__(hidden, num_experts, top_k, normalize=normalize, keep_fp32=True)
        if num_experts % n_group or not 1 <= topk_group <= n_group:
            raise ConfigError(
                f"{num_experts} experts cannot be routed in {n_group} groups choosing {topk_group}"
            )
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.n_group, self.topk_group, self.scaling = n_group, topk_group, scaling

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.nn.functional.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            best = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, groups)
            keep = torch.zeros_like(best).scatter_(1, best.topk(self.topk_group, dim=-1)[1], 1.0)
            choice = grouped.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).view(-1, self.num_experts)
        ids = torch.topk(choice, self.top_k, dim=-1)[1]
        top = scores.gather(1, ids)
        if self.normalize:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, top * self.scaling

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, top {self.top_k}, groups {self.topk_group} of {self.n_group}"


class Experts(nn.Module):
    """`num_experts` gated MLPs stacked: gate_up_proj (E, 2I, h) and down_proj (E, h, I), or with `transposed`
    (gpt-oss) (E, h, 2I) and (E, I, h); optional biases gate_up_proj_bias (E, 2I), down_proj_bias (E, h).
    The gate and up halves are concatenated ([gate; up]) or, with `interleaved`, alternate (gate0, up0, ...).
    `limit` and `alpha` give gpt-oss's clamped activation: (clamp(up) + 1) * g * sigmoid(alpha * g), g = gate
    clamped from above; `limit` alone Step 3.5's: act(gate) clamped from above times up clamped to +-limit;
    otherwise act(gate) * up."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str = "silu", *, bias: bool = False,
                 transposed: bool = False, interleaved: bool = False, limit: float | None = None,
                 alpha: float | None = None):  # fmt: skip
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden, intermediate
        E, h, i = num_experts, hidden, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(E, h, 2 * i) if transposed else torch.empty(E, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(E, i, h) if transposed else torch.empty(E, h, i))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * i))
            self.down_proj_bias = nn.Parameter(torch.empty(E, h))
        self.transposed, self.interleaved, self.limit, self.alpha = transposed, interleaved, limit, alpha
        self.act_fn = ACTIVATIONS[act]
        self.tp: tuple[int, int] | None = None  # (rank, ranks) under tensor parallelism (shard)

    by_row = False  # whether each row's own expert computes in one call eagerly too (kernels.mixture)

    def project(self, name: str, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        """x @ expert e's `name` projection (+ its bias); see kernels.experts.expert_linear."""
        bias = getattr(self, f"{name}_bias", None)
        if name == "down_proj" and self.tp is not None and self.tp[0] != 0:
            bias = None  # the ranks' partial outputs are summed: one of them adds the bias
        return expert_linear(x, getattr(self, name), e, bias, self.transposed)

    def glu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(rows, 2I) -> (rows, I): the gated activation."""
        if self.interleaved:
            return self.gated(gate_up[..., ::2], gate_up[..., 1::2])
        return self.gated(*gate_up.chunk(2, dim=-1))

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The activation of the gate and up projections (rows, I) each."""
        if self.limit is None:
            return self.act_fn(gate) * up
        up = up.clamp(min=-self.limit, max=self.limit)
        if self.alpha is None:
            return self.act_fn(gate).clamp(max=self.limit) * up
        gate = gate.clamp(max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def expert(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        """Expert e's MLP over rows x (n, h) -> (n, h); e an int, or one id per row."""
        return self.project("down_proj", self.glu(self.project("gate_up_proj", x, e)), e)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, h), the router's ids and weights (N, k) -> the weighted sum of the selected experts (N, h)."""
        y = kernels.mixture(x, ids, weights, self.num_experts, self.expert, self.by_row)
        if self.tp is not None:  # each rank computed its slice of every expert's intermediate rows
            torch.distributed.all_reduce(y)
        return y

    def tp_layout(self) -> dict[str, tuple[int, int]]:
        """{parameter: (dim, parts)}: the intermediate dimension tensor parallelism cuts, and into how many parts
        the tensor falls first (2: [gate; up] concatenated, each half cut alike)."""
        t, parts = self.transposed, 1 if self.interleaved else 2
        out = {"gate_up_proj": (2 if t else 1, parts), "down_proj": (1 if t else 2, 1)}
        if hasattr(self, "gate_up_proj_bias"):
            out["gate_up_proj_bias"] = (1, parts)
        return out

    def shard(self, rank: int, world: int) -> dict[str, tuple[int, int]]:
        """Tensor parallelism over `world` ranks (on the meta model, before loading): keep this rank's slice of
        every expert's intermediate rows, gate/up column-parallel and down row-parallel, the partial outputs
        summed in forward. Returns tp_layout() for the loader, which cuts each full tensor the same way."""
        if self.intermediate_size % world:
            raise ConfigError(f"tensor parallel over {world} ranks needs the experts' intermediate size "
                              f"({self.intermediate_size}) divisible by {world}")  # fmt: skip
        layout = self.tp_layout()
        for name, (dim, _) in layout.items():
            p = getattr(self, name)
            shape = list(p.shape)
            shape[dim] //= world
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=p.dtype, device=p.device)))
        self.intermediate_size //= world
        self.tp = (rank, world)
        return layout

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tp is None or self.gate_up_proj.device.type == "meta":
            return
        for name, (dim, parts) in self.tp_layout().items():  # whole tensors, as one process holds them
            local = destination[prefix + name].detach()
            shards = [torch.empty_like(local) for _ in range(self.tp[1])]
            torch.distributed.all_gather(shards, local)
            pieces = [shard.chunk(parts, dim) for shard in shards]
            destination[prefix + name] = torch.cat([piece[i] for i in range(parts) for piece in pieces], dim)

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, hidden {self.hidden_size}, intermediate {self.intermediate_size}"


class SparseMoeBlock(nn.Module):
    """Router + experts (+ a shared expert gated by sigmoid(shared_expert_gate(x)), Qwen 2 MoE; or, ungated,
    `shared_experts`, DeepSeek V3's). `router_name` is the router's attribute (transformers: `gate`; gpt-oss:
    `router`). With `jitter_noise` (Mixtral), training multiplies the input by uniform noise in [1 - jitter,
    1 + jitter]."""

    def __init__(self, router: Router, experts: Experts, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None, router_name: str = "gate",
                 jitter_noise: float = 0.0, shared_experts: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.router_name, self.jitter_noise = router_name, jitter_noise
        setattr(self, router_name, router)
        self.experts = experts
        if shared_expert is not None:
            self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate
        if shared_experts is not None:
            self.shared_experts = shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        flat = x.reshape(-1, h)
        ids, weights = getattr(self, self.router_name)(flat)
        y = self.experts(flat, ids, weights)
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(flat)
        return y.view(B, T, h)


def experts_summary(model: nn.Module, parameters: int) -> tuple[int, int, int, int] | None:
    """(mixture-of-experts layers, experts per layer, experts each token uses, parameters one token uses: the
    model's `parameters` less the share of every expert it does not use), or None for a model without experts. A block
    marked `held` (loaded and saved, never run: ERNIE 4.5 VL's vision experts on text) counts wholly unused."""
    every = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    blocks = [m for m in every if not getattr(m, "held", False)]
    if not blocks:
        return None
    unused = 0
    for block in every:
        e = block.experts
        per_expert = 3 * e.hidden_size * e.intermediate_size
        per_expert += 2 * e.intermediate_size + e.hidden_size if hasattr(e, "down_proj_bias") else 0
        used = 0 if getattr(block, "held", False) else getattr(block, block.router_name).top_k
        unused += (e.num_experts - used) * per_expert
    router = getattr(blocks[0], blocks[0].router_name)
    return len(blocks), blocks[0].experts.num_experts, router.top_k, parameters - unused
