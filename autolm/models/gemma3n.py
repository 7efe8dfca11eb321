"""Gemma 3n's text model (model_type gemma3n_text; gemma3n: the image-audio-text checkpoints' language model).
Gemma 3's sliding / full layers (every 5th full by default, each type with its own RoPE base) with Gemma 4's
small-model pieces (gemma4_small.py: per-layer input embeddings, KV sharing over the last num_kv_shared_layers
layers) and:

- norms are RMSNorm times w in fp32 (not 1 + w); q/k norms per head, a weightless v norm, scores unscaled;
- AltUp: the layers carry altup_num_inputs streams, (n, B, T, h). The body makes streams 1.. from the scaled token
  embeddings by altup_projections, each rescaled to the embeddings' RMS; a layer first predicts every stream as
  a mix of all (prediction_coefs, weighted by tanh of modality_router over the normed, 1/h-scaled active stream
  altup_active_idx), runs attention and MLP on the active prediction, then corrects every stream by the
  innovation (output - active prediction) times 1 + correction_coefs (routed the same way from the output).
  The active corrected stream (times correct_output_scale with altup_correct_scale) drives the per-layer input
  gate, whose projection is added to streams 1... At the end altup_unembed_projections map streams 1.. back
  (rescaled to stream 0's RMS) and the mean of all streams is normed. Training clamps the coefficients at
  altup_coef_clip;
- Laurel: a low-rank residual (linear_left, linear_right, post_laurel_norm) of the normed active stream; the
  attention output (plus the stream) and it are summed and divided by sqrt(2) before the MLP;
- activation sparsity (activation_sparsity_pattern, one value s per layer, the first 10 of more than 10 layers at
  0.95 by default): the gate's values below mean + std * Phi^-1(s) (over the features) are cut (relu(g - cut));
- intermediate_size may be one per layer; final soft-capping at final_logit_softcapping (30 by default);
- per-layer input embeddings read token ids beyond vocab_size_per_layer_input as id 0, as transformers does.
GGUF in and out as llama.cpp's Gemma3NModel converter writes the family: gemma3n_gguf.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError, GenerationError
from ..nn import CheckpointRules, GatedMLP, Ignored, Linear, Rename
from . import gemma3n_gguf as gguf_io
from . import gemma4_small as small
from .base import DecoderModel
from .gemma2 import Gemma2ForCausalLM, Gemma2Model, takes_hidden_activation
from .gemma3 import Gemma3TextConfig
from .gemma4 import Gemma4TextAttention, _norm
from .image_text import TextFirstConfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@takes_hidden_activation
@dataclass(repr=False)
class Gemma3nTextConfig(Gemma3TextConfig):
    """transformers' Gemma3nTextConfig (its field names and defaults): intermediate_size and
    activation_sparsity_pattern one value per layer (an intermediate_size number given for all)."""

    model_type: ClassVar[str] = "gemma3n_text"
    bool_fields: ClassVar[tuple[str, ...]] = (*Gemma3TextConfig.bool_fields, "altup_correct_scale")
    absent_keys: ClassVar[tuple[str, ...]] = ("query_pre_attn_scalar", "attn_logit_softcapping",
                                              "use_bidirectional_attention")  # fmt: skip
    attention_k_eq_v: ClassVar[bool] = False  # Gemma 4's option, which Gemma 3n's attention does not have

    vocab_size: int = 262_400
    hidden_size: int = 2048
    intermediate_size: Any = 16_384
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 2
    max_position_embeddings: int = 32_768
    sliding_window: int | None = 512
    final_logit_softcapping: float | None = 30.0
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    altup_num_inputs: int = 4
    num_kv_shared_layers: int = 15
    laurel_rank: int = 64
    activation_sparsity_pattern: Any = None

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if _is_int(n) and n > 0:
            if _is_int(self.intermediate_size):
                self.intermediate_size = [self.intermediate_size] * n
            if self.activation_sparsity_pattern is None:
                sparse = 10 if n > 10 else 0
                self.activation_sparsity_pattern = [0.95] * sparse + [0.0] * (n - sparse)
        super().__post_init__()

    def default_pattern(self) -> int:
        return 5  # every 5th layer full

    def layer_head_dim(self, i: int) -> int:
        return self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.num_key_value_heads

    def validate(self) -> None:
        src, n, sizes = self.source, self.num_hidden_layers, self.intermediate_size
        _require(isinstance(sizes, list) and len(sizes) == n and all(_is_int(s) and 0 < s <= 1 << 19 for s in sizes),
                 f"{src}: intermediate_size must be a positive integer or a list of one per layer "
                 f"({n} entries), found {str(sizes)[:100]}")  # fmt: skip
        self.intermediate_size = max(sizes)
        try:
            super().validate()
        finally:
            self.intermediate_size = sizes
        pattern = self.activation_sparsity_pattern
        _require(isinstance(pattern, list) and len(pattern) == n and all(_is_number(s) and 0 <= s < 1 for s in pattern),
                 f"{src}: activation_sparsity_pattern must list {n} numbers in [0, 1), found "
                 f"{str(pattern)[:100]}")  # fmt: skip
        for name in ("altup_num_inputs", "laurel_rank", "hidden_size_per_layer_input"):
            v = getattr(self, name)
            _require(
                _is_int(v) and 0 < v <= 1 << 14, f"{src}: {name} must be a positive integer, found {v!r}"
            )
        k = self.altup_active_idx
        _require(_is_int(k) and 0 <= k < self.altup_num_inputs, f"{src}: altup_active_idx must be an integer "
                 f"from 0 to altup_num_inputs - 1 ({self.altup_num_inputs - 1}), found {k!r}")  # fmt: skip
        clip = self.altup_coef_clip
        _require(clip is None or (_is_number(clip) and clip > 0),
                 f"{src}: altup_coef_clip must be a positive number or null, found {clip!r}")  # fmt: skip
        small.validate_small(self)

    gguf_not_compared: ClassVar[tuple[str, ...]] = gguf_io.NOT_COMPARED
    gguf_compared = gguf_io.compared


class Gemma3nConfig(TextFirstConfig):
    """transformers' Gemma3nConfig (the image-audio-text checkpoints), read as Gemma 4's: its language model's
    text_config (tie_word_embeddings and dtype from the outer config where it leaves them out), the vision and audio
    towers skipped at load, saved as the text model; logits soft-capped as the text model's."""

    model_type: ClassVar[str] = "gemma3n"
    text_class: ClassVar[type] = Gemma3nTextConfig


class SparseGatedMLP(GatedMLP):
    """The gated MLP with activation sparsity: gate values under mean + std * Phi^-1(sparsity) cut to 0."""

    def __init__(self, hidden: int, intermediate: int, act: str, sparsity: float):
        super().__init__(hidden, intermediate, act)
        self.activation_sparsity = float(sparsity)

    def _gaussian_topk(self, g: torch.Tensor) -> torch.Tensor:
        target = torch.tensor(self.activation_sparsity, dtype=torch.float32, device=g.device)
        std_multiplier = torch.distributions.normal.Normal(0, 1).icdf(target).to(g.dtype)
        cut = g.mean(-1, keepdim=True) + g.std(-1, keepdim=True, unbiased=False) * std_multiplier
        return torch.relu(g - cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.activation_sparsity:
            return super().forward(x)
        gate = self._gaussian_topk(self.gate_proj(x))
        return self.down_proj(self.act_fn(gate) * self.up_proj(x))


class Gemma3nTextAltUp(nn.Module):
    """transformers' Gemma3nTextAltUp: predict / correct over the n streams (the module docstring)."""

    def __init__(self, config: Any):
        super().__init__()
        n, h = config.altup_num_inputs, config.hidden_size
        self.n, self.active, self.clip = n, config.altup_active_idx, config.altup_coef_clip
        self.correct_output_scale = nn.Parameter(torch.zeros(h))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(h, n, bias=False)
        self.router_norm = _norm(config)(h)
        self.router_input_scale = h**-1.0

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.router_input_scale, dtype=x.dtype, device=x.device)
        return torch.tanh(self.modality_router(self.router_norm(x) * scale).float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        m = self.modalities(streams[self.active])
        if self.training and self.clip is not None:
            self.prediction_coefs.weight.data.clamp_(-self.clip, self.clip)
        coefs = self.prediction_coefs(m).reshape(*m.shape[:-1], self.n, self.n).permute(0, 1, 3, 2)
        out = torch.matmul(streams.permute(1, 2, 3, 0), coefs).permute(3, 0, 1, 2)
        return (out + streams).contiguous().type_as(streams)

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        m = self.modalities(activated)
        innovation = (activated - predictions[self.active]).repeat(self.n, 1, 1, 1)
        if self.training and self.clip is not None:
            coefs = nn.functional.linear(m, self.correction_coefs.weight.clamp(-self.clip, self.clip))
        else:
            coefs = self.correction_coefs(m)
        coefs = (coefs + 1.0).permute(2, 0, 1).unsqueeze(-1)
        return (innovation * coefs + predictions).contiguous().type_as(activated)

    def forward(self, corrected: torch.Tensor) -> torch.Tensor:
        """The active corrected stream times correct_output_scale."""
        return (corrected.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(corrected)


class Gemma3nTextLaurelBlock(nn.Module):
    """x + post_laurel_norm(linear_right(linear_left(x)))."""

    def __init__(self, config: Any):
        super().__init__()
        h, r = config.hidden_size, config.laurel_rank
        self.linear_left = Linear(h, r, bias=False)
        self.linear_right = Linear(r, h, bias=False)
        self.post_laurel_norm = _norm(config)(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class Gemma3nTextDecoderLayer(nn.Module):
    """One layer over the AltUp streams (n, B, T, h): the module docstring."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, norm = config.hidden_size, _norm(config)
        self.self_attn = Gemma4TextAttention(config, layer_idx)
        self.mlp = SparseGatedMLP(h, config.intermediate_size[layer_idx], config.hidden_act,
                                  config.activation_sparsity_pattern[layer_idx])  # fmt: skip
        self.input_layernorm = norm(h)
        self.post_attention_layernorm = norm(h)
        self.pre_feedforward_layernorm = norm(h)
        self.post_feedforward_layernorm = norm(h)
        self.altup = Gemma3nTextAltUp(config)
        self.laurel = Gemma3nTextLaurelBlock(config)
        small.add_per_layer_input(self, config, norm)
        self.active, self.correct_scale = config.altup_active_idx, config.altup_correct_scale

    def forward(
        self, streams: torch.Tensor, ctx, per_layer_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (
            streams.dim() != 4 or per_layer_input is None
        ):  # a layer run on its own (a compiled one-token graph)
            raise GenerationError("a Gemma 3n layer runs on its model's AltUp streams and per-layer inputs")
        predictions = self.altup.predict(streams)
        active = predictions[self.active]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        attn = self.post_attention_layernorm(self.self_attn(normed, ctx))
        x = (active + attn + laurel) / math.sqrt(2)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        corrected = self.altup.correct(predictions, x)
        first = corrected[self.active]
        if self.correct_scale:
            first = self.altup(first)
        gated = self.post_per_layer_input_norm(
            self.per_layer_projection(self.act_fn(self.per_layer_input_gate(first)) * per_layer_input)
        )
        return torch.cat((corrected[:1], corrected[1:] + gated), dim=0)


class AltUpProjections(nn.ModuleList):
    """transformers' altup_projections / altup_unembed_projections (a list of h x h maps for streams 1..), called
    as one module (so that placement hooks see it): each output at the RMS `target` (per token)."""

    def forward(self, xs: list[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for p, x in zip(self, xs):
            y = p(x).to(dtype=x.dtype, device=target.device)
            out.append(y * target / torch.sqrt(torch.mean(y**2, dim=-1, keepdim=True).clamp(min=1e-5)))
        return out


class Gemma3nTextModel(small.PerLayerInputs, Gemma2Model):
    """Gemma 2's scaled embeddings; Gemma 3n's layers over AltUp streams, per-layer inputs, final norm."""

    def __init__(self, config: Any):
        DecoderModel.__init__(self, config, Gemma3nTextDecoderLayer, _norm(config)(config.hidden_size))
        self.add_per_layer_modules(config, _norm(config))
        self.embed_scale = config.hidden_size**0.5
        h, n = config.hidden_size, config.altup_num_inputs
        self.altup_projections = AltUpProjections(Linear(h, h, bias=False) for _ in range(1, n))
        self.altup_unembed_projections = AltUpProjections(Linear(h, h, bias=False) for _ in range(1, n))
        self.pad_token_id = config.pad_token_id

    def per_layer_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids beyond the per-layer vocabulary read row 0 (transformers' get_per_layer_inputs); the padding id's
        row gets no gradient (transformers' padding_idx)."""
        inside = (input_ids >= 0) & (input_ids < self.config.vocab_size_per_layer_input)
        ids = torch.where(inside, input_ids, 0)
        t = super().per_layer_tokens(ids)
        if self.pad_token_id is None or not torch.is_grad_enabled():
            return t
        return torch.where((ids == self.pad_token_id).unsqueeze(-1), t.detach(), t)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Input vectors (B, T, h) -> the AltUp streams (n, B, T, h)."""
        target = torch.mean(x**2, dim=-1, keepdim=True) ** 0.5
        n = len(self.altup_projections)
        return torch.stack([x, *self.altup_projections([x] * n, target)], dim=0)

    def collapse(self, streams: torch.Tensor) -> torch.Tensor:
        """The streams -> their mean, streams 1.. mapped back first (B, T, h)."""
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        back = self.altup_unembed_projections(list(streams[1:]), target)
        return torch.mean(torch.stack([streams[0], *back]), dim=0)

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        """The layers over the AltUp streams, each given its per-layer input; the mean of the streams normed.
        `hidden_states` gets each layer's input streams (n, B, T, h) and the last layer's, as transformers'."""
        x, per_layer = self.layer_inputs(x)
        streams = self.expand(x)
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(streams)
            extra = per_layer[:, :, i]
            if self.gradient_checkpointing and self.training:
                streams = torch.utils.checkpoint.checkpoint(layer, streams, ctx, extra, use_reentrant=False)
            else:
                streams = layer(streams, ctx, extra)
        if hidden_states is not None:  # as transformers: the last layer's streams, not the normed output
            hidden_states.append(streams)
        return self.final_norm(self.collapse(streams))


class Gemma3nForCausalLM(small.SmallCausalLM, Gemma2ForCausalLM):
    """transformers' Gemma3nForCausalLM (the text model; model_type gemma3n_text). The KV-shared layers hold no
    cache of their own; the one-token step runs eagerly (no compiled graphs: per-layer inputs, AltUp streams)."""

    config_class = Gemma3nTextConfig
    # the image-audio-text checkpoints (Gemma3nConfig): their language model's tensors, saved as the text model's
    checkpoint_rules = CheckpointRules([Rename(r"^model\.language_model\.", "model.", r"(?!)", ""),
                                        Ignored(r"(model\.)?(vision_tower|audio_tower|embed_vision|embed_audio)\..+")])  # fmt: skip
    gguf = gguf_io.LAYOUT
    _no_split_modules: ClassVar[list[str]] = ["Gemma3nTextDecoderLayer"]

    def __init__(self, config: Any):
        Gemma2ForCausalLM.__init__(self, config, Gemma3nTextModel(config))
        self.checkpoint_rules = gguf_io.with_rules(self.rules_for(config), config)

    @property
    def compiled_graphs(self) -> bool:
        return False
