"""The building blocks every model family is made of, with Hugging Face's module and parameter names: linear
layers behind autolm's kernels, norms, rotary embeddings, attention and its forward contexts, MLPs, the KV
cache, and checkpoint naming rules. Nothing here knows a family."""

from .attention import (
    Attention,
    Forward,
    OneToken,
    ReferenceWindow,
    build_mask,
    default_positions,
    pad_mask_to,
)
from .cache import KVCache
from .checkpoint import (
    Assembler,
    CheckpointRules,
    GGUFLayout,
    Ignored,
    Rename,
    Stacked,
    transformers_state_dict,
)
from .conv1d import Conv1D, out_in
from .linear import Linear, embedding, fuse, packed, resize_bias, resized_rows
from .mlp import ACTIVATIONS, MLP, GatedMLP
from .moe import Experts, GroupedRouter, Router, SparseMoeBlock
from .norms import RMSNorm
from .rope import Rotary, apply_rotary
from .sharded import SelfSharded

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "Assembler",
    "Attention",
    "CheckpointRules",
    "Conv1D",
    "Experts",
    "Forward",
    "GGUFLayout",
    "GatedMLP",
    "GroupedRouter",
    "Ignored",
    "KVCache",
    "Linear",
    "OneToken",
    "RMSNorm",
    "ReferenceWindow",
    "Rename",
    "Rotary",
    "Router",
    "SelfSharded",
    "SparseMoeBlock",
    "Stacked",
    "apply_rotary",
    "build_mask",
    "default_positions",
    "embedding",
    "fuse",
    "out_in",
    "packed",
    "pad_mask_to",
    "resize_bias",
    "resized_rows",
    "transformers_state_dict",
]
