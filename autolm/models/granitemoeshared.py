"""Granite MoE Shared (IBM Research's moe-7b-1b-active-shared-experts): Granite MoE's layer (the four
multipliers, a router taking the softmax over its top-k logits, stacked experts) with, where
`shared_intermediate_size` is set (0, transformers' default: none), a shared MLP (`shared_mlp`: `input_linear`
giving gate then up, `output_linear`) run on the same normed input and added to the experts' output before the
residual multiplier.

Checkpoints hold the experts under Granite MoE's JetMoE-style names (transformers reads granitemoeshared with
granitemoe's renamings); the shared MLP's names are the model's. llama.cpp's converter (GraniteMoeModel, registered
for both) writes it as "granitemoe": Granite MoE's keys and tensors, the shared MLP's width as
expert_shared_feed_forward_length (only where non-zero: that key claims a "granitemoe" file for this family) and its
input_linear split into ffn_gate_shexp and ffn_up_shexp, output_linear as ffn_down_shexp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, RMSNorm
from .base import CausalLM, DecoderModel
from .granite import GraniteForCausalLM, GraniteModel
from .granitemoe import GraniteMoeConfig, GraniteMoeDecoderLayer, GraniteMoeForCausalLM
from .granitemoe_swa import GraniteMoeSWADecoderLayer
from .granitemoehybrid import _MOE_NAMES, GraniteMoeHybridMLP
from .granitemoehybrid_gguf import MambaGGUF
from .mixtral import MOE_TP

_SHARED_KEY = "expert_shared_feed_forward_length"


@dataclass(repr=False)
class GraniteMoeSharedConfig(GraniteMoeConfig):
    """transformers' GraniteMoeSharedConfig: Granite MoE's fields and defaults plus the shared MLP's width (0:
    none)."""

    model_type: ClassVar[str] = "granitemoeshared"

    shared_intermediate_size: int = 0

    def validate(self) -> None:
        super().validate()
        s = self.shared_intermediate_size
        if not _is_int(s) or s < 0:
            raise ConfigError(
                f"{self.source}: shared_intermediate_size must be a non-negative integer (0: no shared MLP), "
                f"found {s!r}"
            )


class GraniteMoeSharedDecoderLayer(GraniteMoeDecoderLayer):
    """Granite MoE's layer plus the shared MLP where the config has one."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.shared_intermediate_size:
            self.shared_mlp = GraniteMoeHybridMLP(
                config.hidden_size, config.shared_intermediate_size, config.hidden_act
            )

    # pre-norm attention, then the experts plus the shared MLP on one normed input, each branch scaled by
    # residual_multiplier before its residual add: Granite MoE SWA's arithmetic
    forward = GraniteMoeSWADecoderLayer.forward


class GraniteMoeSharedModel(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(
            config, GraniteMoeSharedDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps)
        )
        self.embedding_multiplier = float(config.embedding_multiplier)

    scale_inputs = GraniteModel.scale_inputs  # the embeddings times embedding_multiplier


def _write_config(out: dict[str, Any], c: Any) -> None:
    """The converter writes the shared MLP's width only where there is one."""
    if not c.shared_intermediate_size:
        out.pop(_SHARED_KEY, None)


class GraniteMoeSharedForCausalLM(CausalLM):
    """transformers' GraniteMoeSharedForCausalLM."""

    config_class = GraniteMoeSharedConfig
    # Granite MoE's renamings and llama.cpp's experts; the shared MLP's gate / up halves (MambaGGUF's shared-MLP
    # pieces, as Granite 4's)
    checkpoint_rules = CheckpointRules([*GraniteMoeForCausalLM.checkpoint_rules.rules, MambaGGUF()])
    gguf = dataclasses.replace(
        GraniteMoeForCausalLM.gguf,
        config=(*GraniteMoeForCausalLM.gguf.config, (_SHARED_KEY, "shared_intermediate_size")),
        layer=_MOE_NAMES,  # Granite MoE's and ffn_{gate,up,down}_shexp
        write_config=_write_config,
        claim=_SHARED_KEY,
    )
    # attention split as Llama's, the experts cut their own intermediate rows; the shared MLP's packed gate / up
    # split with its output gathered whole (chunked into gate and up on every rank), output_linear taking its slice
    tp_patterns: ClassVar[dict[str, str]] = {
        **MOE_TP,
        "layers.*.shared_mlp.input_linear": "colwise_gather",
        "layers.*.shared_mlp.output_linear": "rowwise_split",
    }
    _no_split_modules: ClassVar[list[str]] = ["GraniteMoeSharedDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, GraniteMoeSharedModel(config))
        self.logits_scaling = float(config.logits_scaling)  # an attribute: the compiled head's key holds it

    finish_logits = GraniteForCausalLM.finish_logits  # the logits divided by logits_scaling
