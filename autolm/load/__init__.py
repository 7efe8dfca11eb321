"""from_pretrained, the one load path:

    resolve -> source -> config -> build on meta -> placer.setup -> stream (name, tensor) -> placer.finish

The source (safetensors, .bin, GGUF; see autolm.sources) yields a config and tensors; the placer (one
device, device_map with disk, quantize-while-loading, tensor parallel, FSDP2; see placers.py) decides
where each tensor goes. Names and shapes are checked here, once, for every combination.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .._util import check_device, parse_dtype
from ..config import PretrainedConfig
from ..errors import ConfigError
from ..hub import HUB_KWARGS, resolve_model_dir, verify_files
from ..malloc import give_back_freed_memory
from ..models import interop
from ..quant import QuantConfig
from ..sources import open_source
from .build import check_head, check_size, config_dtype, model_class, score_from_tokens
from .keep import KeepGGUF
from .placers import FSDP, DeviceMap, OneDevice, Quantize, TensorParallel
from .report import LoadReport
from .stream import stream

logger = logging.getLogger("autolm")
# transformers' arguments that change nothing here: logged once, then ignored.
_ACCEPTED = {
    "low_cpu_mem_usage": "autolm always loads on the meta device, memory-mapped",
    "trust_remote_code": "autolm never runs code from a checkpoint",
    "use_fast": None,
    "_fast_init": None,
    "offload_state_dict": None,
    "offload_buffers": None,
}
_ATTENTION = ("eager", "sdpa", None)


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike, output_loading_info: bool = False, **kwargs: Any
):
    """Load a causal LM from a directory, a repo id (HF cache or hub), or a GGUF file; see AutoModelForCausalLM.

    A folder holding only a peft adapter (adapter_config.json, no config.json) loads its base model
    (`base_model_name_or_path`) with the same arguments and returns a PeftModel with the adapter on it.
    output_loading_info=True returns (model, info) as transformers: autolm refuses missing, mismatched and
    (unless strict=False) unexpected tensors, so after a load the lists are empty.
    """
    model = _from_pretrained(pretrained_model_name_or_path, **kwargs)
    if output_loading_info:
        info = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
        return model, info
    return model


def _from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
):
    from ..lora import LoraConfig, PeftModel

    hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    directory = resolve_model_dir(pretrained_model_name_or_path, **hub)
    if (
        kwargs.get("gguf_file") is None
        and not os.path.isfile(os.path.join(directory, "config.json"))
        and os.path.isfile(os.path.join(directory, "adapter_config.json"))
    ):
        base = LoraConfig.from_pretrained(directory).base_model_name_or_path
        if not base:
            raise ConfigError(
                f"{directory}: an adapter whose adapter_config.json names no base_model_name_or_path; "
                "load the base model and use PeftModel.from_pretrained(model, adapter)"
            )
        kwargs = {k: v for k, v in kwargs.items() if k not in ("subfolder", "revision")}
        return PeftModel.from_pretrained(_load(base, **kwargs), directory, adapter_name, is_trainable)
    return _load(pretrained_model_name_or_path, resolved=directory, **kwargs)


def _load(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    dtype: Any = "auto",
    torch_dtype: Any = None,
    device: str | torch.device | None = None,
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    quantization: Any = None,
    tp_plan: str | None = None,
    fsdp: bool = False,
    lora_config=None,
    gguf_file: str | None = None,
    config=None,
    strict: bool = True,
    check_finite: bool = False,
    attn_implementation: str | None = None,
    use_safetensors: bool | None = None,
    variant: str | None = None,
    progress: bool | None = None,
    resolved: str | None = None,
    verify: bool = False,
    head: str = "causal_lm",
    **kwargs: Any,
):
    """The load path: resolve, open the source, build on meta, place, stream the weights.

    device_map ("auto" | "balanced" | "sequential" | "cpu" | a device | {prefix: device}) with
    max_memory ({device: bytes or "2GB"}) places whole blocks on devices, "disk" included.
    quantization ("int8" | "int4" | QuantConfig) quantizes the decoder's Linear weights as they stream in;
    "gguf" (with gguf_file=) keeps every weight in its file's own quantization, as llama.cpp runs it.
    tp_plan="auto" (under torchrun) shards the decoder layers across ranks; fsdp=True shards every
    parameter for training (with lora_config: a new adapter, and the PeftModel is returned).
    progress shows a bar on stderr (None: for checkpoints of 1 GiB or more, and GGUF files, which
    dequantize slowly). verify=True checks the files' content hashes where the HF cache has them.
    head: "causal_lm", "sequence_classification" (a `score` head), "token_classification" or "base" (the body alone; see build.HEADS).
    Other keyword arguments override config fields, as in transformers.
    """
    check_head(head, gguf_file)
    hub = _arguments(kwargs, attn_implementation)
    quantization = _bitsandbytes(kwargs, quantization)
    want = parse_dtype(torch_dtype if torch_dtype is not None else dtype)
    if quantization not in (None, "gguf") and want == "auto":
        want = torch.bfloat16  # the quantized kernels compute in bf16; the float parts follow
    report = LoadReport(source=os.fspath(pretrained_model_name_or_path))
    directory = resolved or resolve_model_dir(pretrained_model_name_or_path, **hub)  # from_pretrained's
    report.directory = directory
    report.lap("resolve")
    source = open_source(directory, gguf_file, use_safetensors, variant)
    quantization = _int4_groups(quantization, source)
    if verify:  # content hashes, where the HF cache names its blobs by them
        report.notes.append(verify_files(directory, source.files))
    report.files, report.format = [os.path.basename(f) for f in source.files], source.format
    config, shapes, cls, from_tokens = _model_plan(
        source, config, kwargs, attn_implementation, head, directory
    )
    report.lap("config")

    target = want if isinstance(want, torch.dtype) else config_dtype(config)
    with torch.device("meta"):
        model = cls(config)
    if isinstance(target, torch.dtype):  # free on the meta device; the config records it, as transformers'
        model, config.dtype = model.to(target), target
    if from_tokens:  # vLLM's classifier_from_token: the score made from the LM head's rows (models.heads)
        model.score_tokens = from_tokens
    placer = _placer(model, device, device_map, max_memory, offload_folder, quantization, tp_plan, fsdp,
                     lora_config, source)  # fmt: skip
    placer.setup(model)
    report.device = placer.describe()
    report.lap("build")
    if progress is None:
        progress = source.slow or sum(os.path.getsize(f) for f in source.files) >= 2**30
    model = stream(model, source, placer, target, report, strict, check_finite, progress, len(shapes or ()))
    give_back_freed_memory()  # the load's temporaries (malloc.py)
    report.dtype_decision = "requested" if isinstance(want, torch.dtype) else source.dtype_note
    report.lap("weights")
    _finish(model.get_base_model() if hasattr(model, "get_base_model") else model, source, report,
            os.fspath(pretrained_model_name_or_path))  # fmt: skip
    return model


def _finish(base, source, report: LoadReport, name: str) -> None:
    """The loaded model's attributes: eval mode, generation config, load report, quantization flags, name."""
    base.eval()
    base.generation_config = source.generation_config(base.config)
    base.load_report = report
    saved = base.config.extra.get("quantization_config")
    if isinstance(saved, dict) and saved.get("quant_method") == "autolm":  # what transformers' users check
        bits = saved.get("bits")
        base.is_quantized, base.is_loaded_in_4bit, base.is_loaded_in_8bit = True, bits == 4, bits == 8
    base.name_or_path = base.config.name_or_path = name
    logger.info("loaded %s\n%s", report.source, report)


def _arguments(kwargs: dict, attn_implementation) -> dict:
    """Drop (and log) transformers' arguments that change nothing here, refuse an attention implementation
    autolm does not have, and take out the hub's arguments (returned)."""
    for k in [k for k in kwargs if k in _ACCEPTED]:
        if kwargs.pop(k) is not None and _ACCEPTED[k]:
            logger.info("from_pretrained: %s is accepted and has no effect (%s)", k, _ACCEPTED[k])
    if attn_implementation not in _ATTENTION:
        raise ConfigError(
            f"attn_implementation={attn_implementation!r} is not available: autolm runs PyTorch's "
            "scaled_dot_product_attention (flash attention on CUDA) and its own CPU kernels; "
            "pass 'sdpa' or 'eager'"
        )
    return {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}


def _int4_groups(quantization, source):
    """quantization "int4" on a checkpoint stored in 4-bit groups (compressed-tensors' W4A16, GPTQ, AWQ): autolm's
    int4 in the checkpoint's group size, so that its codes are kept as stored (sources.compressed.Int4Codes)."""
    group = source.int4_group() if quantization == "int4" and hasattr(source, "int4_group") else None
    return QuantConfig(bits=4, group_size=group) if group in (32, 64, 128, 256) else quantization


def _bitsandbytes(kwargs: dict, quantization):
    """transformers' quantization_config= (a BitsAndBytesConfig, or its dict) and load_in_4bit / load_in_8bit as
    autolm's int4 / int8 (quant.QuantConfig.parse says how)."""
    asked = {k: kwargs.pop(k) for k in ("quantization_config", "load_in_4bit", "load_in_8bit") if k in kwargs}
    bnb = asked.pop("quantization_config", None) or ({**asked} if any(asked.values()) else None)
    if bnb is None:
        return quantization
    if quantization is not None:
        raise ConfigError(
            "pass quantization= or quantization_config= (load_in_4bit / load_in_8bit), not both"
        )
    return QuantConfig.parse(bnb)


def _model_plan(source, config, kwargs: dict, attn_implementation, head: str, directory: str):
    """(config, the checkpoint's shapes or None, the class to build, score_from_tokens' answer), checked against
    each other before anything is built."""
    config = _config(source, config, kwargs)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    shapes = source.shapes()  # from the safetensors headers (or GGUF metadata); None for .bin
    cls = model_class(config.model_type, head)
    check_size(config, shapes, cls)
    from_tokens = score_from_tokens(config, directory, shapes) if head == "sequence_classification" else None
    return config, shapes, cls, from_tokens


def _config(source, config, kwargs: dict) -> PretrainedConfig:
    """The source's config (or the one given), with the keyword arguments that name config fields applied, and
    vLLM's `hf_overrides` (a dict of config keys, any key: classifier_from_token, ...)."""
    if config is None:
        config = source.config()
    labels = ("id2label", "label2id", "num_labels", "problem_type")  # transformers' config keys for any head
    hf = kwargs.pop("hf_overrides", None) or {}
    if not isinstance(hf, dict):
        raise ConfigError(f"hf_overrides must be a dict of config keys and values, found {type(hf).__name__}")
    overrides = {
        k: kwargs.pop(k) for k in list(kwargs) if hasattr(config, k) or k in config.extra or k in labels
    } | hf
    if kwargs:
        raise ConfigError(f"from_pretrained got unsupported arguments: {', '.join(sorted(kwargs))}")
    if overrides:
        config = type(config).from_dict(config.to_dict(), source=config.source, **overrides)
    return config


def _placer(model, device, device_map, max_memory, offload_folder, quantization, tp_plan, fsdp, lora_config,
            source=None):  # fmt: skip
    if tp_plan is not None and tp_plan != "auto":
        raise ConfigError(f"tp_plan {tp_plan!r} is not supported (expected 'auto')")
    if device_map is None and max_memory is not None:
        device_map = "auto"
    saved = model.config.extra.get("quantization_config")
    # MXFP4 experts (gpt-oss, nn.expert_formats), FP8 blocks (sources.fp8), compressed-tensors' formats
    # (sources.compressed), GPTQ / AWQ (sources.gptq) and bitsandbytes (sources.bnb) are dequantized while loading:
    # the model holds, and saves, floats
    dequantized = ("mxfp4", "fp8", "compressed-tensors", "gptq", "awq", "bitsandbytes")
    if isinstance(saved, dict) and saved.get("quant_method") in dequantized:
        del model.config.extra["quantization_config"]
        saved = None
    if tp_plan or fsdp:
        if device_map is not None or quantization is not None or saved is not None or (tp_plan and fsdp):
            raise ConfigError(
                "tp_plan and fsdp cannot be combined with each other, device_map or quantization"
            )
        if tp_plan and not model.tp_patterns:
            raise ConfigError(
                f"tp_plan='auto': model type {model.config.model_type!r} has no tensor-parallel plan (its "
                f"{type(model).__name__} declares none), so it cannot be split across ranks; load it on one device"
            )
        return TensorParallel() if tp_plan else FSDP(lora_config)
    if lora_config is not None:
        raise ConfigError("lora_config is for fsdp=True; otherwise wrap the loaded model with get_peft_model")
    for key in max_memory or {}:
        if str(key) != "disk":
            check_device(key, "max_memory key")
    inner = (
        DeviceMap(device_map, max_memory, offload_folder)
        if device_map is not None
        else OneDevice(check_device(device) if device is not None else torch.device("cpu"))
    )
    if quantization == "gguf":  # the GGUF file's own blocks (keep.py)
        return KeepGGUF(source, inner)
    if quantization is not None or saved is not None:
        return Quantize(quantization, saved, inner)
    return inner


interop.loader = from_pretrained  # each family's Family.from_pretrained (models.interop)


__all__ = ["LoadReport", "from_pretrained"]
