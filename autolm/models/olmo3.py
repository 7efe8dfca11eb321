"""OLMo 3 (AI2): OLMo 2's layer (norms after attention and MLP, q/k RMSNorm over the whole projection, fp32 norm
weights) with sliding-window and full-attention layers (`layer_types`; every 4th layer full by default) and a
RoPE table per layer type: the checkpoint's RoPE scaling (YaRN on Olmo 3 7B / 32B) applies to the full layers
only, the sliding layers rotate with plain RoPE.

llama.cpp's converter writes OLMo 3 as "olmo2" with `attention.sliding_window` and one sliding flag per layer
(`attention.sliding_window_pattern`); the window's presence claims a file for this family (models.gguf_family).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import GGUFLayout
from .base import CausalLM, DecoderModel
from .olmo2 import GGUF_FIXED, Olmo2Config, Olmo2DecoderLayer, Olmo2ForCausalLM, _norm, gguf_write_text_model

_KINDS = ("sliding_attention", "full_attention")
_THETA = 500000.0  # transformers' Olmo3Config.default_theta


@dataclass(repr=False)
class Olmo3Config(Olmo2Config):
    """transformers' Olmo3Config; rope_parameters holds one dict per layer type."""

    model_type: ClassVar[str] = "olmo3"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "mlp_bias",
        "use_sliding_window",
    )  # not in transformers' config: written when set

    sliding_window: int | None = 4096
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {kind: {"rope_type": "default", "rope_theta": _THETA} for kind in _KINDS}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """rope_parameters by layer type (v5), or v4's rope_theta and rope_scaling, as transformers 5's Olmo3Config
        reads them: both to the full layers only, the sliding layers keeping the default base; written back as
        v5, as transformers writes them."""
        given = d.get("rope_parameters")
        if given is None:
            given = {"full_attention": d.get("rope_scaling")}
        if not isinstance(given, dict):
            raise ConfigError(
                f"{source}: rope_parameters must be an object by layer type, found {str(given)[:100]}"
            )
        kinds = {}
        for kind in _KINDS:
            params = given.get(kind) or {}
            if not isinstance(params, dict):
                raise ConfigError(
                    f"{source}: rope_parameters[{kind!r}] must be an object, found {str(params)[:100]}"
                )
            theta = d.get("rope_theta", _THETA) if kind == "full_attention" else _THETA
            inner: dict[str, Any] = {"rope_parameters": {"rope_theta": theta, **params}}
            if "max_position_embeddings" in d:
                inner["max_position_embeddings"] = d["max_position_embeddings"]
            kinds[kind], _ = super().read_rope(inner, source)
        return kinds, "v5"

    def __post_init__(self) -> None:
        if self.layer_types is None and _is_int(self.num_hidden_layers) and self.num_hidden_layers > 0:
            self.layer_types = [
                "sliding_attention" if (i + 1) % 4 else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        super().__post_init__()

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["full_attention"]["rope_theta"])

    def layer_window(self, i: int) -> int | None:
        return PretrainedConfig.layer_window(self, i)  # OLMo 2 has none; OLMo 3 slides on its sliding layers

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {kind: self.rope_parameters[kind] for kind in _KINDS if kind in self.layer_types}

    def layer_rope(self, i: int) -> str:
        """The RoPE table layer i reads: its layer type's."""
        return self.layer_types[i]


class Olmo3DecoderLayer(Olmo2DecoderLayer):
    """OLMo 2's layer (its window and RoPE table are the config's for the layer: sliding layers slide and read
    their layer type's table)."""


class Olmo3Model(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, Olmo3DecoderLayer, _norm(config)(config.hidden_size))


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's reading of an OLMo 3 file: each layer's sliding flag (every 4th layer full where the file gives
    none), RoPE scaling on the full layers only, the sliding layers unscaled at the full layers' base (its olmo2
    graph rotates every layer at rope.freq_base: a file's rope.freq_base_swa is not used)."""
    flags, layers = get("attention.sliding_window_pattern"), d.get("num_hidden_layers")
    if isinstance(flags, list) and _is_int(layers):
        d["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags[:layers]]
    rope = d.get("rope_parameters") or {}
    d["rope_parameters"] = {
        "full_attention": rope,
        "sliding_attention": {"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0)},
    }


def _gguf_write_config(m: dict[str, Any], c: Any) -> None:
    """Olmo2Model.set_gguf_parameters (llama.cpp's conversion/olmo.py): TextModel's keys (the full layers' RoPE,
    the sliding layers' base as rope.freq_base_swa), then the window and one sliding flag per layer, written
    whatever the layers are, as the converter does for every config with a sliding_window."""
    gguf_write_text_model(m, c)
    if c.sliding_window is not None:
        m["attention.sliding_window"] = c.sliding_window
        m["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]


class Olmo3ForCausalLM(CausalLM):
    """transformers' Olmo3ForCausalLM."""

    config_class = Olmo3Config
    gguf = GGUFLayout(
        "olmo2",
        layer=Olmo2ForCausalLM.gguf.layer,
        fixed=GGUF_FIXED,
        derive=_gguf_derive,
        write_config=_gguf_write_config,
        claim="attention.sliding_window",
    )
    tp_patterns: ClassVar[dict[str, str]] = Olmo2ForCausalLM.tp_patterns  # as OLMo 2's (and transformers')
    shard_heads = Olmo2ForCausalLM.shard_heads
    _no_split_modules: ClassVar[list[str]] = ["Olmo3DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Olmo3Model(config))
