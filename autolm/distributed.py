"""Scaling out on torch.distributed: tensor-parallel inference and FSDP2 fine-tuning, both on DTensor.

`from_pretrained(..., tp_plan="auto")` under torchrun: q/k/v/gate/up are column-parallel (each rank
holds a slice of the output features, i.e. of the heads), o/down row-parallel (a slice of the input
features, outputs summed across ranks). Untied embeddings and LM head are vocabulary-parallel
when the vocabulary divides evenly; norms (and a tied pair) stay replicated. Each
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

from .errors import ConfigError

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def init_from_env():
    """The default process group (gloo on CPU, nccl on CUDA) from torchrun's environment; returns a 1-D mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError("tensor parallel (tp_plan='auto') and FSDP loading need torch.distributed: launch with "
                              "torchrun (e.g. torchrun --nproc-per-node 2 script.py), `autolm generate --tp N` "
                              "or `autolm finetune --nproc N`")
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
    if config.vocab_size % world == 0 and not config.tie_word_embeddings:
        # Vocabulary-parallel: each rank holds a slice of the vocabulary rows of the embedding (its
        # lookups are summed across ranks) and of the LM head (the logits are gathered).
        from torch.distributed.tensor import Replicate

        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
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
    """This rank's block of a full tensor as torch.chunk (and DTensor's Shard) cut it, copied out of the
    memory map; empty when the dimension runs out before this rank."""
    size = -(-t.shape[dim] // world)
    start = min(rank * size, t.shape[dim])
    return t.narrow(dim, start, min(size, t.shape[dim] - start)).contiguous().clone()


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (a collective: every rank must call it), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fsdp_from_pretrained(path: str | os.PathLike, lora_config=None, dtype=torch.float32, mesh=None,
                         gguf_file: str | None = None, **hub_kwargs):
    """Under torchrun: the model ready for sharded training, with FSDP2 fully_shard per decoder layer.

    With lora_config, a new LoRA adapter is added first (initialised exactly as in one process with the
    same seed) and a PeftModel is returned; without, every parameter trains (full fine-tuning).
    The model is built on the meta device and sharded there; each rank then reads only its dim-0
    block of each tensor, so no rank ever holds a full copy of the weights.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from .checkpoint import find_weight_files, iter_checkpoint
    from .config import config_from_file
    from .errors import CheckpointError
    from .hub import resolve_model_dir
    from .loading import IGNORED_SUFFIXES, build_on_meta, parse_dtype
    from .registry import model_class

    target = parse_dtype(dtype)
    if not isinstance(target, torch.dtype):
        raise ConfigError("fsdp_from_pretrained needs a dtype to train in, e.g. torch.float32")
    mesh = mesh if mesh is not None else init_from_env()
    directory = resolve_model_dir(path, **hub_kwargs)
    if gguf_file is not None:
        from .gguf import GGUFFile, config_from_gguf, gguf_tensors

        g = GGUFFile(os.path.join(directory, gguf_file))
        config = config_from_gguf(g)
        tensors = gguf_tensors(g, config)
    else:
        config = config_from_file(os.path.join(directory, "config.json"))
        tensors = iter_checkpoint(find_weight_files(directory))
    model = build_on_meta(model_class(config.model_type), config).to(target)
    model.tie_weights()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # Where each checkpoint tensor goes: (module, attribute) survive LoRA wrapping and fully_shard.
    slots = {f"{m}.{a}" if m else a: (module, a) for m, module in model.named_modules()
             for a, _ in module.named_parameters(recurse=False)}
    if tied:
        slots.pop("lm_head.weight", None)
    trainable = model
    if lora_config is not None:
        from .lora import get_peft_model

        if lora_config.base_model_name_or_path is None:
            lora_config.base_model_name_or_path = directory
        trainable = get_peft_model(model, lora_config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(trainable, mesh=mesh)
    rank, size = mesh.get_local_rank(), mesh.size()
    for path_, name, t in tensors:
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name not in slots:
            raise CheckpointError(f"{path_}: unexpected tensor {name!r} for {config.model_type}")
        module, attr = slots.pop(name)
        old = getattr(module, attr)
        if tuple(t.shape) != tuple(old.shape):
            raise CheckpointError(f"{path_}: tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(old.shape)}")
        local = local_slice(t, 0, rank, size).to(device=mesh.device_type, dtype=target)
        new = DTensor.from_local(local, mesh, old.placements, shape=old.shape, stride=old.stride(), run_check=False)
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    if slots:
        raise CheckpointError(f"{directory}: missing tensors: {', '.join(sorted(slots)[:20])}")
    model.tie_weights()
    from .generation import GenerationConfig

    model.generation_config = (GenerationConfig.from_model_config(config) if gguf_file is not None
                               else GenerationConfig.from_model_dir(directory, config))
    return trainable
