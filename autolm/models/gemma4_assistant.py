"""Gemma 4's assistant (model_type gemma4_assistant, transformers' Gemma4AssistantForCausalLM): a small drafter for
speculative decoding that reads its target's state instead of the tokens alone. One drafting step:

- its input is the target's (scaled) embedding of the newest token beside the target's last hidden state (the
  final norm's output at the token before it), `pre_projection` (2 * backbone_hidden_size -> hidden_size);
- Gemma 4's decoder layers (gemma4.py's), every one KV-shared: each attends with its own queries over the keys
  and values the target kept for its attention type (`shared_kv_states`: the target's last non-shared layer of
  each type), never computing any; masks as transformers builds them (bidirectional over the target's keys, the
  sliding layers' window over its last window + 1 keys, see `shared_masks`);
- the final norm's output gives the logits through the head tied to the embeddings (no soft-capping), or,
  with `use_ordered_embeddings`, through the centroid-masked head (`Gemma4AssistantMaskedEmbedder`), and
  `post_projection` of it is the hidden state the next drafting step reads (the output's last_hidden_state).

The drafter runs at one position (the newest token's) for every token it drafts; generate(assistant_model=...)
drives it through autolm.generation.target_draft. config.json nests the layers' settings as text_config (a
gemma4_text config whose num_kv_shared_layers defaults to num_hidden_layers); the config class reads it flat.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import _is_int
from ..errors import ConfigError, GenerationError
from ..nn import Linear
from .base import CausalLM
from .gemma2 import takes_hidden_activation
from .gemma4 import Gemma4TextConfig, Gemma4TextModel, _takes_per_layer_keys
from .output import ModelOutput

_OUTER = ("backbone_hidden_size", "use_ordered_embeddings", "num_centroids", "centroid_intermediate_top_k")
_MUST_BE = (  # transformers' validate_architecture: what an assistant's text_config must say
    ("hidden_size_per_layer_input", 0),
    ("enable_moe_block", False),
    ("use_double_wide_mlp", False),
    ("vocab_size_per_layer_input", 0),
)


@_takes_per_layer_keys
@takes_hidden_activation
@dataclass(repr=False)
class Gemma4AssistantConfig(Gemma4TextConfig):
    """transformers' Gemma4AssistantConfig, read flat: text_config's fields (Gemma4TextConfig's names and
    defaults) beside the assistant's own; config.json written nested again."""

    model_type: ClassVar[str] = "gemma4_assistant"
    text_model_type: ClassVar[str] = "gemma4_text"
    bool_fields: ClassVar[tuple[str, ...]] = (*Gemma4TextConfig.bool_fields, "use_ordered_embeddings")
    must_be: ClassVar[tuple[tuple[str, Any], ...]] = _MUST_BE  # what its text_config must say

    tie_word_embeddings: bool = True
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    wrapper_extra: dict[str, Any] = field(default_factory=dict)  # the outer config.json's keys autolm keeps

    def __post_init__(self) -> None:
        if not self.num_kv_shared_layers:  # as transformers: every layer reads the target's keys and values
            self.num_kv_shared_layers = self.num_hidden_layers
        super().__post_init__()

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], source: str = "config.json", **overrides: Any
    ) -> Gemma4AssistantConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
        text = d.get("text_config")
        if not isinstance(text, dict | None):
            raise ConfigError(f"{source}: text_config must be an object (the assistant's Gemma 4 layers' "
                              f"settings), found {str(text)[:100]}")  # fmt: skip
        flat = {k: v for k, v in (text or {}).items() if k != "model_type"}
        outer = {k: v for k, v in d.items() if k not in ("text_config", "model_type")}
        for key in (*_OUTER, "architectures"):
            if key in outer:
                flat[key] = outer.pop(key)
        flat["tie_word_embeddings"] = outer.pop(
            "tie_word_embeddings", True
        )  # the outer config's ties the head
        for key in ("dtype", "torch_dtype"):
            if key in outer:
                flat.setdefault(key, outer.pop(key))
        return super().from_dict({**flat, "wrapper_extra": outer}, source, **overrides)

    def to_dict(self) -> dict[str, Any]:
        text = super().to_dict()
        outer = {**text.pop("wrapper_extra"), **{k: text.pop(k) for k in _OUTER}}
        outer["tie_word_embeddings"] = text["tie_word_embeddings"]
        for key in ("architectures", "dtype"):
            if key in text:
                outer[key] = text.pop(key) if key == "architectures" else text[key]
        text["model_type"] = self.text_model_type
        return {**outer, "model_type": self.model_type, "text_config": text}

    def _validate_gemma4(self) -> None:
        src = self.source
        for name, value in self.must_be:
            if getattr(self, name) != value:
                raise ConfigError(f"{src}: text_config.{name} must be {value!r} in a Gemma 4 assistant, found "
                                  f"{getattr(self, name)!r}")  # fmt: skip
        if self.num_kv_shared_layers != self.num_hidden_layers:
            raise ConfigError(f"{src}: text_config.num_kv_shared_layers must be num_hidden_layers "
                              f"({self.num_hidden_layers}): every layer of an assistant reads the target's keys "
                              f"and values, found {self.num_kv_shared_layers!r}")  # fmt: skip
        for name in ("backbone_hidden_size", "num_centroids", "centroid_intermediate_top_k"):
            value = getattr(self, name)
            if not (_is_int(value) and value > 0):
                raise ConfigError(f"{src}: {name} must be a positive integer, found {value!r}")
        if self.use_ordered_embeddings and (
            self.vocab_size % self.num_centroids or self.centroid_intermediate_top_k > self.num_centroids
        ):
            raise ConfigError(f"{src}: with use_ordered_embeddings, num_centroids ({self.num_centroids}) must divide "
                              f"vocab_size ({self.vocab_size}) and centroid_intermediate_top_k "
                              f"({self.centroid_intermediate_top_k}) must not exceed it")  # fmt: skip
        unshared = copy.copy(self)  # Gemma 4's own checks, on the layers as they are but for the sharing
        unshared.num_kv_shared_layers = 0
        Gemma4TextConfig._validate_gemma4(unshared)


@dataclass
class Gemma4AssistantOutput(ModelOutput):
    """transformers' Gemma4AssistantOutput: post_projection of the final hidden states (B, T, backbone hidden),
    and the logits (B, T, vocab)."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    logits: torch.Tensor | None = None


def shared_masks(
    attention_mask: torch.Tensor | None,
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
    window: int | None,
    T: int,
) -> dict[str, torch.Tensor]:
    """Boolean (B, 1, T, S) masks by layer type over the target's keys, as transformers' create_attention_masks:
    full layers see every key the padding mask (cut to their S keys) marks real; sliding ones the last window + 1
    of their keys (query i of T the last window + 1 - i: its bidirectional window, flipped), under the padding
    mask's last S entries (of the mask cut to the full layers' keys)."""
    full_len = kv["full_attention"][0].shape[2] if "full_attention" in kv else None
    cut = None if attention_mask is None else attention_mask[:, :full_len].bool()
    out = {}
    for kind, (k, _) in kv.items():
        B, S = k.shape[0], k.shape[2]
        pad = torch.ones(B, S, dtype=torch.bool, device=k.device) if cut is None else cut[:, -S:].to(k.device)
        allowed = pad[:, None, None, :].expand(B, 1, T, S)
        if kind == "sliding_attention" and window is not None:
            back = S - 1 - torch.arange(S, device=k.device)  # a key's index counted from the last
            near = (torch.arange(T, device=k.device)[:, None] - back[None, :]).abs() <= window
            allowed = allowed & near
        out[kind] = allowed
    return out


@dataclass
class SharedKV:
    """The context the assistant's layers run in: RoPE tables, and per layer type the target's keys and values
    with their mask. Its layers' kv_source is their layer type (gemma4.Gemma4TextAttention calls attend_shared)."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[str, torch.Tensor]
    attentions: list | None = None

    def attend_shared(self, source: str, q, window=None, scale=None, softcap=None, sinks=None, chunk=None,
                      alibi=None) -> torch.Tensor:  # fmt: skip
        k, v = (t.to(q.device, q.dtype) for t in self.kv[source])
        return kernels.attention(q, k, v, self.masks[source], scale, softcap, sinks, self.attentions, alibi)


class Gemma4AssistantMaskedEmbedder(nn.Module):
    """transformers' centroid-masked head: the top centroid_intermediate_top_k of num_centroids centroids pick
    vocab_size / num_centroids tokens each (token_ordering, a buffer the checkpoint holds); those tokens' logits
    come from the head's rows, every other token gets the smallest of them minus one."""

    def __init__(self, config: Any):
        super().__init__()
        self.top_k, self.num_centroids, self.vocab_size = (
            config.centroid_intermediate_top_k,
            config.num_centroids,
            config.vocab_size,
        )
        self.per_centroid = self.vocab_size // self.num_centroids
        self.centroids = Linear(config.hidden_size, self.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(self.vocab_size, dtype=torch.long))

    def forward(self, h: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        B, T = h.shape[:2]
        top = torch.topk(self.centroids(h), k=self.top_k, dim=-1).indices
        chosen = self.token_ordering.long().view(self.num_centroids, self.per_centroid)[top]  # (B, T, k, n)
        rows = head_weight[chosen.reshape(-1)].view(B, T, self.top_k * self.per_centroid, -1)
        picked = (h.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)
        out = torch.full((B, T, self.vocab_size), picked.min().item() - 1.0, dtype=h.dtype, device=h.device)
        return out.scatter_(-1, chosen.view(B, T, -1), picked)


class Gemma4AssistantForCausalLM(CausalLM):
    """transformers' Gemma4AssistantForCausalLM. forward(inputs_embeds=, shared_kv_states=, position_ids=,
    attention_mask=) is one drafting step as transformers' is; it is no language model on its own (it has no
    keys or values of its own). `reads_target`: generate() feeds it the target's state (generation.target_draft)."""

    config_class = Gemma4AssistantConfig
    reads_target: ClassVar[bool] = True
    unservable: ClassVar[str] = (
        "it drafts from its target's state and is no language model on its own (serve its target with it as "
        "--draft-model)"
    )
    one_token_step: ClassVar[bool] = False
    _no_split_modules: ClassVar[list[str]] = ["Gemma4TextDecoderLayer"]
    body_class: ClassVar[type] = Gemma4TextModel  # a variant's own body (gemma4_unified_assistant.py)

    def __init__(self, config: Any):
        super().__init__(config, self.body_class(config))
        for kind, layer in zip(config.layer_types, self.model.layers):
            layer.self_attn.kv_source = kind  # SharedKV gives it the target's keys and values of its type
        h, b = config.hidden_size, config.backbone_hidden_size
        self.pre_projection = Linear(2 * b, h, bias=False)
        self.post_projection = Linear(h, b, bias=False)
        self.masked_embedding = (
            Gemma4AssistantMaskedEmbedder(config) if config.use_ordered_embeddings else None
        )

    def shared_kv_layers(self, target) -> dict[str, int]:
        """The target's layers whose keys and values this assistant reads, by layer type: the last layer of each
        type before the target's KV-shared ones (transformers' "store" layers). GenerationError where the target
        keeps none (a Gemma 4 without num_kv_shared_layers) or lacks a type the assistant's layers attend with."""
        cfg = target.config
        shared, kinds = getattr(cfg, "num_kv_shared_layers", 0) or 0, getattr(cfg, "layer_types", None) or []
        stored = (
            {kinds[i]: i for i in range(cfg.num_hidden_layers - shared)} if shared else {}
        )  # the last of each
        missing = sorted(set(self.config.layer_types) - set(stored))
        if missing:
            raise GenerationError(
                f"assistant_model is a Gemma 4 assistant, which reads the target's keys and values of "
                f"{missing}: the model must be a Gemma 4 with KV sharing (num_kv_shared_layers > 0) whose "
                f"non-shared layers include those types, got {type(target).__name__}"
            )
        return stored

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                shared_kv_states=None, use_cache=None, return_dict=None, **unused) -> Gemma4AssistantOutput:  # fmt: skip
        """inputs_embeds (B, T, 2 * backbone_hidden_size): the target's token embeddings beside its hidden
        states; shared_kv_states: layer type -> the target's (keys, values) (B, n_kv, S, hd); position_ids
        (B, T) (0.. where not given); attention_mask (B, >= S) over the target's tokens. input_ids and use_cache
        are ignored, as in transformers."""
        if inputs_embeds is None or shared_kv_states is None:
            raise GenerationError(
                "Gemma4AssistantForCausalLM.forward needs inputs_embeds (the target's token embeddings beside its "
                "last hidden states) and shared_kv_states (the target's keys and values by layer type)"
            )
        missing = sorted(set(self.config.layer_types) - set(shared_kv_states))
        if missing:
            raise GenerationError(f"shared_kv_states has no keys and values for {missing}")
        x = self.pre_projection(inputs_embeds.to(self.pre_projection.weight.device))
        B, T = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None].expand(B, T)
        masks = shared_masks(attention_mask, shared_kv_states, self.config.sliding_window, T)
        ctx = SharedKV(self.model.rotary.tables(position_ids.to(x.device), x.dtype), shared_kv_states, masks)
        h = self.model.run(x, ctx)
        logits = (
            self.lm_head(h)
            if self.masked_embedding is None
            else self.masked_embedding(h, self.lm_head.weight)
        )
        out = Gemma4AssistantOutput(
            self.post_projection(h).to(inputs_embeds.device), logits=logits.to(inputs_embeds.device)
        )
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()
