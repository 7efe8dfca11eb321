"""save_pretrained in the HF layout: shards + index, config, generation config; every write is atomic.

A save goes into a temporary directory beside the target and replaces the target only once everything
is written and fsync'ed: an interrupted save leaves the previous model untouched. Of the target's
files only those autolm writes (its weights, shards, index and configs) are replaced; the user's
other files are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ._util import atomic_directory, full_tensor, own_names, parse_size, world
from .errors import AutolmError

logger = logging.getLogger("autolm")
_OWNED = re.compile(
    r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?|"
    r"(model\.safetensors|pytorch_model\.bin)\.index\.json|config\.json|generation_config\.json"
)


def owned(name: str) -> bool:
    """Whether a file name is one autolm's save writes (and so may replace)."""
    return _OWNED.fullmatch(name) is not None


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (the first name wins, as transformers keeps the embedding).

    Sharded (DTensor) weights are gathered whole, which every rank must take part in.
    """
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    with own_names(model):
        state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        key = t.data_ptr() if t.device.type != "meta" and not hasattr(t, "full_tensor") else id(t)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = full_tensor(t.detach()).to("cpu").contiguous()
    return out


def write_weights(
    directory: str,
    sd: dict[str, torch.Tensor],
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
) -> list[str]:
    """model.safetensors, or shards + index (huggingface_hub's splitting and names); .bin when not safe."""
    from huggingface_hub import split_torch_state_dict_into_shards

    pattern = "model{suffix}.safetensors" if safe_serialization else "pytorch_model{suffix}.bin"
    split = split_torch_state_dict_into_shards(
        sd, filename_pattern=pattern, max_shard_size=parse_size(max_shard_size)
    )
    for fname, names in split.filename_to_tensors.items():
        write_tensors({n: sd[n] for n in names}, os.path.join(directory, fname), safe_serialization)
    if split.is_sharded:
        index = {
            "metadata": dict(split.metadata),
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        with open(
            os.path.join(directory, pattern.format(suffix="") + ".index.json"), "w", encoding="utf-8"
        ) as f:
            json.dump(index, f, indent=2)
    return list(split.filename_to_tensors)


def write_tensors(shard: dict[str, torch.Tensor], path: str, safe_serialization: bool = True) -> None:
    """One weights file; a failure of the disk is an OSError (with its errno), whoever wrote the bytes."""
    if not safe_serialization:
        try:
            with open(path, "wb") as f:
                torch.save(shard, f)
        except RuntimeError as e:  # torch's writer reports the OSError of the file it wrote to as its context
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        return
    try:
        save_file(shard, path, metadata={"format": "pt"})
    except SafetensorError as e:  # safetensors' writer names the OS error in its message only
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), path) from None


def save_with_tokenizer(model, tokenizer, directory: str | os.PathLike, **kwargs) -> None:
    """model.save_pretrained and tokenizer.save_pretrained as one transaction: both appear, or neither."""
    files = set(getattr(tokenizer, "saved_files", ()))  # the tokenizer's own files (Tokenizer.saved_files)
    with atomic_directory(os.fspath(directory), lambda n: owned(n) or n in files) as tmp:
        model.save_pretrained(tmp, **kwargs)
        tokenizer.save_pretrained(tmp)


def save_model(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    state_dict: dict[str, torch.Tensor] | None = None,
    safe_serialization: bool = True,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **kwargs,
) -> None:
    """Save weights, config.json and generation_config.json in the HF layout, atomically.

    Under torch.distributed, sharded weights are gathered on every rank and rank 0 writes.
    Arguments of transformers' save_pretrained that change nothing here (from_pt, variant...) are accepted.
    """
    if push_to_hub:
        raise AutolmError(
            "save_pretrained(push_to_hub=True) is not supported: save locally, then upload with "
            "huggingface_hub's upload_folder"
        )
    for k in kwargs:
        if k not in (
            "from_pt",
            "save_function",
            "token",
            "variant",
            "save_peft_format",
            "safe_serialization",
        ):
            raise AutolmError(f"save_pretrained() got an unexpected argument {k!r}")
        logger.info("save_pretrained: %s has no effect in autolm", k)
    if any(hasattr(m, "ggml_type") for m in model.modules()):
        raise AutolmError(
            "this model keeps a GGUF file's own blocks (quantization='gguf'), which the HF layout cannot hold: "
            "load the GGUF without it (float, or quantization='int8'/'int4') to save, or keep the GGUF itself"
        )
    sd = state_dict if state_dict is not None else unique_state_dict(model)
    if any(t.device.type == "meta" for t in sd.values()):
        raise AutolmError("cannot save a model with weights still on the meta device")
    if world()[0] != 0 or not is_main_process:
        return
    # The model's own class, not a wrapper that torch.distributed made around it (FSDPLlamaForCausalLM).
    cls = next(c for c in type(model).__mro__ if not c.__module__.startswith("torch."))
    with atomic_directory(os.fspath(directory), owned) as tmp:
        write_weights(tmp, sd, max_shard_size, safe_serialization)
        d = model.config.to_dict()
        d["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        d.setdefault("architectures", [cls.__name__])
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
                f.write(gen.to_json_string())  # only the fields that are set, as transformers writes it
