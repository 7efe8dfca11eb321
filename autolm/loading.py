"""from_pretrained: resolve -> config -> build on meta -> stream weights -> tie / finalize, with a report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CheckpointError, ConfigError

logger = logging.getLogger("autolm")

_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
                "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
# Tensors some checkpoints carry that the model computes itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadReport:
    """What one from_pretrained call did: files, dtype decisions, placement and seconds per stage."""

    source: str = ""
    directory: str = ""
    files: list[str] = field(default_factory=list)
    format: str = ""
    dtype: str = ""
    dtype_decision: str = ""
    cast_tensors: int = 0
    zero_copy_tensors: int = 0
    tensors: int = 0
    bytes: int = 0
    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        total = sum(self.seconds.values())
        out = [
            f"source:     {self.source}",
            f"directory:  {self.directory}",
            f"format:     {self.format} ({len(self.files)} file{'s' if len(self.files) != 1 else ''})",
            f"dtype:      {self.dtype} ({self.dtype_decision})",
            f"tensors:    {self.tensors} ({self.bytes / 1e6:.1f} MB), {self.zero_copy_tensors} zero-copy, "
            f"{self.cast_tensors} cast",
            f"device:     {self.device}",
            "seconds:    " + ", ".join(f"{k} {v:.3f}" for k, v in self.seconds.items()) + f" (total {total:.3f})",
        ]
        out += [f"note:       {n}" for n in self.notes]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def parse_dtype(dtype: Any) -> torch.dtype | str:
    """'auto', a torch.dtype, or a name such as 'bfloat16' / 'bf16'."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ConfigError(f"dtype {dtype!r} is not supported (expected 'auto', a torch dtype or one of {sorted(_DTYPE_NAMES)})")


class _Timer:
    def __init__(self, report: LoadReport):
        self.report, self.t = report, time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.report.seconds[stage] = self.report.seconds.get(stage, 0.0) + now - self.t
        self.t = now


def from_pretrained(path_or_repo_id: str | os.PathLike, dtype: Any = "auto", device: str | torch.device | None = None,
                    gguf_file: str | None = None, strict: bool = True, check_finite: bool = False,
                    revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                    token: str | None = None, torch_dtype: Any = None, config=None, device_map: Any = None,
                 max_memory: dict | None = None, offload_folder: str | None = None, quantization: Any = None,
                 tp_plan: str | None = None, **kwargs: Any):
    """Load a causal LM from a directory, a repo id, or a GGUF file; see AutoModelForCausalLM.

    device_map ("auto" | "balanced" | "sequential" | "cpu" | a device | {prefix: device}) with
    max_memory ({device: bytes or "2GB"}) places whole blocks on devices, "disk" included; see placement.py.
    quantization ("int8" | "int4" | QuantConfig) quantizes the decoder's Linear weights as they stream in.
    tp_plan="auto" (under torchrun) shards the decoder layers across ranks; see distributed.py.
    """
    from .config import config_from_file
    from .generation import GenerationConfig
    from .hub import resolve_model_dir
    from .malloc import keep_freed_memory
    from .registry import model_class

    if kwargs:
        raise ConfigError(f"from_pretrained got unsupported arguments: {', '.join(sorted(kwargs))}")
    keep_freed_memory()
    if torch_dtype is not None:
        dtype = torch_dtype
    want = parse_dtype(dtype)
    if quantization is not None and want == "auto":
        want = torch.bfloat16  # the quantized kernels compute in bf16; the float parts follow
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device_map is None and max_memory is not None:
        device_map = "auto"
    placement = Placement(device_map, max_memory, offload_folder) if device_map is not None else None
    report = LoadReport(source=os.fspath(path_or_repo_id), device=str(device) if placement is None else "device_map")
    timer = _Timer(report)

    # 1. resolve
    directory = resolve_model_dir(path_or_repo_id, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only, token=token)
    report.directory = directory
    timer.lap("resolve")

    if gguf_file is not None:
        from .gguf import load_gguf_model

        return load_gguf_model(os.path.join(directory, gguf_file), want, device, report, timer, placement,
                               quantization, tp_plan)

    # 2. config
    if config is None:
        config = config_from_file(os.path.join(directory, "config.json"))
    timer.lap("config")

    # 3. weights: find the files and decide the dtype
    from .checkpoint import find_weight_files, iter_checkpoint

    wf = find_weight_files(directory)
    report.files, report.format = [os.path.basename(f) for f in wf.files], wf.format
    model = build_on_meta(model_class(config.model_type), config)
    quantizer = Quantizer.for_model(model, quantization)
    tp = TensorParallel.for_model(model, tp_plan, placement is not None or quantizer is not None)
    timer.lap("build")
    load_weights(model, iter_checkpoint(wf), want, device, report, strict=strict, check_finite=check_finite,
                 placement=placement, quantizer=quantizer, tp=tp)
    timer.lap("weights")

    model.generation_config = GenerationConfig.from_model_dir(directory, config)
    model.load_report = report
    logger.info("loaded %s\n%s", report.source, report)
    return model


def build_on_meta(cls: type, config) -> torch.nn.Module:
    """Instantiate the model on the meta device: shapes only, no memory, no random init."""
    with torch.device("meta"):
        return cls(config)


class Placement:
    """A device_map request; planned once the target dtype is known (sizes depend on it)."""

    def __init__(self, device_map: Any, max_memory: dict | None, offload_folder: str | None):
        from .placement import OffloadStore

        self.request, self.max_memory = device_map, max_memory
        self.store = OffloadStore(os.fspath(offload_folder) if offload_folder is not None else None)
        self.map: dict[str, str] = {}
        self._headers: dict[str, dict] = {}

    def plan(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        from .placement import resolve_device_map

        self.map = resolve_device_map(model.to(dtype), self.request, self.max_memory)  # .to on meta is free

    def device_of(self, name: str) -> str:
        from .placement import block_of

        return self.map[block_of(name)]

    def offload(self, path: str, name: str, t: torch.Tensor, zero_copy: bool) -> torch.Tensor:
        """Record a disk-placed tensor (a reference into a safetensors checkpoint when possible); return meta."""
        from .checkpoint import read_safetensors_header

        source = None
        if zero_copy and path.endswith(".safetensors"):
            if path not in self._headers:
                self._headers[path] = read_safetensors_header(path)[0]
            source = (path, self._headers[path][name].start)
        self.store.add(name, t, source)
        return torch.empty_like(t, device="meta")


class Quantizer:
    """Which Linear layers of a meta model are quantized, and quantizing their weights as they arrive."""

    def __init__(self, cfg, shapes: dict[str, tuple[int, int]], saved: bool):
        self.cfg, self.shapes, self.saved = cfg, shapes, saved  # saved: the checkpoint holds quantized weights

    @classmethod
    def for_model(cls, model: torch.nn.Module, quantization: Any) -> Quantizer | None:
        """Swap in quantized layers when asked to, or when the checkpoint was saved quantized."""
        saved = model.config.extra.get("quantization_config")
        if quantization is None and saved is None:
            return None
        from .quant import QuantConfig, replace_linears

        cfg = QuantConfig.parse(quantization if quantization is not None else saved)
        if saved is not None and QuantConfig.parse(saved) != cfg:
            raise ConfigError(f"checkpoint is already quantized as {saved}; cannot load it as {cfg.to_dict()}")
        return cls(cfg, replace_linears(model, cfg, torch.float32), saved is not None)

    def split(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """A float weight of a quantized layer -> its quantized entries; None for every other tensor."""
        module = name.removesuffix(".weight")
        if module not in self.shapes or module == name or not t.is_floating_point():
            return None
        if tuple(t.shape) != self.shapes[module]:
            raise CheckpointError(f"tensor {name!r}: checkpoint {tuple(t.shape)} vs model {self.shapes[module]}")
        from .quant import quantize_weight

        return {f"{module}.{k}": v for k, v in quantize_weight(self.cfg, t, dtype).items()}


class TensorParallel:
    """tp_plan='auto': the device mesh and which parameters are sharded along which dimension."""

    def __init__(self, mesh, shards: dict[str, tuple[int, int, int]]):
        self.mesh, self.shards = mesh, shards

    @classmethod
    def for_model(cls, model: torch.nn.Module, tp_plan: str | None, other: bool) -> TensorParallel | None:
        if tp_plan is None:
            return None
        if tp_plan != "auto":
            raise ConfigError(f"tp_plan {tp_plan!r} is not supported (expected 'auto')")
        if other:
            raise ConfigError("tp_plan cannot be combined with device_map or quantization")
        from .distributed import init_from_env, parallelize

        mesh = init_from_env()
        return cls(mesh, parallelize(model, mesh))

    def local(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a sharded weight (read from the memory map), else the tensor itself."""
        if name not in self.shards:
            return t
        from .distributed import local_slice

        return local_slice(t, *self.shards[name])

    def wrap(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in self.shards:
            return t
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(t, self.mesh, [Shard(self.shards[name][0])], run_check=False)


def load_weights(model: torch.nn.Module, tensors, want: torch.dtype | str, device: torch.device,
                 report: LoadReport, strict: bool = True, check_finite: bool = False,
                 placement: Placement | None = None, quantizer: Quantizer | None = None,
                 tp: TensorParallel | None = None) -> None:
    """Stream (file, name, tensor) into the meta model with assign=True; check names and shapes."""
    config = model.config
    expected = {name: p for name, p in model.state_dict(keep_vars=True).items()}
    tied = getattr(config, "tie_word_embeddings", False)
    # A quantized LM head of a tied model is a quantized copy of the embeddings, made here unless saved so.
    head_copy = tied and quantizer is not None and "lm_head" in quantizer.shapes and not quantizer.saved
    if tied and not (quantizer is not None and "lm_head" in quantizer.shapes):
        expected.pop("lm_head.weight", None)
    target = want if isinstance(want, torch.dtype) else _auto_dtype(config)
    report.dtype = str(target).removeprefix("torch.")
    loaded: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for path, name, t in tensors:
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight" and t.is_floating_point()):
            continue
        if target == "auto-from-weights" and t.is_floating_point():
            target = t.dtype
            report.dtype = str(target).removeprefix("torch.")
        if placement is not None and not placement.map:
            placement.plan(model, target if isinstance(target, torch.dtype) else torch.float32)
        parts = quantizer.split(name, t, target) if quantizer is not None else None
        if head_copy and name == "model.embed_tokens.weight":
            parts = {name: t, **quantizer.split("lm_head.weight", t, target)}
        if parts is not None:
            for part, q in parts.items():
                loaded[part] = _place(part, q, path, target, device, placement, report, check_finite)
            continue
        ref = expected.get(name)
        if ref is None:
            unexpected.append(name)
            continue
        if tuple(t.shape) != tuple(ref.shape):
            mismatched.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(ref.shape)} ({os.path.basename(path)})")
            continue
        if tp is not None:
            t = tp.local(name, t)
        loaded[name] = _place(name, t, path, target, device, placement, report, check_finite)
        if tp is not None:
            loaded[name] = tp.wrap(name, loaded[name])
    missing = sorted(set(expected) - set(loaded))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected and strict:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected)[:20])}")
    if mismatched:
        problems.append("wrongly shaped tensors: " + "; ".join(mismatched[:20]))
    if problems:
        raise CheckpointError(f"{report.directory or report.source}: checkpoint does not fit the model — " + "; ".join(problems))
    if unexpected:
        report.notes.append(f"ignored {len(unexpected)} unexpected tensors")
    report.tensors = len(loaded)
    report.dtype_decision = report.dtype_decision or (
        "requested" if isinstance(want, torch.dtype) else "auto: config dtype / checkpoint dtype")
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    model.eval()
    if placement is not None:
        from .placement import dispatch

        dispatch(model, placement.map, placement.store)
        on_disk = sum(d == "disk" for d in placement.map.values())
        report.notes.append(f"device_map: {len(placement.map)} blocks, {on_disk} on disk")


def _place(name: str, t: torch.Tensor, path: str, target, device: torch.device, placement: Placement | None,
           report: LoadReport, check_finite: bool) -> torch.Tensor:
    """Cast one tensor to the target dtype and put it where the plan says (a device, or disk)."""
    zero_copy = not (t.is_floating_point() and isinstance(target, torch.dtype) and t.dtype != target)
    if zero_copy:
        report.zero_copy_tensors += 1
    else:
        t = t.to(target)
        report.cast_tensors += 1
    if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{path}: tensor {name!r} contains NaN or Inf values")
    report.bytes += t.numel() * t.element_size()
    where = placement.device_of(name) if placement is not None else device
    if where == "disk":
        return placement.offload(path, name, t, zero_copy)
    return t if t.device == torch.device(where) else t.to(where)


def _auto_dtype(config) -> torch.dtype | str:
    """dtype='auto': the config's dtype when it names one, else the first floating tensor's dtype."""
    name = getattr(config, "dtype", None)
    if isinstance(name, str) and name.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[name.removeprefix("torch.")]
    return "auto-from-weights"


class AutoModelForCausalLM:
    """`AutoModelForCausalLM.from_pretrained(...)` and `from_config(...)`, as in transformers."""

    from_pretrained = staticmethod(from_pretrained)

    @staticmethod
    def from_config(config, dtype: torch.dtype | None = None):
        """A randomly initialised model (for training from scratch or tests)."""
        from .registry import model_class

        model = model_class(config.model_type)(config)
        model.tie_weights()
        return model.to(dtype) if dtype is not None else model
