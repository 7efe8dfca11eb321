"""RWKV-4 (RWKV/rwkv-4-169m-pile ... rwkv-raven-14b): every layer (`blocks`) a time-mixing part (`attention`: the
WKV recurrence with a per-channel decay `time_decay` and bonus `time_first`) and a channel-mixing part
(`feed_forward`: squared-ReLU key, sigmoid receptance), each under a LayerNorm (`ln1`, `ln2`) and each mixing its
input with the previous token's (token shift, by `time_mix_*`); block 0 norms the embeddings first (`pre_ln`);
a final LayerNorm `ln_out` (always at epsilon 1e-5, whatever layer_norm_epsilon says, as transformers builds it);
the head `head`, untied by default. No attention and no position embeddings.

Per token t of a layer, the time mixing (w = -exp(time_decay), u = time_first, float32):

    k, v, r = key(mix_k), value(mix_v), sigmoid(receptance(mix_r))    mix_x = x_t * m + x_{t-1} * (1 - m)
    wkv_t = (num + e^(u + k_t) v_t) / (den + e^(u + k_t))             num, den: the decayed sums of e^k v and e^k
    num, den = e^w num + e^k_t v_t, e^w den + e^k_t
    out = output(r * wkv_t)

kept, as transformers' CPU path computes it, in the max-tracking form: num and den scaled by e^-max, `max` the
largest exponent so far (`wkv_step`). The channel mixing: sigmoid(receptance(mix_r)) * value(relu(key(mix_k))^2).

- `rescale_every` (N > 0) at inference (the model not in training mode): transformers divides attention.output's
  and feed_forward.value's weights of block i by 2^(i // N) (in place, at the first forward in eval mode) and
  halves the hidden states after every N-th block; autolm divides those modules' outputs instead (the same
  numbers: a power of two), so its weights stay the checkpoint's in every mode. In training mode neither happens,
  as in transformers. A LoRA adapter on `output` or `value` is divided with its module here, whereas transformers
  divides only the base weight under it (its adapters then count 2^(i // N) times more at inference than in
  training).
- The cache holds no keys or values: each layer's state, transformers' five tensors in its order: (feed-forward's
  last input (B, hidden), time mixing's last input (B, hidden), num, den, max (B, attention_hidden_size),
  float32). No context window: context_length is kept as read (transformers' limit for its CUDA kernel only).
- Padding: transformers ignores attention_mask (its padded rows read the padding tokens). autolm zeroes the
  padding's normed inputs (so the first real token shifts in zeros, as an unpadded row's) and leaves the WKV state
  unchanged at padding: a left-padded row gives its unpadded row's logits (tested against transformers' unpadded
  rows).
- The state_dict and the checkpoint name the head `head` (transformers'); autolm's code reaches it as `lm_head`.

llama.cpp has RWKV-6 and RWKV-7 (rwkv6, rwkv7 and their Qwen2 hybrids) but no RWKV-4: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, Linear, Rename
from .base import CausalLM, DecoderModel
from .mamba import NO_WINDOW

# fields of autolm's common config that RWKV's config.json does not have
NOT_RWKV = ("num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "hidden_act",
            "attention_dropout", "sliding_window", "rope_parameters", "rope_theta", "rope_scaling")  # fmt: skip
NO_STATE = -1e38  # `max` before the first token (transformers' CPU path): e^(max - anything) is 0
OUT_EPS = 1e-5  # ln_out's epsilon (nn.LayerNorm's default in transformers' RwkvModel)


@dataclass(repr=False)
class RwkvConfig(PretrainedConfig):
    """transformers' RwkvConfig and its defaults; attention fields are autolm's placeholders, never written."""

    model_type: ClassVar[str] = "rwkv"
    attribute_map: ClassVar[dict[str, str]] = {"rms_norm_eps": "layer_norm_epsilon"}
    absent_keys: ClassVar[tuple[str, ...]] = ("pad_token_id",)  # written where given

    vocab_size: int = 50277
    context_length: int = 1024
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    attention_hidden_size: int | None = None
    intermediate_size: int | None = None
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    rescale_every: int = 6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = NO_WINDOW

    def __post_init__(self) -> None:
        self.num_attention_heads = self.num_key_value_heads = self.head_dim = 1  # no attention
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        if self.intermediate_size is None and _is_int(self.hidden_size):
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__()

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # no attention, no RoPE

    def validate(self) -> None:
        super().validate()
        a = self.attention_hidden_size
        if not _is_int(a) or not 0 < a <= 1 << 17:
            raise ConfigError(f"{self.source}: attention_hidden_size must be a positive integer, found {a!r}")
        for name in ("rescale_every", "context_length"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"{self.source}: {name} must be an integer, found {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in NOT_RWKV:
            out.pop(key, None)
        return out


def token_shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x (b, t, h) -> each token's predecessor (b, t, h): `last` (b, h), the token before x's first, or zeros."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], 1)


def mixed(x: torch.Tensor, shifted: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """The token shift's interpolation, in transformers' order of operations."""
    return x * mix + shifted * (1 - mix)


def wkv_step(w, u, k, v, state) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One token of the WKV recurrence in float32: w (-exp(time_decay)) and u (time_first) (a,), k and v (b, a),
    state (num, den, max) (b, a) each -> the output (b, a), the state after the token."""
    num, den, mx = state
    top = torch.maximum(mx, k + u)
    e1, e2 = torch.exp(mx - top), torch.exp(k + u - top)
    out = (e1 * num + e2 * v) / (e1 * den + e2)
    top = torch.maximum(mx + w, k)
    e1, e2 = torch.exp(mx + w - top), torch.exp(k - top)
    return out, (e1 * num + e2 * v, e1 * den + e2, top)


def wkv(w, u, k, v, state, real) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The recurrence over t tokens: k, v (b, t, a) float32, state (num, den, max) or None (before the first
    token), real (b, t) (0 at padding, where the state stays) or None -> outputs (b, t, a), the last state."""
    if state is None:
        zeros = k.new_zeros(k.shape[0], k.shape[2])
        state = (zeros, zeros, torch.full_like(zeros, NO_STATE))
    outs = []
    for i in range(k.shape[1]):
        out, new = wkv_step(w, u, k[:, i], v[:, i], state)
        if real is not None:
            keep = real[:, i, None].bool()
            new = tuple(torch.where(keep, a, b) for a, b in zip(new, state))
        outs.append(out)
        state = new
    return torch.stack(outs, 1), state


class RwkvSelfAttention(nn.Module):
    """transformers' RwkvSelfAttention (the time mixing): forward(x, last, state, real, scale) -> (output divided by
    scale, x's last token, the WKV state after x)."""

    def __init__(self, config: Any, layer_id: int):
        super().__init__()
        h, a = config.hidden_size, config.attention_hidden_size
        self.layer_id, self.attention_hidden_size = layer_id, a
        self.time_decay = nn.Parameter(torch.zeros(a))
        self.time_first = nn.Parameter(torch.zeros(a))
        self.time_mix_key = nn.Parameter(torch.zeros(1, 1, h))
        self.time_mix_value = nn.Parameter(torch.zeros(1, 1, h))
        self.time_mix_receptance = nn.Parameter(torch.zeros(1, 1, h))
        self.key = Linear(h, a, bias=False)
        self.value = Linear(h, a, bias=False)
        self.receptance = Linear(h, a, bias=False)
        self.output = Linear(a, h, bias=False)

    def forward(self, x, last, state, real, scale: float = 1.0):
        shifted = token_shift(x, last)
        k = self.key(mixed(x, shifted, self.time_mix_key)).float()
        v = self.value(mixed(x, shifted, self.time_mix_value)).float()
        r = torch.sigmoid(self.receptance(mixed(x, shifted, self.time_mix_receptance)))
        w, u = -torch.exp(self.time_decay.float()), self.time_first.float()
        out, state = wkv(w, u, k, v, state, real)
        return self.output(r * out.to(r.dtype)) / scale, x[:, -1], state


class RwkvFeedForward(nn.Module):
    """transformers' RwkvFeedForward (the channel mixing): forward(x, last, scale) -> (output, value's part divided
    by scale; x's last token)."""

    def __init__(self, config: Any, layer_id: int):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.layer_id = layer_id
        self.time_mix_key = nn.Parameter(torch.zeros(1, 1, h))
        self.time_mix_receptance = nn.Parameter(torch.zeros(1, 1, h))
        self.key = Linear(h, i, bias=False)
        self.receptance = Linear(h, h, bias=False)
        self.value = Linear(i, h, bias=False)

    def forward(self, x, last, scale: float = 1.0):
        shifted = token_shift(x, last)
        key = torch.square(torch.relu(self.key(mixed(x, shifted, self.time_mix_key))))
        r = torch.sigmoid(self.receptance(mixed(x, shifted, self.time_mix_receptance)))
        return r * (self.value(key) / scale), x[:, -1]


class RwkvBlock(nn.Module):
    """x (+ pre_ln in block 0) + time mixing(ln1(x)) + channel mixing(ln2(.)); the five state tensors in the
    cache; rescale_every's division at inference."""

    def __init__(self, config: Any, layer_id: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.layer_id, self.rescale_every = layer_id, config.rescale_every
        if layer_id == 0:
            self.pre_ln = nn.LayerNorm(h, eps=eps)
        self.ln1 = nn.LayerNorm(h, eps=eps)
        self.ln2 = nn.LayerNorm(h, eps=eps)
        self.attention = RwkvSelfAttention(config, layer_id)
        self.feed_forward = RwkvFeedForward(config, layer_id)

    def rescaled(self) -> bool:
        return self.rescale_every > 0 and not self.training

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.layer_id == 0:
            x = self.pre_ln(x)
        real = ctx.real_tokens()  # (b, t) or None
        zero = (lambda y: y) if real is None else (lambda y: y * real[..., None].to(y.dtype))
        state = ctx.state(self.layer_id)
        ffn_x, att_x, wkv_state = (None, None, None) if state is None else (state[0], state[1], state[2:])
        scale = float(2 ** (self.layer_id // self.rescale_every)) if self.rescaled() else 1.0
        attention, att_x, wkv_state = self.attention(zero(self.ln1(x)), att_x, wkv_state, real, scale)
        x = x + attention
        feed_forward, ffn_x = self.feed_forward(zero(self.ln2(x)), ffn_x, scale)
        x = x + feed_forward
        ctx.keep_state(self.layer_id, (ffn_x, att_x, *wkv_state))
        if self.rescaled() and (self.layer_id + 1) % self.rescale_every == 0:
            x = x / 2
        return x


class RwkvModel(DecoderModel):
    """embeddings, blocks, ln_out (autolm's embed_tokens, layers, norm)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "embeddings", "layers": "blocks", "norm": "ln_out"}

    def __init__(self, config: Any):
        super().__init__(config, RwkvBlock, nn.LayerNorm(config.hidden_size, eps=OUT_EPS))

    def run(self, x, ctx, hidden_states: list | None = None) -> torch.Tensor:
        """DecoderModel.run, with transformers' hidden_states where asked: each block's output (after its
        rescaling), then ln_out's."""
        if hidden_states is None:
            return super().run(x, ctx)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
            hidden_states.append(x)
        x = self.final_norm(x)
        hidden_states.append(x)
        return x


def _transformers_names(module, state_dict, prefix: str, local_metadata) -> None:
    """state_dict's post-hook: the head as `head` (transformers'), except under autolm's own names."""
    if module.__dict__.get("_own_names"):
        return
    for key in [k for k in state_dict if k.startswith(prefix + "lm_head.")]:
        state_dict[prefix + "head." + key[len(prefix + "lm_head.") :]] = state_dict.pop(key)


def _autolm_names(module, state_dict, prefix: str, *args) -> None:
    """load_state_dict's pre-hook: transformers' `head` back to autolm's `lm_head`."""
    for key in [k for k in state_dict if k.startswith(prefix + "head.")]:
        state_dict[prefix + "lm_head." + key[len(prefix + "head.") :]] = state_dict.pop(key)


class RwkvForCausalLM(CausalLM):
    """transformers' RwkvForCausalLM."""

    config_class = RwkvConfig
    recurrent: ClassVar[bool] = True  # each block's five state tensors
    base_model_prefix = "rwkv"
    layers_prefix = "rwkv.blocks"
    embeddings_name = "rwkv.embeddings"
    checkpoint_rules = CheckpointRules([Rename(r"^head\.", "lm_head.", r"^lm_head\.", "head.")])
    tp_patterns: ClassVar[dict[str, str]] = {}  # no attention heads to split: every rank runs the whole
    _no_split_modules: ClassVar[list[str]] = ["RwkvBlock"]

    def __init__(self, config: Any):
        super().__init__(config, RwkvModel(config))
        self.register_state_dict_post_hook(_transformers_names)
        self.register_load_state_dict_pre_hook(_autolm_names)

    @property
    def model(self) -> RwkvModel:
        """The body (`rwkv`), by the name autolm's code uses in every family."""
        return self.rwkv
