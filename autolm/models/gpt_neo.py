"""GPT-Neo (EleutherAI's GPT-Neo 125M / 1.3B / 2.7B): GPT-2's body (learned position embeddings, pre-norm
LayerNorms with bias, a plain GELU MLP `c_fc` / `c_proj`, the head tied to wte) with

- attention layers that alternate between global and local ones as `attention_types` lists them
  ([[["global", "local"], 12]]: twelve global/local pairs); a local layer sees the last `window_size` key slots
  (its own included), as transformers' causal mask minus the one `window_size` below it;
- separate `q_proj` / `k_proj` / `v_proj` without bias and an `out_proj` with one, under `attn.attention`;
- no 1/sqrt(head_dim) scaling of the attention scores, which transformers computes (and softmaxes) in float32
  whatever the model's dtype: q, k and v are attended over in float32 here too, the result cast back for out_proj.

transformers' names: the body is `transformer` (wte, wpe, h, ln_f; autolm's code reaches it as `model`, its parts
as `embed_tokens`, `layers`, `norm`). Old files' attention-mask buffers (`attn.attention.bias`, `masked_bias`) are
skipped. llama.cpp has no GPT-Neo architecture: no GGUF. transformers declares no tensor-parallel plan: none here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import config_json_names
from ..errors import ConfigError, GenerationError
from ..nn import ACTIVATIONS, Attention, CheckpointRules, Ignored, embedding
from .base import CausalLM, DecoderModel
from .gpt2 import GPT2Block, GPT2LMHeadModel, GPT2Model
from .gpt_bigcode import GPTBigCodeMLP
from .opt import OPTAttention

_KINDS = ("global", "local")
# config fields GPT-Neo's config.json does not have (derived, or no such feature)
_NOT_NEO = (
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
)


@dataclass(repr=False)
class GPTNeoConfig(PretrainedConfig):
    """transformers' GPTNeoConfig: config.json's names (num_layers, num_heads, layer_norm_epsilon,
    activation_function) are attributes too; intermediate_size null means 4 * hidden_size. `attention_layers`,
    one kind per layer, is derived from attention_types (and written back, as transformers writes it)."""

    model_type: ClassVar[str] = "gpt_neo"
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "rms_norm_eps": "layer_norm_epsilon",
        "hidden_act": "activation_function",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    attention_types: list = field(default_factory=lambda: [[["global", "local"], 12]])
    num_attention_heads: int = 16
    intermediate_size: int | None = None
    window_size: int = 256
    hidden_act: str = "gelu_new"
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.1
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        self.extra.pop("attention_layers", None)  # derived from attention_types
        if self.attention_types is None:
            self.attention_types = [[["global", "local"], 12]]
        h, inner = self.hidden_size, self.intermediate_size
        if inner is not None and not (_is_int(inner) and inner > 0):
            raise ConfigError(
                f"{self.source}: intermediate_size must be a positive integer or null, found {inner!r}"
            )
        self._inner_unset = inner is None  # written back as null
        self.intermediate_size = 4 * h if inner is None and _is_int(h) else inner
        self.num_key_value_heads = self.head_dim = None  # derived from num_heads and hidden_size
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = "|".join(self.attribute_map)
            raise ConfigError(re.sub(rf"\b({names})\b", lambda m: self.attribute_map[m[1]], str(e))) from None

    @property
    def attention_layers(self) -> list[str]:
        """Each layer's kind, "global" or "local" (transformers' expand_attention_types_params)."""
        return [kind for kinds, n in self.attention_types for _ in range(n) for kind in kinds]

    def layer_window(self, i: int) -> int | None:
        return self.window_size if self.attention_layers[i] == "local" else None

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned position embeddings, no RoPE

    def validate(self) -> None:
        super().validate()
        src, types = self.source, self.attention_types
        if not _attention_types_ok(types):
            raise ConfigError(
                f"{src}: attention_types must be a list of [[kinds...], repeats] with kinds 'global' or 'local', "
                f"found {str(types)[:200]}"
            )
        if len(self.attention_layers) != self.num_hidden_layers:
            raise ConfigError(
                f"{src}: attention_types gives {len(self.attention_layers)} layers but num_layers is "
                f"{self.num_hidden_layers}"
            )
        if not (_is_int(self.window_size) and self.window_size > 0):
            raise ConfigError(f"{src}: window_size must be a positive integer, found {self.window_size!r}")
        for key in ("resid_dropout", "embed_dropout", "classifier_dropout"):
            v = getattr(self, key)
            if not (_is_number(v) and 0 <= v <= 1):
                raise ConfigError(f"{src}: {key} must be a number in [0, 1], found {v!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_NEO:
            out.pop(key, None)
        if self.__dict__.get("_inner_unset") and self.intermediate_size == 4 * self.hidden_size:
            out["intermediate_size"] = None
        out["attention_types"] = [[list(kinds), n] for kinds, n in self.attention_types]
        out["attention_layers"] = self.attention_layers
        return out


def _attention_types_ok(types: Any) -> bool:
    if not isinstance(types, (list, tuple)):
        return False
    for item in types:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))):
            return False
        kinds, n = item
        if not (_is_int(n) and 0 <= n <= 4096 and all(k in _KINDS for k in kinds)):
            return False
    return True


config_json_names(GPTNeoConfig)


class GPTNeoSelfAttention(OPTAttention):
    """q/k/v_proj without bias, out_proj with one; scores unscaled and computed in float32; the layer's window
    where it is a local one."""

    def __init__(self, config: GPTNeoConfig, layer_idx: int):
        h, n = config.hidden_size, config.num_attention_heads
        Attention.__init__(self, h, n, n, config.head_dim, layer_idx, bias=False, o_bias=True, scale=1.0,
                           window=config.layer_window(layer_idx), rope=None)  # fmt: skip

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hd = self.num_heads, self.head_dim
        # (B, heads, T, hd) in float32, as transformers' _attn upcasts query and key (and takes the softmax there)
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2).float() for t in self.project(x))
        y = ctx.attend(self.layer_idx, q, k, v, self.sliding_window, self.scaling)
        return self.out_proj(y.reshape(B, T, nh * hd).to(x.dtype))


class GPTNeoAttention(nn.Module):
    """transformers' wrapper: the attention itself is its `attention` (global or local)."""

    def __init__(self, config: GPTNeoConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.attention_layers[layer_idx]
        self.attention = GPTNeoSelfAttention(config, layer_idx)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.attention(x, ctx)


class GPTNeoBlock(GPT2Block):
    """GPT-2's pre-norm block (ln_1, attn, ln_2, mlp) with GPT-Neo's attention and a Linear MLP."""

    def __init__(self, config: GPTNeoConfig, layer_idx: int):
        nn.Module.__init__(self)
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(h, eps=eps)
        self.attn = GPTNeoAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(h, eps=eps)
        self.mlp = GPTBigCodeMLP(h, config.intermediate_size, config.hidden_act)


class GPTNeoModel(GPT2Model):
    """GPT-2's body (wte, wpe, h, ln_f) of GPT-Neo blocks."""

    def __init__(self, config: GPTNeoConfig):
        eps = config.layer_norm_epsilon
        DecoderModel.__init__(self, config, GPTNeoBlock, nn.LayerNorm(config.hidden_size, eps=eps))
        self.wpe = embedding(config.max_position_embeddings, config.hidden_size)
        self._modules = {"wte": self.wte, "wpe": self.wpe, **self._modules}  # transformers' order (forward's)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        try:
            return super().scale_inputs(x, position_ids)
        except GenerationError as e:
            message = str(e).replace("GPT-2's", "GPT-Neo's").replace("n_positions", "max_position_embeddings")
            raise GenerationError(message) from None


class GPTNeoForCausalLM(GPT2LMHeadModel):
    """transformers' GPTNeoForCausalLM (the LM head tied to wte unless the config unties it); token_type_ids are
    embedded by wte and added to the inputs, as in GPT-2."""

    config_class = GPTNeoConfig
    tp_patterns: ClassVar[dict[str, str]] = {}  # none, as in transformers
    _no_split_modules: ClassVar[list[str]] = ["GPTNeoBlock"]
    # the causal-mask buffers old files carry (transformers makes them itself)
    checkpoint_rules = CheckpointRules([Ignored(r"transformer\.h\.\d+\.attn\.attention\.(bias|masked_bias)")])
    gguf = None  # llama.cpp has no GPT-Neo

    def __init__(self, config: GPTNeoConfig):
        CausalLM.__init__(self, config, GPTNeoModel(config))
