"""Falcon-Mamba (tiiuae/falcon-mamba-7b and its instruct model): Mamba (see autolm.models.mamba: every layer a
Mamba-1 mixer under an RMSNorm, no attention, the residual in float32, `backbone` with embeddings, layers, norm_f)
with one change in the mixer: the time step (its rank-R input to dt_proj), B and C are each RMS-normed without a
weight (epsilon `mixer_rms_eps`) before the scan. transformers keeps those norms' unit weights as buffers it does
not save, so the checkpoint's tensors are Mamba's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import _is_number
from ..errors import ConfigError
from ..nn.mamba1 import MambaMixer
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


class FalconMambaBlock(MambaBlock):
    """Mamba's block around Falcon-Mamba's mixer."""


class FalconMambaModel(MambaModel):
    block_class: ClassVar[type] = FalconMambaBlock


class FalconMambaForCausalLM(MambaForCausalLM):
    """transformers' FalconMambaForCausalLM."""

    config_class = FalconMambaConfig
    model_class: ClassVar[type] = FalconMambaModel
    gguf = None  # llama.cpp writes Falcon-Mamba as "mamba" with ssm.dt_b_c_rms, which Mamba's layout refuses
    _no_split_modules: ClassVar[list[str]] = ["FalconMambaBlock"]
