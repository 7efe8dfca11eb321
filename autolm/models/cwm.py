"""CWM (Meta's Code World Model, facebook/cwm): Llama 3's layer (grouped-query attention without biases, RoPE with
Llama 3's scaling by default, a SiLU-gated MLP, RMSNorm) with a sliding window by layer as Qwen 2 has it:
`layer_types` names each layer "sliding_attention" (over the last `sliding_window` tokens, 8192 by default) or
"full_attention"; where config.json gives none, every 4th layer (0, 4, 8, ...) is full and the others slide.
No use_sliding_window switch: the listed layers always slide. A config.json without RoPE parameters or scaling gets
Llama 3's (theta 1e6, factor 16 over 8192 positions; a top-level rope_theta is then ignored, as transformers does).

GGUF: llama.cpp's converter has no class for CwmForCausalLM, and its llama graph has no sliding window: this family
has no GGUF layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import _is_int
from .llama import LlamaConfig, LlamaForCausalLM

# transformers' CwmConfig RoPE where config.json gives none: Llama 3's scaling over a 8192-token original context
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 1_000_000.0, "factor": 16.0, "high_freq_factor": 4.0,
           "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}  # fmt: skip


@dataclass(repr=False)
class CwmConfig(LlamaConfig):
    """transformers' CwmConfig: CWM's sizes, Llama 3's RoPE, Llama 3's three end tokens, and a window on every layer
    but each 4th."""

    model_type: ClassVar[str] = "cwm"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "attention_bias",
        "max_window_layers",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    default_theta: ClassVar[float] = 1_000_000.0

    vocab_size: int = 128256
    hidden_size: int = 6144
    intermediate_size: int = 21504
    num_hidden_layers: int = 64
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [128001, 128008, 128009])
    sliding_window: int | None = 8192
    rope_parameters: dict[str, Any] = field(default_factory=lambda: dict(_LLAMA3))

    def __post_init__(self) -> None:
        if self.layer_types is None and _is_int(self.num_hidden_layers) and self.num_hidden_layers > 0:
            self.layer_types = [
                "full_attention" if i % 4 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        if self.eos_token_id is None:
            self.eos_token_id = [128001, 128008, 128009]  # as transformers fills it in
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        if d.get("rope_parameters") is None and d.get("rope_scaling") is None:
            d = {
                **d,
                "rope_parameters": dict(_LLAMA3),
            }  # as transformers: a top-level rope_theta ignored then
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    qkv_bias = property(lambda self: False)  # CWM's attention has no biases
    o_bias = property(lambda self: False)


class CwmForCausalLM(LlamaForCausalLM):
    """transformers' CwmForCausalLM: Llama's model with CwmConfig's windows (Llama's attention takes the layer's)."""

    config_class = CwmConfig
    gguf = None  # llama.cpp has no CWM
