"""torch.distributed mechanics for loading: the process group, tensor-parallel sharding, per-rank slices.

`from_pretrained(..., tp_plan="auto")` under torchrun: q/k/v/gate/up are column-parallel (each rank
holds a slice of the output features, i.e. of the heads), o/down row-parallel (a slice of the input
features, outputs summed across ranks). Untied embeddings and LM head are vocabulary-parallel
when the vocabulary divides evenly; norms (and a tied pair) stay replicated. Stacked experts (nn.Experts)
cut their own tensors: each rank keeps a slice of every expert's intermediate rows as plain tensors, and sums
the experts' outputs across ranks. Each
rank reads only its slice of each sharded weight from the memory-mapped checkpoint, and its KV
cache holds only its own heads.

`fsdp_from_pretrained(...)` under torchrun: the model, with a new LoRA adapter when asked, with
FSDP2 `fully_shard` on every decoder layer and on the root. Every parameter is split along dim 0
across ranks, and each rank reads only its rows from the checkpoint. `train.finetune` splits each
batch across ranks and scales the loss so that the gradients equal one process's.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ConfigError


def init_from_env():
    """The default process group (gloo on CPU, nccl on CUDA) from torchrun's environment; returns a 1-D mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "tensor parallel (tp_plan='auto') and FSDP loading need torch.distributed: launch with "
                "torchrun (e.g. torchrun --nproc-per-node 2 script.py), `autolm generate --tp N` "
                "or `autolm finetune --nproc N`"
            )
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return init_device_mesh(device, (dist.get_world_size(),))


def parallelize(model: nn.Module, mesh) -> dict[str, tuple[int | None, int, int]]:
    """Apply the model's tensor-parallel plan to the meta model; returns {parameter: (dim, rank, world)} for the
    sharded ones (dim None: a DTensor every rank holds whole, as a row-parallel layer's bias). The config's counts
    the model's `tp_divides` names (heads, KV heads, the MLP width) must divide by the number of ranks."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world, rank = mesh.size(), mesh.get_local_rank()
    config = model.config
    for name in model.tp_divides:
        n = getattr(config, name)
        if n % world:
            raise ConfigError(f"tensor parallel over {world} ranks needs {name} ({n}) divisible by {world}")
    styles = {
        "colwise": ColwiseParallel(),
        "rowwise": RowwiseParallel(),
        # transformers' colwise_gather_output / rowwise_split_input: the output gathered whole on every rank
        # (Phi-3 splits its packed q/k/v after the matmul, OLMo 2 normalises q/k over all heads), and the next
        # rowwise layer takes that whole input and uses its own slice
        "colwise_gather": ColwiseParallel(output_layouts=Replicate()),
        "rowwise_split": RowwiseParallel(input_layouts=Replicate()),
        # Vocabulary-parallel: each rank holds a slice of the vocabulary rows of the embedding (its
        # lookups are summed across ranks) and of the LM head (the logits are gathered).
        "embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    plan = {
        m: styles[s]
        for m, s in model.tp_plan().items()
        if s not in ("embedding", "lm_head") or config.vocab_size % world == 0
    }
    parallelize_module(model, mesh, plan)
    model.shard_heads(world)
    for m in model.modules():  # ALiBi's slopes: this rank's heads (a contiguous slice, as the colwise rows)
        if getattr(m, "alibi", None) is not None:
            m.alibi = m.alibi[rank * m.num_heads : (rank + 1) * m.num_heads]
    shards = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            (placement,) = p.placements
            if isinstance(placement, Shard):
                shards[name] = (placement.dim, rank, world)
            elif isinstance(placement, Replicate):  # a row-parallel layer's bias, added once after the sum
                shards[name] = (None, rank, world)
    for name, m in model.named_modules():
        if hasattr(m, "shard"):  # modules that cut their own tensors (nn.Experts): plain local tensors
            shards.update(
                {f"{name}.{p}": (dim, rank, world, parts) for p, (dim, parts) in m.shard(rank, world).items()}
            )
    return shards


def local_slice(t: torch.Tensor, dim: int, rank: int, world: int, parts: int = 1) -> torch.Tensor:
    """This rank's block of a full tensor as torch.chunk (and DTensor's Shard) cut it, copied out of the
    memory map; empty when the dimension runs out before this rank. With `parts`, the tensor is that many
    tensors concatenated along dim (gate and up), each cut alike."""
    if parts > 1:
        return torch.cat([local_slice(p, dim, rank, world) for p in t.chunk(parts, dim)], dim)
    size = -(-t.shape[dim] // world)
    start = min(rank * size, t.shape[dim])
    return t.narrow(dim, start, min(size, t.shape[dim] - start)).contiguous().clone()


def same_seed(seed: int | None) -> int:
    """A sampling seed every rank shares: the given one, or rank 0's random draw."""
    import torch.distributed as dist

    t = torch.tensor([seed if seed is not None else int(torch.randint(0, 2**62, ()))])
    dist.broadcast(t, 0)
    return int(t)


def exit_all(code: int = 0) -> None:
    """End a torchrun rank: wait for every rank, leave the process group and exit at once. A normal
    interpreter teardown can abort while gloo's threads wind down ("terminate called without an
    active exception"), which torchrun reports as a failed run."""
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
