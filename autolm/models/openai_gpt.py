"""OpenAI GPT (GPT-1, openai-community/openai-gpt; model_type "openai-gpt"): learned position embeddings,
post-norm blocks (each residual sum normed: ln_1 after attention, ln_2 after the MLP; no final norm), multi-head
attention whose q/k/v are one fused `c_attn`, an MLP c_fc -> afn -> c_proj, every projection a transformers
`Conv1D` (weight stored (in, out), as GPT-2's), and a head tied to the token embeddings.

`afn` picks the activation by transformers' ACT_FNS: "gelu" is GPT's tanh approximation (gelu_new), "relu",
"silu" and "swish" (silu). transformers' names: the body is `transformer` (tokens_embed, positions_embed, h),
which autolm's code reaches as `model`, its parts as `embed_tokens` and `layers`. transformers keeps no KV cache
for GPT-1 (it recomputes the sequence each step); autolm's cache gives the same tokens. Dropouts and the
`summary_*` fields (the double-heads model's) change no inference and are kept as given. llama.cpp has no GPT-1:
no GGUF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig
from ..errors import ConfigError, GenerationError
from ..nn import Attention, CheckpointRules, Ignored, Rename, embedding
from .base import CausalLM, DecoderModel
from .gpt2 import _NOT_GPT2, GPT2MLP, GPT2Attention, TokenTypeEmbeddings
from .xglm import accept_json_names, check_fractions

# transformers' ACT_FNS for GPT-1: afn -> autolm's activation ("gelu" is the tanh approximation)
AFN = {"relu": "relu", "silu": "silu", "gelu": "gelu_new", "swish": "silu"}


@dataclass(repr=False)
class OpenAIGPTConfig(PretrainedConfig):
    """transformers' OpenAIGPTConfig: config.json keeps GPT-1's names (n_embd, n_layer, n_head, n_positions, afn,
    layer_norm_epsilon, attn_pdrop), which are also attributes and keyword arguments, as in transformers. The MLP
    is 4 * n_embd wide (no field for it)."""

    model_type: ClassVar[str] = "openai-gpt"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "rms_norm_eps": "layer_norm_epsilon",
        "hidden_act": "afn",
        "attention_dropout": "attn_pdrop",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(AFN)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "summary_use_proj",
        "summary_proj_to_labels",
    )
    absent_keys: ClassVar[tuple[str, ...]] = (
        "use_cache",
    )  # transformers' config has none: written when false

    vocab_size: int = 40478
    max_position_embeddings: int = 512
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "gelu"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attention_dropout: float = 0.1
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    summary_type: str = "cls_index"
    summary_use_proj: bool = True
    summary_activation: str | None = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        h = self.hidden_size
        self.intermediate_size = 4 * h if isinstance(h, int) and not isinstance(h, bool) else h
        self.num_key_value_heads = self.head_dim = None  # derived from n_head and n_embd
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = "|".join(self.attribute_map)
            raise ConfigError(re.sub(rf"\b({names})\b", lambda m: self.attribute_map[m[1]], str(e))) from None

    def validate(self) -> None:
        super().validate()
        check_fractions(self, ("resid_pdrop", "embd_pdrop", "summary_first_dropout"))

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned position embeddings, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_GPT2:
            out.pop(key, None)
        return out


accept_json_names(OpenAIGPTConfig)


class OpenAIGPTAttention(GPT2Attention):
    """GPT-2's attention (c_attn packing q, k, v; c_proj), always scaled by 1 / sqrt(head_dim)."""

    def __init__(self, config: OpenAIGPTConfig, layer_idx: int):
        h, n = config.hidden_size, config.num_attention_heads
        Attention.__init__(self, h, n, n, config.head_dim, layer_idx, bias=True, rope=None)


class OpenAIGPTBlock(nn.Module):
    """Post-norm: ln_1(x + attn(x)), then ln_2(that + mlp(that)). transformers' module order: attn, ln_1, mlp,
    ln_2."""

    def __init__(self, config: OpenAIGPTConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.attn = OpenAIGPTAttention(config, layer_idx)
        self.ln_1 = nn.LayerNorm(h, eps=eps)
        self.mlp = GPT2MLP(h, config.intermediate_size, AFN[config.hidden_act])
        self.ln_2 = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, ctx))
        return self.ln_2(x + self.mlp(x))


def learned_positions(table: nn.Embedding, position_ids: torch.Tensor, family: str) -> torch.Tensor:
    """The rows of a learned position table for positions (B, T); a position past the table is a clear error."""
    n = table.num_embeddings
    if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
        raise GenerationError(
            f"position {int(position_ids.max())} is past {family}'s {n} positions (n_positions): "
            "shorten the prompt or max_new_tokens"
        )
    return table(position_ids)


class OpenAIGPTModel(DecoderModel):
    """tokens_embed, positions_embed, h (no final norm); `embed_tokens` and `layers` name tokens_embed and h
    (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "tokens_embed", "layers": "h"}

    def __init__(self, config: OpenAIGPTConfig):
        super().__init__(config, OpenAIGPTBlock, None)
        self.positions_embed = embedding(config.max_position_embeddings, config.hidden_size)
        self._modules = {"tokens_embed": self.tokens_embed, "positions_embed": self.positions_embed,
                         **self._modules}  # fmt: skip

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input vectors plus the learned embeddings of their positions (B, T): the padding mask's positions."""
        return x + learned_positions(self.positions_embed, position_ids, "GPT")

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x  # post-norm blocks: the last block's output is normed already


class OpenAIGPTLMHeadModel(TokenTypeEmbeddings, CausalLM):
    """transformers' OpenAIGPTLMHeadModel: the head tied to tokens_embed unless the config unties it."""

    config_class = OpenAIGPTConfig
    base_model_prefix = "transformer"
    layers_prefix = "transformer.h"
    embeddings_name = "transformer.tokens_embed"
    tp_patterns: ClassVar[dict[str, str]] = {}  # none, as in transformers: c_attn packs q/k/v of all heads
    _no_split_modules: ClassVar[list[str]] = ["OpenAIGPTBlock"]
    checkpoint_rules = CheckpointRules(
        [
            # files of the bare model name the body's tensors without "transformer."; saved with it
            Rename(r"^(?=(tokens_embed|positions_embed|h)\.)", "transformer.", r"(?!)", ""),
            Ignored(r"transformer\.h\.\d+\.attn\.bias"),  # causal-mask buffers of old files
            Ignored(r"transformer\.position_ids"),
        ]
    )

    def __init__(self, config: OpenAIGPTConfig):
        super().__init__(config, OpenAIGPTModel(config))

    @property
    def model(self) -> OpenAIGPTModel:
        """The body (`transformer`), by the name autolm's code uses in every family."""
        return self.transformer
