"""Scaling out on torch.distributed (under torchrun): tensor-parallel inference and FSDP2 fine-tuning.

`from_pretrained(..., tp_plan="auto")`: q/k/v/gate/up are column-parallel (each rank holds a slice of
the output features, i.e. of the heads), o/down row-parallel (a slice of the input features, outputs
summed across ranks). Untied embeddings and LM head are vocabulary-parallel when the vocabulary
divides evenly; norms (and a tied pair) stay replicated. Each rank reads only its slice of each
sharded weight from the memory-mapped checkpoint, and its KV cache holds only its own heads.

`fsdp_from_pretrained(...)`: the model, with a new LoRA adapter when asked, with FSDP2 `fully_shard`
on every decoder layer and on the root. Every parameter is split along dim 0 across ranks, and each
rank reads only its rows from the checkpoint. `train.finetune` splits each batch across ranks and
scales the loss so that the gradients equal one process's.
"""

from __future__ import annotations

import os

import torch

from ._util import parse_dtype, world
from .errors import ConfigError
from .load import from_pretrained
from .load.parallel import exit_all, init_from_env, local_slice, same_seed


def fsdp_from_pretrained(path: str | os.PathLike, lora_config=None, dtype=torch.float32, **kwargs):
    """Under torchrun: the model ready for sharded training (a PeftModel with lora_config; without, every
    parameter trains). The one load path with fsdp=True: built on the meta device and sharded there;
    each rank then reads only its dim-0 block of each tensor, so no rank ever holds a full copy."""
    if not isinstance(parse_dtype(dtype), torch.dtype):
        raise ConfigError("fsdp_from_pretrained needs a dtype to train in, e.g. torch.float32")
    model = from_pretrained(path, dtype=dtype, fsdp=True, lora_config=lora_config, **kwargs)
    if lora_config is not None and lora_config.base_model_name_or_path is None:
        lora_config.base_model_name_or_path = model.get_base_model().load_report.directory
    return model


__all__ = ["exit_all", "fsdp_from_pretrained", "init_from_env", "local_slice", "same_seed", "world"]
