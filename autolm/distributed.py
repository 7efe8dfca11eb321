"""Tensor parallelism on torch.distributed: DTensor layouts from torch.distributed.tensor.parallel.

`from_pretrained(..., tp_plan="auto")` under torchrun: q/k/v/gate/up are column-parallel (each rank
holds a slice of the output features, i.e. of the heads), o/down row-parallel (a slice of the input
features, outputs summed across ranks). Embeddings, norms and the LM head stay replicated. Each
rank reads only its slice of each sharded weight from the memory-mapped checkpoint, and its KV
cache holds only its own heads.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import ConfigError

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def init_from_env():
    """The default process group (gloo on CPU, nccl on CUDA) from torchrun's environment; returns a 1-D mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError("tp_plan='auto' needs torch.distributed: launch with torchrun "
                              "(e.g. torchrun --nproc-per-node 2 script.py) or `autolm generate --tp N`")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return init_device_mesh(device, (dist.get_world_size(),))


def tp_plan(config, world: int) -> dict[str, object]:
    """{module path pattern: ParallelStyle} for every decoder layer; checks that heads divide evenly."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    for name, n in (("num_attention_heads", config.num_attention_heads),
                    ("num_key_value_heads", config.num_key_value_heads),
                    ("intermediate_size", config.intermediate_size)):
        if n % world:
            raise ConfigError(f"tensor parallel over {world} ranks needs {name} ({n}) divisible by {world}")
    plan: dict[str, object] = {}
    for i in range(config.num_hidden_layers):
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                plan[f"model.layers.{i}.{part}.{n}"] = ColwiseParallel() if n in COLWISE else RowwiseParallel()
    return plan


def parallelize(model: nn.Module, mesh) -> dict[str, tuple[int, int, int]]:
    """Apply the plan to the meta model; returns {parameter: (dim, rank, world)} for the sharded ones."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    world, rank = mesh.size(), mesh.get_local_rank()
    parallelize_module(model, mesh, tp_plan(model.config, world))
    for layer in model.model.layers:
        layer.self_attn.num_heads //= world  # each rank computes its own heads
        layer.self_attn.num_kv_heads //= world
    shards = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            (placement,) = p.placements
            if isinstance(placement, Shard):
                shards[name] = (placement.dim, rank, world)
    return shards


def local_slice(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous block of a full tensor, copied out of the memory map."""
    return t.chunk(world, dim=dim)[rank].contiguous().clone()
