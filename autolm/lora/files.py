"""An adapter's files, in peft's format: adapter_config.json + adapter_model.safetensors (or .bin), tensors named
`base_model.model.<module>.lora_A.weight` (no adapter name on disk); several adapters in one transaction.

Adapters are read whole (they are small next to their base model) with safetensors' own parser, and .bin files with
torch.load(weights_only=True): no code from a file ever runs. This keeps autolm.lora free of the checkpoint sources,
so the models can carry transformers' PEFT integration (autolm.lora.integration) without an import cycle."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import torch

from .._util import atomic_directory, world
from ..errors import AdapterError
from ..hub import HUB_KWARGS, resolve_model_dir
from ..saving import write_tensors
from .config import CONFIG_NAME

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."  # peft's prefix of every tensor name on disk
_BIN_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError,
               AttributeError, ImportError, TypeError, KeyError, RecursionError, NotImplementedError)  # fmt: skip


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        with open(path, "rb") as f:
            data = f.read()
        return load(data)  # parses the header and checks every offset against the bytes read
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None


def _read_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _BIN_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(
            f"{path}: not a loadable weights-only PyTorch file ({first}); autolm never unpickles arbitrary objects"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterError(f"{path}: expected a dict of tensor names to tensors")
    return state


def adapter_dir(model_id: str | os.PathLike, where: str, kwargs: dict) -> str:
    """The local folder of an adapter (a path or a repo id, with the hub's arguments); other arguments are refused
    by name rather than passed on."""
    unknown = sorted(k for k in kwargs if k not in HUB_KWARGS)
    if unknown:
        raise AdapterError(f"{where} got unsupported arguments: {', '.join(unknown)}")
    return resolve_model_dir(os.fspath(model_id), **kwargs)


def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their on-disk names (safetensors preferred, as peft)."""
    st_path, bin_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, WEIGHTS_BIN)
    if os.path.isfile(st_path):
        return _read_safetensors(st_path)
    if os.path.isfile(bin_path):
        return _read_bin(bin_path)
    raise AdapterError(f"{directory}: no {WEIGHTS_NAME} or {WEIGHTS_BIN}")


def model_card(directory: str, base_model: str | None, causal: bool) -> str:
    """The README.md peft's save_pretrained leaves: the folder's own card (or huggingface_hub's template) with
    peft's metadata set (library_name, tags: lora, transformers, base_model:adapter:<base>; pipeline_tag
    text-generation for a causal LM; base_model) and the framework that wrote it listed."""
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.isfile(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = {"lora", "transformers", *([f"base_model:adapter:{base_model}"] if base_model else [])}
    card.data["tags"] = sorted(tags | set(card.data.tags or ()))
    if causal and not card.data.pipeline_tag:
        card.data.pipeline_tag = "text-generation"
    if base_model:
        card.data["base_model"] = base_model
    lines, version = card.text.splitlines(), f"- autolm {__version__}"
    if version not in lines:
        heading = "### Framework versions"
        if heading in lines:
            lines.insert(lines.index(heading) + 2, version)
        else:
            lines.append(f"{heading}\n\n{version}")
    card.text = "\n".join(lines)
    return str(card)


def write_adapters(
    directory: str | os.PathLike,
    adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]],
    safe_serialization: bool = True,
    card: tuple[str | None, bool] | None = None,
) -> None:
    """{name: (adapter_config dict, on-disk state)} into one folder, in one transaction: "default" at the top,
    the others in subfolders of their name (peft's layout), and with card (base model, causal) peft's README.md
    (model_card). Only rank 0 writes."""
    if world()[0] != 0:
        return
    with atomic_directory(os.fspath(directory)) as tmp:
        if card is not None:
            text = model_card(os.fspath(directory), *card)
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(text)
        for name, (config, state) in adapters.items():
            target = tmp if name == "default" else os.path.join(tmp, name)
            os.makedirs(target, exist_ok=True)
            if safe_serialization:
                write_tensors(state, os.path.join(target, WEIGHTS_NAME))
            else:
                torch.save(state, os.path.join(target, WEIGHTS_BIN))
            with open(os.path.join(target, CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump({**config, "inference_mode": True}, f, indent=2, sort_keys=True)
