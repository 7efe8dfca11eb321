"""BioGPT (microsoft/biogpt, BioGPT-Large): fairseq's decoder as XGLM's, with learned position embeddings read two
rows past each position (fairseq's padding offset) instead of sinusoids. Token embeddings times sqrt(hidden_size)
(`scale_embedding`), OPT's pre-norm layer (LayerNorms with bias at PyTorch's epsilon 1e-5: transformers does not
read config.json's layer_norm_eps, 1e-12, and neither does autolm), q/k/v/out_proj with biases, a GELU MLP
fc1 -> fc2, a final LayerNorm (`biogpt.layer_norm`) and a head tied to the embeddings.

transformers' names: the body is `biogpt`, which autolm's code reaches as `model`; the head is `output_projection`
in transformers and its checkpoints, `lm_head` in autolm's model (renamed while loading and back while saving, as
GPT-NeoX's embed_out was). Dropouts and layerdrop change no inference and are kept as given. llama.cpp has no
BioGPT: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import PretrainedConfig, _is_number
from ..errors import ConfigError, GenerationError
from ..nn import ACTIVATIONS, CheckpointRules, Rename, embedding
from .base import CausalLM
from .opt import OPTDecoderLayer
from .xglm import NOT_WRITTEN, XGLMModel, check_fractions

_OFFSET = 2  # fairseq's position rows start at 2 (rows 0 and 1 were its padding)


@dataclass(repr=False)
class BioGptConfig(PretrainedConfig):
    """transformers' BioGptConfig. layer_norm_eps (1e-12) is kept as config.json gives it and, as in
    transformers, not used: the LayerNorms use PyTorch's default epsilon."""

    model_type: ClassVar[str] = "biogpt"
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "scale_embedding")
    # not in transformers' config: written when set (BioGPT's attention dropout is attention_probs_dropout_prob)
    absent_keys: ClassVar[tuple[str, ...]] = ("attention_dropout",)
    # OPT's layer as BioGPT has it: pre-norm, biases everywhere, LayerNorms with weight and bias
    do_layer_norm_before: ClassVar[bool] = True
    enable_bias: ClassVar[bool] = True
    layer_norm_elementwise_affine: ClassVar[bool] = True

    vocab_size: int = 42384
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-12
    rms_norm_eps: float = 1e-5  # the epsilon the LayerNorms use: nn.LayerNorm's default (not written)
    scale_embedding: bool = True
    layerdrop: float = 0.0
    activation_dropout: float = 0.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.head_dim = None  # derived from num_attention_heads and hidden_size
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        eps = self.layer_norm_eps
        if not (_is_number(eps) and 0 < eps < 1):
            raise ConfigError(
                f"{self.source}: layer_norm_eps must be a positive number below 1, found {eps!r}"
            )
        check_fractions(self, ("hidden_dropout_prob", "attention_probs_dropout_prob", "layerdrop",
                               "activation_dropout"))  # fmt: skip

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned position embeddings, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in NOT_WRITTEN:
            out.pop(key, None)
        return out


class BioGptDecoderLayer(OPTDecoderLayer):
    """OPT's pre-norm layer: self_attn_layer_norm, self_attn (out_proj), final_layer_norm, fc1 -> act -> fc2."""


class BioGptModel(XGLMModel):
    """XGLM's body (scaled embeddings, `layer_norm` as the final norm) with learned positions: embed_tokens,
    embed_positions (max_position_embeddings + 2 rows), layers, layer_norm."""

    def __init__(self, config: BioGptConfig):
        super().__init__(config, BioGptDecoderLayer)
        self.embed_positions = embedding(config.max_position_embeddings + _OFFSET, config.hidden_size)
        order = ("embed_tokens", "embed_positions", "layers", "layer_norm")
        self._modules = {k: self._modules[k] for k in order}  # forward's order

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input vectors plus the learned embeddings of their positions (B, T) (the padding mask's positions),
        read 2 rows on."""
        n = self.embed_positions.num_embeddings - _OFFSET
        if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
            raise GenerationError(
                f"position {int(position_ids.max())} is past BioGPT's {n} learned positions "
                "(max_position_embeddings): shorten the prompt or max_new_tokens"
            )
        return x + self.embed_positions(position_ids + _OFFSET)


class BioGptForCausalLM(CausalLM):
    """transformers' BioGptForCausalLM: the body `biogpt`, the head (`output_projection` on disk) tied to
    embed_tokens unless the config unties it."""

    config_class = BioGptConfig
    base_model_prefix = "biogpt"
    layers_prefix = "biogpt.layers"
    embeddings_name = "biogpt.embed_tokens"
    tp_patterns: ClassVar[
        dict[str, str]
    ] = {}  # none: transformers declares no tensor-parallel plan for BioGPT
    _no_split_modules: ClassVar[list[str]] = ["BioGptDecoderLayer"]
    checkpoint_rules = CheckpointRules(
        [Rename(r"^output_projection\.", "lm_head.", r"^lm_head\.", "output_projection.")]
    )

    def __init__(self, config: BioGptConfig):
        super().__init__(config, BioGptModel(config))

    @property
    def model(self) -> BioGptModel:
        """The body (`biogpt`), by the name autolm's code uses in every family."""
        return self.biogpt
