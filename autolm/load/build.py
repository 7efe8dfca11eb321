"""What a load builds: the model class for the checkpoint and the head asked for, and the checks of the config
against the checkpoint's tensors and the arguments made before anything is built."""

from __future__ import annotations

import torch

from .._util import parse_dtype
from ..errors import ConfigError
from ..models import model_class as family_class
from ..models.heads import sequence_classification
from .stream import layer_index


def model_class(model_type: str, head: str = "causal_lm") -> type:
    """The class a load builds: the family's causal LM, or its sequence classifier (models.heads)."""
    cls = family_class(model_type)
    return sequence_classification(cls) if head == "sequence_classification" else cls


def check_head(head: str, gguf_file) -> None:
    """The head asked for: the family's causal LM, or its sequence classifier (not from a GGUF file)."""
    if head not in ("causal_lm", "sequence_classification"):
        raise ConfigError(f"head={head!r}: expected 'causal_lm' or 'sequence_classification'")
    if head != "causal_lm" and gguf_file is not None:
        raise ConfigError(
            f"{gguf_file}: a GGUF file holds a causal LM; a sequence classifier loads from safetensors"
        )


def check_size(config, shapes: dict | None, cls) -> None:
    """Compare the model the config describes with the checkpoint's tensors before anything is built: a config
    that claims far more layers than the checkpoint holds would otherwise cost time and memory first."""
    if not shapes:
        return
    names = [cls.checkpoint_rules.to_model(n)[0] for n in shapes]
    layers = {layer_index(n, cls.layers_prefix) for n in names} - {-1}
    if config.num_hidden_layers > len(layers):
        raise ConfigError(
            f"{config.source}: num_hidden_layers is {config.num_hidden_layers} but the checkpoint "
            f"holds {len(layers)} decoder layers"
        )
    emb = shapes.get(f"{cls.embeddings_name}.weight")
    if emb is not None and tuple(emb) != (config.vocab_size, config.hidden_size):
        raise ConfigError(
            f"{config.source}: vocab_size x hidden_size is {config.vocab_size} x {config.hidden_size} "
            f"but the checkpoint's embeddings are {tuple(emb)}"
        )


def config_dtype(config) -> torch.dtype | None:
    """dtype='auto': the config's dtype when it names one, else None (the first floating tensor's dtype)."""
    name = config.dtype
    if isinstance(name, torch.dtype):
        return name
    try:
        d = parse_dtype(name) if isinstance(name, str) else None
    except ConfigError:
        return None
    return d if isinstance(d, torch.dtype) else None
