"""gpt-oss: grouped-query attention with biases, a learned sink logit per head, sliding windows on alternate
layers and YaRN RoPE; a mixture of experts whose router has a bias and takes the softmax over the top-k
logits, and whose experts have biases, interleaved gate/up rows (stored transposed, (E, h, 2I)) and their own
clamped activation. RMSNorm multiplies by its weight in fp32.

The Hub's checkpoints store the experts' weights in MXFP4 (`gate_up_proj_blocks` + `gate_up_proj_scales`);
they are dequantized while loading (nn.expert_formats).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..config import _is_number
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Experts, GGUFLayout, Rename, RMSNorm, Router, SparseMoeBlock
from ..nn.expert_formats import MXFP4, GGUFExperts
from .base import CausalLM
from .llama import LlamaConfig
from .mixtral import GGUF_EXPERTS, MixtralDecoderLayer, MixtralModel, validate_experts

_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
         "original_max_position_embeddings": 4096}  # fmt: skip


@dataclass(repr=False)
class GptOssConfig(LlamaConfig):
    """transformers' GptOssConfig."""

    model_type: ClassVar[str] = "gpt_oss"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "max_window_layers",
        "mlp_bias",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    default_theta: ClassVar[float] = 150000.0
    num_hidden_layers: int = 36
    num_local_experts: int = 128
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int | None = 64
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    sliding_window: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    attention_bias: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {**_YARN, "rope_theta": 150000.0})

    def __post_init__(self) -> None:
        if self.layer_types is None and isinstance(self.num_hidden_layers, int):
            self.layer_types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        if d.get("rope_parameters") is None and d.get("rope_scaling") is None:
            d = {**d, "rope_parameters": {**_YARN, "rope_theta": d.get("rope_theta", cls.default_theta)}}
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def validate(self) -> None:
        super().validate()
        validate_experts(self, self.num_local_experts, self.num_experts_per_tok)
        for name in ("swiglu_alpha", "swiglu_limit"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(
                    f"{self.source}: {name} must be a positive number, found {getattr(self, name)!r}"
                )


class GptOssDecoderLayer(MixtralDecoderLayer):
    @staticmethod
    def norm(config: Any, dim: int) -> nn.Module:
        return RMSNorm(dim, config.rms_norm_eps, weight_in_fp32=True)

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, bias=config.attention_bias, window=config.layer_window(layer_idx),
                         sinks=True)  # fmt: skip

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, n = config.hidden_size, config.num_local_experts
        router = Router(h, n, config.num_experts_per_tok, bias=True, order="topk_softmax")
        experts = Experts(n, h, config.intermediate_size, bias=True, transposed=True, interleaved=True,
                          limit=config.swiglu_limit, alpha=config.swiglu_alpha)  # fmt: skip
        return SparseMoeBlock(router, experts, router_name="router")


def _gguf_rope(d: dict[str, Any], get) -> None:
    """llama.cpp writes YaRN's betas under its own keys, and no `truncate`: gpt-oss's YaRN keeps the correction
    range unrounded (transformers' truncate=False)."""
    rope = d["rope_parameters"]
    for key, name in (
        ("rope.scaling.yarn_beta_fast", "beta_fast"),
        ("rope.scaling.yarn_beta_slow", "beta_slow"),
    ):
        if get(key) is not None:
            rope[name] = get(key)
    if rope.get("rope_type") == "yarn":
        rope["truncate"] = False


class GptOssForCausalLM(CausalLM):
    """transformers' GptOssForCausalLM."""

    config_class = GptOssConfig
    checkpoint_rules = CheckpointRules(
        [
            MXFP4(),  # the Hub's MXFP4 experts, dequantized while loading
            GGUFExperts(transposed=True, interleaved=True),
            Rename(r"\.self_attn\.sinks\.weight$", ".self_attn.sinks", r"(?!)", ""),  # GGUF's name
        ]
    )
    gguf = GGUFLayout(
        "gpt-oss",
        config=(
            ("expert_count", "num_local_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "intermediate_size"),
            ("attention.key_length", "head_dim"),
        ),
        layer=(
            ("attn_sinks", "self_attn.sinks"),
            ("post_attention_norm", "post_attention_layernorm"),
            *(("ffn_gate_inp", "mlp.router") if a == "ffn_gate_inp" else (a, b) for a, b in GGUF_EXPERTS),
        ),
        derive=_gguf_rope,
    )
    # no tensor-parallel plan (as transformers has none for gpt-oss): its per-head sinks would need one
    tp_patterns: ClassVar[dict[str, str]] = {}
    _no_split_modules: ClassVar[list[str]] = ["GptOssDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, MixtralModel(config, GptOssDecoderLayer))
