"""Falcon-Mamba (tiiuae/falcon-mamba-7b and its instruct model): Mamba (see autolm.models.mamba: every layer a
Mamba-1 mixer under an RMSNorm, no attention, the residual in float32, `backbone` with embeddings, layers, norm_f)
with one change in the mixer: the time step (its rank-R input to dt_proj), B and C are each RMS-normed without a
weight (epsilon `mixer_rms_eps`) before the scan. transformers keeps those norms' unit weights as buffers it does
not save, so the checkpoint's tensors are Mamba's.

GGUF: llama.cpp's converter writes Falcon-Mamba as Mamba ("mamba", the tensors and keys of autolm.models.mamba)
with ssm.dt_b_c_rms true, the key that claims such a file for this family (one without it loads as Mamba).
llama.cpp's graph norms dt, B and C with the layers' epsilon (attention.layer_norm_rms_epsilon, config.json's
layer_norm_epsilon): a file loads with mixer_rms_eps equal to it, and GGUF out writes a model whose mixer_rms_eps
differs (transformers' defaults and tiiuae/falcon-mamba-7b's config do: 1e-6 against 1e-5) as the converter does,
with a warning naming both epsilons.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import _is_number
from ..errors import ConfigError
from ..nn.mamba1 import MambaMixer
from . import mamba
from .mamba import MambaBlock, MambaConfig, MambaForCausalLM, MambaModel


@dataclass(repr=False)
class FalconMambaConfig(MambaConfig):
    """transformers' FalconMambaConfig: MambaConfig's fields and `mixer_rms_eps`."""

    model_type: ClassVar[str] = "falcon_mamba"

    mixer_rms_eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        eps = self.mixer_rms_eps
        if not _is_number(eps) or not 0 < eps < 1:
            raise ConfigError(
                f"{self.source}: mixer_rms_eps must be a positive number below 1, found {eps!r}"
            )

    def mixer(self, layer_idx: int, **kwargs: Any) -> MambaMixer:
        return super().mixer(layer_idx, bcdt_norm="weightless", norm_eps=self.mixer_rms_eps, **kwargs)


def _derive(d: dict[str, Any], get) -> None:
    """Mamba's, and the norms of dt, B and C at the layers' epsilon (as llama.cpp's graph computes them)."""
    mamba.derive(d, get)
    if "rms_norm_eps" in d:
        d["mixer_rms_eps"] = d["rms_norm_eps"]


def _write_config(out: dict[str, Any], c) -> None:
    """Mamba's keys with ssm.dt_b_c_rms true (MambaModel.set_gguf_parameters for model_type falcon_mamba)."""
    mamba.write_config(out, c)
    out["ssm.dt_b_c_rms"] = True


class FalconMambaBlock(MambaBlock):
    """Mamba's block around Falcon-Mamba's mixer."""


class FalconMambaModel(MambaModel):
    block_class: ClassVar[type] = FalconMambaBlock


class FalconMambaForCausalLM(MambaForCausalLM):
    """transformers' FalconMambaForCausalLM."""

    config_class = FalconMambaConfig
    model_class: ClassVar[type] = FalconMambaModel
    # llama.cpp's "mamba" with ssm.dt_b_c_rms true, which claims the file for this family
    gguf = dataclasses.replace(
        mamba.LAYOUT, claim=("ssm.dt_b_c_rms", True), derive=_derive, write_config=_write_config
    )
    _no_split_modules: ClassVar[list[str]] = ["FalconMambaBlock"]
