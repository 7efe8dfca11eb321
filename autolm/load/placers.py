"""Placers: where each tensor of a checkpoint goes while it streams in. from_pretrained hands every
tensor to one placer; each kind of placement is one class:

- `OneDevice`: every tensor to one device (the default);
- `DeviceMap`: whole blocks to devices by a device_map, "disk" included (see placement.py);
- `Quantize`: wraps one of the two above, quantizing decoder Linear weights as they arrive;
- `TensorParallel`: each rank keeps its slice of every sharded weight (DTensor), under torchrun;
- `FSDP`: each rank keeps its dim-0 rows of every tensor, FSDP2 `fully_shard` per decoder layer.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .._util import check_device, own_names
from ..errors import CheckpointError, ConfigError
from .placement import OffloadStore, dispatch, resolve_device_map


class OneDevice:
    """Every tensor to one device."""

    action = "loading"
    in_place = True  # every tensor stays where it was put (no offloading, no sharding)

    def __init__(self, device: torch.device):
        self.device = device

    def describe(self) -> str:
        """Where the model goes, for the load report."""
        return str(self.device) if type(self) is OneDevice else type(self).__name__

    def notes(self) -> list[str]:
        """What the load report should say about this placement."""
        return []

    def keeps_blocks(self, name: str) -> bool:
        """Whether the source may hand tensor `name` over in its file's quantized blocks (sources.gguf)."""
        return False

    def setup(self, model: nn.Module) -> None:
        """Change the meta model's structure before loading (quantized layers, sharding)."""

    def expected(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """The tensors the checkpoint must provide and their shapes (a tied float head is the embedding)."""
        with own_names(model):
            out = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
        if model.config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
            out.pop("lm_head.weight", None)
        return out

    def plan(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Called once the dtype is known, before the first tensor."""

    def split(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """A checkpoint tensor -> the model's tensors it becomes; None: itself."""
        return None

    def put(self, name: str, t: torch.Tensor, path: str, zero_copy: bool) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    def finish(self, model: nn.Module, loaded: dict[str, torch.Tensor]) -> nn.Module:
        """Put the tensors into the model block by block, each block's entries dropped from `loaded` once in: a
        layer that repacks what it loads (Int4Linear) holds two copies of one block at a time, not of the model."""
        for block in model.blocks():
            prefix = block + "."
            part = {
                k.removeprefix(prefix): loaded.pop(k) for k in [k for k in loaded if k.startswith(prefix)]
            }
            model.get_submodule(block).load_state_dict(part, strict=False, assign=True)
        model.load_state_dict(loaded, strict=False, assign=True)
        model.tie_weights()
        return model


class DeviceMap(OneDevice):
    """A device_map request, planned once the dtype is known (block sizes depend on it)."""

    in_place = False

    def __init__(self, device_map: Any, max_memory: dict | None, offload_folder: str | None):
        super().__init__(torch.device("cpu"))
        self.request, self.max_memory = device_map, max_memory
        if max_memory is not None and offload_folder is not None and "disk" not in max_memory:
            self.max_memory = {**max_memory, "disk": 0}  # as accelerate: what does not fit goes to disk
        self.store = OffloadStore(os.fspath(offload_folder) if offload_folder is not None else None)
        self.map: dict[str, str] = {}
        self._headers: dict[str, dict] = {}

    def plan(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.map = resolve_device_map(model, self.request, self.max_memory, dtype)
        for where in set(self.map.values()) - {"disk"}:
            check_device(where, "device_map device")

    def put(self, name: str, t: torch.Tensor, path: str, zero_copy: bool) -> torch.Tensor:
        block = max((b for b in self.map if name.startswith(b + ".")), key=len, default=None)
        if block is None:
            raise ConfigError(f"parameter {name!r} belongs to no placement block")
        where = self.map[block]
        if where != "disk":
            return t if t.device == torch.device(where) else t.to(where)
        # On disk: a reference into the checkpoint when it is safetensors in this dtype, else a copy.
        source = None
        if zero_copy and path.endswith(".safetensors"):
            from ..sources.safetensors import read_safetensors_header

            if path not in self._headers:
                self._headers[path] = read_safetensors_header(path)[0]
            source = (path, self._headers[path][name].start)
        self.store.add(name, t, source)
        return torch.empty_like(t, device="meta")

    def finish(self, model: nn.Module, loaded: dict[str, torch.Tensor]) -> nn.Module:
        model = super().finish(model, loaded)
        dispatch(model, self.map, self.store)
        return model

    def notes(self) -> list[str]:
        on_disk = sum(d == "disk" for d in self.map.values())
        return [f"device_map: {len(self.map)} blocks, {on_disk} on disk"]


class Quantize:
    """Quantizes the decoder's Linear weights as they stream in, then hands every tensor to `inner`."""

    action = "loading + quantizing"

    def __init__(self, quantization: Any, saved: Any, inner: OneDevice):
        from ..quant import QuantConfig

        self.cfg = QuantConfig.parse(quantization if quantization is not None else saved)
        if saved is not None and QuantConfig.parse(saved) != self.cfg:
            if not (isinstance(quantization, str) and QuantConfig.parse(saved).bits == self.cfg.bits):
                raise ConfigError(
                    f"checkpoint is already quantized as {saved}; cannot load it as {self.cfg.to_dict()}"
                )
            self.cfg = QuantConfig.parse(saved)  # 'int4' names the saved int4 model, whatever its head
        self.saved, self.inner, self.shapes, self.tied = saved is not None, inner, {}, False
        self.experts: dict[str, tuple] = {}  # stacked experts: (float shape, whether transposed)
        self.transposed: set[str] = set()  # layers whose checkpoint weight is (in, out): Conv1D (GPT-2)
        self.embeddings = "model.embed_tokens.weight"

    def setup(self, model: nn.Module) -> None:
        from ..quant import replace_linears
        from ..quant_experts import replace_experts

        self.transposed = {n for n, m in model.named_modules() if getattr(m, "fan_in_fan_out", False)}
        self.embeddings = f"{model.embeddings_name}.weight"
        self.shapes = replace_linears(model, self.cfg, torch.float32)
        self.experts = replace_experts(model, self.cfg, torch.float32)
        self.tied = model.config.tie_word_embeddings
        self.inner.setup(model)

    def describe(self) -> str:
        return f"{self.inner.describe()}, int{self.cfg.bits}"

    def notes(self) -> list[str]:
        return self.inner.notes()

    def expected(self, model):
        out = self.inner.expected(model)
        if not self.saved:  # stacked experts arrive (and are assembled) in float; split quantizes them
            out.update({name: shape for name, (shape, _) in self.experts.items()})
        return out

    def plan(self, model, dtype):
        self.inner.plan(model, dtype)

    def keeps_blocks(self, name: str) -> bool:
        """Whether the weight `name` may come as 4-bit codes: GGUF blocks (Q4_0 / Q4_1 / Q4_K load as they are
        with groups of 32; other types are dequantized here, in torch, then quantized) or a checkpoint's int4
        groups (sources.compressed.Int4Codes: kept where their group is the layer's)."""
        module = name.removesuffix(".weight")
        return (
            module != name
            and module in self.shapes
            and module not in self.transposed  # GGUF holds these (out, in): dequantized and transposed
            and not self.saved
            and self.cfg.bits_for(module) == 4
        )

    def split(self, name: str, t, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """A float weight of a quantized layer -> its quantized entries (a tied head: a quantized copy too);
        GGUF blocks (sources.ggml.GGMLBlocks) of Q4_0 / Q4_1 / Q4_K -> the int4 entries without a float round
        trip."""
        from .. import kernels
        from ..quant import quantize_weight
        from ..sources.compressed import Int4Codes
        from ..sources.ggml import INT4_TYPES, to_int4

        module = name.removesuffix(".weight")
        if hasattr(t, "kind"):  # GGUF blocks
            t = t.in_order()
            if tuple(t.shape) != self.shapes[module]:
                raise CheckpointError(
                    f"tensor {name!r}: checkpoint {tuple(t.shape)} vs model {self.shapes[module]}"
                )
            if t.kind not in INT4_TYPES or self.cfg.group_size != 32:
                return self.split(name, kernels.ggml_dequantize(t.raw, t.kind), dtype)
            nibbles, sz = to_int4(t)
            t.release()
            return {f"{module}.weight": nibbles, f"{module}.scales_and_zeros": sz}
        if isinstance(t, Int4Codes):
            if t.group != self.cfg.group_size or tuple(t.shape) != self.shapes[module]:
                return self.split(name, t.values(), dtype)  # quantized again in the layer's groups
            nibbles, sz = t.int4()
            return {f"{module}.weight": nibbles, f"{module}.scales_and_zeros": sz}
        if name in self.experts and t.is_floating_point():
            from ..quant_experts import quantize_stacked

            return quantize_stacked(self.cfg, name, t, self.experts[name][1], dtype)
        if self.tied and name == self.embeddings and "lm_head" in self.shapes and not self.saved:
            return {name: t, **self.split("lm_head.weight", t, dtype)}
        if module not in self.shapes or module == name or not t.is_floating_point():
            return None
        if tuple(t.shape) != self.shapes[module]:
            raise CheckpointError(
                f"tensor {name!r}: checkpoint {tuple(t.shape)} vs model {self.shapes[module]}"
            )
        w = t.t() if module in self.transposed else t  # quantized as (out, in)
        return {f"{module}.{k}": v for k, v in quantize_weight(self.cfg, module, w, dtype).items()}

    def put(self, name, t, path, zero_copy):
        return self.inner.put(name, t, path, zero_copy)

    def finish(self, model, loaded):
        return self.inner.finish(model, loaded)


class TensorParallel(OneDevice):
    """tp_plan='auto' under torchrun: each rank keeps its slice of every sharded weight."""

    in_place = False

    def __init__(self):
        from .parallel import init_from_env

        self.mesh = init_from_env()
        super().__init__(
            torch.device(self.mesh.device_type, torch.cuda.current_device())
            if self.mesh.device_type == "cuda"
            else torch.device("cpu")
        )
        self.shards: dict[str, tuple] = {}  # (dim, rank, ranks) of DTensors, + parts of modules' own shards

    def setup(self, model: nn.Module) -> None:
        from .parallel import parallelize

        self.shards = parallelize(model, self.mesh)

    def expected(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """The checkpoint's shapes: whole tensors (a DTensor's shape is its global one; modules' own shards are
        local tensors, so their whole shape is computed here)."""
        out = super().expected(model)
        for name, (dim, _, world, *_) in ((n, s) for n, s in self.shards.items() if len(s) == 4):
            out[name] = tuple(n * world if i == dim else n for i, n in enumerate(out[name]))
        return out

    def put(self, name, t, path, zero_copy):
        if name not in self.shards:
            return super().put(name, t, path, zero_copy)
        from torch.distributed.tensor import DTensor, Replicate, Shard

        from .parallel import local_slice

        dim = self.shards[name][0]
        if dim is None:  # replicated: the whole tensor on every rank
            return DTensor.from_local(
                super().put(name, t, path, zero_copy), self.mesh, [Replicate()], run_check=False
            )
        local = super().put(name, local_slice(t, *self.shards[name]), path, zero_copy)
        if len(self.shards[name]) == 4:  # a module's own shard (parallel.parallelize): a plain local tensor
            return local
        return DTensor.from_local(local, self.mesh, [Shard(dim)], run_check=False)


class FSDP(OneDevice):
    """Under torchrun: FSDP2 fully_shard on every decoder layer and the root; each rank reads only its dim-0
    rows of each tensor. With a LoraConfig a new adapter is added first (initialised as one process would
    with the same seed) and the PeftModel is the result; without, every parameter trains."""

    in_place = False

    def __init__(self, lora_config=None):
        from .parallel import init_from_env

        self.mesh, self.lora_config = init_from_env(), lora_config
        super().__init__(torch.device(self.mesh.device_type))
        self.slots: dict[str, tuple[nn.Module, str, tuple[int, ...]]] = {}
        self.trainable: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        model.tie_weights()
        # Where each checkpoint tensor goes: (module, attribute) survive LoRA wrapping and fully_shard.
        self.slots = {
            f"{m}.{a}" if m else a: (module, a, tuple(p.shape))
            for m, module in model.named_modules()
            for a, p in module.named_parameters(recurse=False)
        }
        if model.config.tie_word_embeddings:
            self.slots.pop("lm_head.weight", None)
        self.trainable = model
        if self.lora_config is not None:
            from ..lora import get_peft_model

            self.trainable = get_peft_model(model, self.lora_config)
        for block in model.blocks():  # each decoder layer is one FSDP unit; the rest goes with the root
            if block.startswith(model.layers_prefix + "."):
                fully_shard(model.get_submodule(block), mesh=self.mesh)
        fully_shard(self.trainable, mesh=self.mesh)

    def expected(self, model):
        return {n: shape for n, (_, _, shape) in self.slots.items()}

    def plan(self, model, dtype):
        self.dtype = dtype

    def put(self, name, t, path, zero_copy):
        from torch.distributed.tensor import DTensor

        from .parallel import local_slice

        module, attr, _ = self.slots[name]
        old = getattr(module, attr)
        local = local_slice(t, 0, self.mesh.get_local_rank(), self.mesh.size()).to(self.device)
        return DTensor.from_local(
            local, self.mesh, old.placements, shape=old.shape, stride=old.stride(), run_check=False
        )

    def finish(self, model, loaded):
        for name, value in loaded.items():
            module, attr, _ = self.slots[name]
            setattr(module, attr, nn.Parameter(value, requires_grad=getattr(module, attr).requires_grad))
        model.tie_weights()
        return self.trainable
