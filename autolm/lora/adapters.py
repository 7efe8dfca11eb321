"""What managing named adapters does to a model whose Linear layers carry LoRA (LoraLinear, ModulesToSave): which
adapters run, which weights train, their tensors under peft's names, loading them, removing them. PeftModel and
the models' own PEFT integration (transformers' `model.load_adapter`, ...) both work through these."""

from __future__ import annotations

import re

import torch
from torch import nn

from .._util import full_tensor
from ..errors import AdapterError
from .config import LoraConfig
from .inject import ModulesToSave
from .layers import AdapterLayer, LoraEmbedding, LoraLinear
from .tokens import TrainableTokensWrapper


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The model's LoraLinear and LoraEmbedding layers."""
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def save_wrappers(model: nn.Module) -> list[ModulesToSave]:
    return [m for m in model.modules() if isinstance(m, ModulesToSave)]


def token_wrappers(model: nn.Module) -> list[TrainableTokensWrapper]:
    """The layers training chosen token rows (trainable_token_indices)."""
    return [m for m in model.modules() if isinstance(m, TrainableTokensWrapper)]


def activate(model: nn.Module, names: list[str]) -> None:
    """Run these adapters (the LoRA deltas of each are added; a modules_to_save copy of the first is used)."""
    for layer in lora_layers(model) + token_wrappers(model):
        layer.active_adapters = list(names)
    for w in save_wrappers(model):
        w.active_adapter = next((n for n in names if n in w.modules_to_save), names[0] if names else None)


def set_disabled(model: nn.Module, disabled: bool) -> None:
    """With adapters disabled the model computes as its base model and, as in peft, their weights do not train
    (each one's requires_grad is restored when they are enabled again)."""
    for layer in lora_layers(model) + save_wrappers(model) + token_wrappers(model):
        if disabled and not layer.disable_adapters:
            layer._trained = [(p, p.requires_grad) for ps in adapter_params(layer).values() for p in ps]
            for p, _ in layer._trained:
                p.requires_grad_(False)
        elif not disabled and layer.disable_adapters:
            for p, trained in getattr(layer, "_trained", ()):
                p.requires_grad_(trained)
            layer._trained = []
        layer.disable_adapters = disabled


def adapter_params(layer: nn.Module) -> dict[str, list[torch.Tensor]]:
    """{adapter: its parameters} in a LoRA layer's adapter containers or a modules_to_save wrapper's copies."""
    if isinstance(layer, ModulesToSave):
        return {k: list(m.parameters()) for k, m in layer.modules_to_save.items()}
    if isinstance(layer, TrainableTokensWrapper):  # a tied layer's rows are the embeddings' (counted there)
        return {} if layer.tied else {k: [p] for k, p in layer.token_adapter.trainable_tokens_delta.items()}
    kinds = EMBEDDING_KINDS if isinstance(layer, LoraEmbedding) else ("lora_A", "lora_B")
    out: dict[str, list] = {}
    for kind in (*kinds, "lora_magnitude_vector"):
        for key, value in getattr(layer, kind).items():
            out.setdefault(key, []).extend(value.parameters() if isinstance(value, nn.Module) else [value])
    return out


def mark_trainable(model: nn.Module, config: LoraConfig, name: str) -> None:
    """Only this adapter's LoRA weights (its modules_to_save copies, and biases as its config says) train."""
    for pname, p in model.named_parameters():
        lora = any(f".{kind}.{name}." in pname for kind in ("lora_A", "lora_B", "lora_magnitude_vector"))
        lora = lora or any(pname.endswith(f".{kind}.{name}") for kind in EMBEDDING_KINDS)
        saved = f".modules_to_save.{name}." in pname or pname.endswith(f".{TOKEN_ROWS}.{name}")
        bias = pname.endswith(".bias") and (
            config.bias == "all" or (config.bias == "lora_only" and ".base_layer." in pname)
        )
        p.requires_grad_(lora or saved or bias)


EMBEDDING_KINDS = ("lora_embedding_A", "lora_embedding_B")
TOKEN_ROWS = "token_adapter.trainable_tokens_delta"  # trained token rows: a ParameterDict by adapter


def of_adapter(pname: str, name: str) -> bool:
    """Whether a parameter's name is under adapter `name` (a ModuleDict's module, or a ParameterDict's entry)."""
    return f".{name}." in pname or pname.endswith(f".{name}")


def _disk_name(pname: str, name: str) -> str | None:
    """A parameter's name in an adapter file (without the adapter's name), or None when it is not the adapter's."""
    for kind in ("lora_A", "lora_B"):
        if f".{kind}.{name}." in pname:
            return pname.replace(f".{kind}.{name}.", f".{kind}.")
    if pname.endswith(f".lora_magnitude_vector.{name}.weight"):  # DoRA's magnitudes: peft's name on disk
        return pname[: -len(f".{name}.weight")]
    if any(pname.endswith(f".{kind}.{name}") for kind in (*EMBEDDING_KINDS, TOKEN_ROWS)):  # ParameterDicts
        return pname[: -len(f".{name}")]
    if f".modules_to_save.{name}." in pname:
        return pname.replace(f".modules_to_save.{name}.", ".")
    return None


def _trained_bias(pname: str, config: LoraConfig) -> bool:
    return (
        pname.endswith(".bias")
        and config.bias != "none"
        and ".lora_" not in pname
        and ".modules_to_save." not in pname
        and (config.bias == "all" or ".base_layer." in pname)
    )


def _embedding_bases(model: nn.Module, config: LoraConfig) -> set[str]:
    """peft's save_embedding_layers="auto" where embed_tokens or lm_head is a target: the weights of the input and
    output embeddings that carry LoRA go into the adapter file with it (`<module>.base_layer.weight`), and peft
    loads them back into the base layers."""
    t = config.target_modules
    if isinstance(t, str):
        named = (n for n, _ in model.named_modules() if re.match(r"(.*\.)?(embed_tokens|lm_head)$", n))
        targeted = t.lower() != "all-linear" and any(re.fullmatch(t, n) for n in named)
    else:
        targeted = any(k in (t or ()) for k in ("embed_tokens", "lm_head"))
    ends = [getattr(model, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
    bases = [layer.base_layer for layer in ends if targeted and isinstance(layer, AdapterLayer)]
    return {f"{n}.weight" for n, m in model.named_modules() if any(m is b for b in bases)}


def disk_names(
    model: nn.Module, config: LoraConfig, name: str, prefix: str = "", as_read: bool = False
) -> dict[str, str]:
    """{parameter name: its name in an adapter file} for the adapter's parameters (and trained biases, and the
    targeted embeddings' weights as peft saves them); as_read: the name as the model's checkpoint rules read a
    file's (a base model's names keep the body's prefix, which its files drop)."""
    out = {}
    bases = _embedding_bases(model, config)
    renamed = getattr(model, "adapter_key", None) if not as_read else None
    renamed = renamed or (lambda key: key)
    for pname, _ in model.named_parameters():
        key = _disk_name(pname, name)
        if key is None and (_trained_bias(pname, config) or pname in bases):
            key = pname
        if key is not None:
            out[pname] = prefix + renamed(key)
    return out


def from_state_dict(model: nn.Module, names: dict[str, str], state_dict: dict) -> dict[str, torch.Tensor]:
    """{on-disk name: tensor} for the entries of `state_dict`, a state dict of `model`, that disk_names `names`
    (keyed by parameter name) covers; its keys are those model.state_dict() gives, which drop a base model's body
    prefix where the parameters' names keep it."""
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    keyed = dict(names)
    for key, t in model.state_dict(keep_vars=True).items():
        if param_names.get(id(t)) in names:
            keyed[key] = names[param_names[id(t)]]
    return {keyed[k]: v for k, v in state_dict.items() if k in keyed}


def adapter_state(model: nn.Module, config: LoraConfig, name: str, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (prefix + module name, no adapter name), gathered to the CPU."""
    params = dict(model.named_parameters())
    return {
        key: full_tensor(params[pname].detach()).to("cpu").contiguous()
        for pname, key in disk_names(model, config, name, prefix).items()
    }


def load_state(
    model: nn.Module,
    config: LoraConfig,
    name: str,
    weights: dict[str, torch.Tensor],
    source: str,
    prefix: str,
) -> None:
    """Copy an adapter's tensors (peft's names, `prefix` first) into its parameters; every LoRA tensor must be
    there and every tensor must fit, or AdapterError names them. Names are read as the model's checkpoint rules
    read its checkpoint's (an adapter trained on Gemma 3's image-text model names `model.language_model.*`), and
    tensors of modules those rules skip (its vision tower) are left out."""
    weights = _model_names(model, weights, prefix)
    params = dict(model.named_parameters())
    expected = {key: pname for pname, key in disk_names(model, config, name, prefix, as_read=True).items()}
    unknown = sorted(k for k in weights if k not in expected)
    if unknown:
        raise AdapterError(
            f"{source}: adapter tensors do not match the model's modules: {', '.join(unknown[:10])}"
        )
    missing = sorted(
        k for k, p in expected.items() if k not in weights and (".lora_" in p or TOKEN_ROWS in p)
    )
    if missing:
        raise AdapterError(f"{source}: adapter is missing tensors: {', '.join(missing[:10])}")
    for key, t in weights.items():
        p = params[expected[key]]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterError(
                f"{source}: tensor {key!r} has shape {tuple(t.shape)} but the model expects {tuple(p.shape)} "
                "(different base model or rank?)"
            )
    with torch.no_grad():
        for key, t in weights.items():
            params[expected[key]].copy_(t.to(params[expected[key]].dtype))


def _model_names(model: nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    rules = getattr(model, "checkpoint_rules", None)
    if not rules:
        return weights
    out = {}
    for key, t in weights.items():
        head = prefix if key.startswith(prefix) else ""
        name = rules.renamed(key[len(head) :])
        if not rules.ignores(name):
            out[head + name] = t
    return out


def remove(model: nn.Module, name: str) -> None:
    """Take an adapter's layers out (refused while it is merged into the weights)."""
    for layer in lora_layers(model) + token_wrappers(model):
        if name in layer.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged: unmerge_adapter() before deleting it")
    for layer in lora_layers(model):
        for d in (layer.lora_A, layer.lora_B, layer.lora_dropout, layer.lora_magnitude_vector):
            if name in d:
                del d[name]
        layer.scaling.pop(name, None)
        layer._norms.pop(name, None)
        layer.active_adapters = [a for a in layer.active_adapters if a != name]
    for w in save_wrappers(model):
        if name in w.modules_to_save:
            del w.modules_to_save[name]
    for w in token_wrappers(model):
        w.remove(name)


def resolved_targets(model: nn.Module, config: LoraConfig, name: str) -> list[str] | str | None:
    """target_modules as peft saves it: a list of names stays as given; "all-linear" becomes the full names of
    the modules it matched (peft expands it so the saved config needs no model to resolve)."""
    t = config.target_modules
    if isinstance(t, str) and t.lower() == "all-linear":
        return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear) and name in m.lora_A)
    return t


def config_dict(model: nn.Module, config: LoraConfig, name: str) -> dict:
    """adapter_config.json as peft writes it: the targets resolved, the base model as it was given."""
    d = config.to_dict()
    d["target_modules"] = resolved_targets(model, config, name)
    if d.get("base_model_name_or_path") is None:
        d["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    return d
