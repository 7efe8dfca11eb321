"""What Gemma 4's small on-device checkpoints (E2B, E4B) add to the family (gemma4.py uses these pieces):

- per-layer input embeddings (`hidden_size_per_layer_input` p > 0): a second token embedding
  `embed_tokens_per_layer` (vocab_size_per_layer_input rows of num_hidden_layers * p, times sqrt(p)) plus the
  input vectors projected by `per_layer_model_projection` (times hidden ** -0.5, each layer's p-wide part normed by
  `per_layer_projection_norm`), summed and times 2 ** -0.5, give every layer its own p-wide input. After its MLP a
  layer adds post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(x)) * its input)), before
  layer_scalar. So that every path from token ids to the layers carries the token part (the general forward, the
  compiled decode step, the eager one-token step), the body's `embed` returns it appended to the input vectors'
  features, (B, T, hidden + layers * p), and `run` splits it off; input vectors given without ids (inputs_embeds)
  are looked up in the scaled embeddings for their ids, as transformers does.
- KV sharing (`num_kv_shared_layers` n > 0): the last n layers have no k_proj, v_proj, k_norm or v_norm; each
  attends with its own queries over the keys and values of the last earlier non-shared layer of its attention
  type (in the cache, or kept in the forward without one: nn.Forward.attend(keep=True) / attend_shared). Their
  cache buffers are zero wide. With `use_double_wide_mlp` their MLPs are twice intermediate_size wide.

The one-token step runs these layers eagerly (nn.OneToken.attend_shared reads the producer's buffers); its
compiled graphs, one layer each with only that layer's buffers and no per-layer input, cannot: compiling them
fails (with autolm's warning) and the eager step runs instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import _is_int
from ..errors import ConfigError, GenerationError
from ..nn import ACTIVATIONS, CheckpointRules, Ignored, Linear, embedding, resized_rows


def kv_sources(config: Any) -> list[int | None]:
    """Per layer, the layer whose keys and values it attends over instead of its own (None: its own; -1: none
    has its attention type, which validate_small refuses)."""
    n = config.num_hidden_layers
    first = n - (config.num_kv_shared_layers or 0)
    types = config.layer_types
    return [None if i < first else max((j for j in range(first) if types[j] == types[i]), default=-1)
            for i in range(n)]  # fmt: skip


def validate_small(config: Any) -> None:
    """hidden_size_per_layer_input, vocab_size_per_layer_input and num_kv_shared_layers (ConfigError naming them)."""
    src, ple, vocab = config.source, config.hidden_size_per_layer_input, config.vocab_size_per_layer_input
    shared, n = config.num_kv_shared_layers, config.num_hidden_layers
    if not (ple is None or (_is_int(ple) and ple >= 0)):
        raise ConfigError(
            f"{src}: hidden_size_per_layer_input must be a non-negative integer or null, found {ple!r}"
        )
    if ple and not (_is_int(vocab) and vocab > 0):
        raise ConfigError(f"{src}: vocab_size_per_layer_input must be a positive integer, found {vocab!r}")
    if not (_is_int(shared) and 0 <= shared < n):
        raise ConfigError(
            f"{src}: num_kv_shared_layers must be an integer from 0 to {n - 1}, found {shared!r}"
        )
    for i, j in enumerate(kv_sources(config)):
        if j == -1:
            raise ConfigError(f"{src}: num_kv_shared_layers is {shared}: layer {i} ({config.layer_types[i]}) "
                              "shares keys and values, but no earlier non-shared layer has its attention type")  # fmt: skip
        shape = (config.layer_head_dim(i), config.layer_kv_heads(i))
        if j is not None and shape != (config.layer_head_dim(j), config.layer_kv_heads(j)):
            raise ConfigError(f"{src}: per_layer_config gives layer {i}, which shares layer {j}'s keys and values "
                              "(num_kv_shared_layers), another head_dim or num_key_value_heads")  # fmt: skip


def shared_kv_ignored(config: Any) -> list[Ignored]:
    """The shared layers' key / value projections and norms a checkpoint may hold (transformers ignores them)."""
    shared = [str(i) for i, j in enumerate(kv_sources(config)) if j is not None]
    if not shared:
        return []
    return [Ignored(rf"model\.layers\.({'|'.join(shared)})\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\..+")]


def add_per_layer_input(layer: nn.Module, config: Any, norm) -> None:
    """A decoder layer's per-layer input modules (transformers' names), where the config has them."""
    p, h = config.hidden_size_per_layer_input, config.hidden_size
    layer.hidden_size_per_layer_input = p or 0
    if p:
        layer.act_fn = ACTIVATIONS[config.hidden_act]
        layer.per_layer_input_gate = Linear(h, p, bias=False)
        layer.per_layer_projection = Linear(p, h, bias=False)
        layer.post_per_layer_input_norm = norm(h)


def apply_per_layer_input(
    layer: nn.Module, x: torch.Tensor, per_layer_input: torch.Tensor | None
) -> torch.Tensor:
    """x plus the layer's per-layer input part (x unchanged where the layer has none)."""
    if not layer.hidden_size_per_layer_input:
        return x
    if per_layer_input is None:  # a layer run on its own (a compiled one-token graph): not this model's step
        raise GenerationError("a Gemma 4 layer with per-layer inputs needs them from the model's body")
    h = layer.per_layer_projection(layer.act_fn(layer.per_layer_input_gate(x)) * per_layer_input)
    return x + layer.post_per_layer_input_norm(h)


class PerLayerInputs:
    """The body's side (a mixin for Gemma4TextModel, before its DecoderModel base): the modules, `embed` with the
    token part appended, `run` giving each layer its input."""

    def add_per_layer_modules(self, config: Any, norm) -> None:
        p, layers, h = config.hidden_size_per_layer_input or 0, config.num_hidden_layers, config.hidden_size
        self.per_layer_dim = p
        if p:
            self.embed_tokens_per_layer = embedding(config.vocab_size_per_layer_input, layers * p)
            self.per_layer_model_projection = Linear(h, layers * p, bias=False)
            self.per_layer_projection_norm = norm(p)

    def per_layer_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = self.embed_tokens_per_layer(input_ids)
        return t * torch.tensor(self.per_layer_dim**0.5, dtype=t.dtype, device=t.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids)
        if not self.per_layer_dim:
            return x
        return torch.cat((x, self.per_layer_tokens(input_ids).to(x.device, x.dtype)), dim=-1)

    def token_ids_of(self, x: torch.Tensor) -> torch.Tensor:
        """The token ids (B, T) whose scaled embeddings x (B, T, h) are, exactly (transformers' lookup)."""
        w = self.embed_tokens.weight
        scale = torch.tensor(self.embed_scale, dtype=w.dtype, device=w.device)
        first = w[:, 0] * scale
        ids = []
        for v in x.detach().reshape(-1, x.shape[-1]).to(w.device, w.dtype):
            rows = (first == v[0]).nonzero().flatten()
            rows = rows[(w[rows] * scale == v).all(-1)]
            if not len(rows):
                raise GenerationError("inputs_embeds without input_ids must be the model's own (scaled) token "
                                      "embeddings: Gemma 4's per-layer inputs are looked up by token id")  # fmt: skip
            ids.append(rows[0])
        return torch.stack(ids).view(x.shape[:2]).to(x.device)

    def layer_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """embed()'s output (or inputs_embeds) -> (input vectors (B, T, h), per-layer inputs (B, T, layers, p))."""
        if not self.per_layer_dim:
            return x, None
        h, p = self.config.hidden_size, self.per_layer_dim
        if x.shape[-1] == h:
            tokens = self.per_layer_tokens(self.token_ids_of(x)).to(x.dtype)
        else:
            x, tokens = x[..., :h].contiguous(), x[..., h:]
        shape = (*x.shape[:2], len(self.layers), p)
        proj = self.per_layer_projection_norm((self.per_layer_model_projection(x) * h**-0.5).reshape(shape))
        return x, (proj + tokens.reshape(shape).to(proj.device)) * 2**-0.5

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        """DecoderModel.run, each layer given its per-layer input (None without them)."""
        x, per_layer = self.layer_inputs(x)
        for i, layer in enumerate(self.layers):
            extra = None if per_layer is None else per_layer[:, :, i]
            if hidden_states is not None:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, extra, use_reentrant=False)
            else:
                x = layer(x, ctx, extra)
        x = self.final_norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x


class SmallCausalLM:
    """The model's side (a mixin before its CausalLM base): checkpoint rules, cache shapes, resizing."""

    def rules_for(self, config: Any) -> CheckpointRules:
        """The family's checkpoint rules, plus the KV-shared layers' projections a checkpoint may hold."""
        extra = shared_kv_ignored(config)
        return (
            CheckpointRules([*type(self).checkpoint_rules.rules, *extra])
            if extra
            else type(self).checkpoint_rules
        )

    @property
    def compiled_graphs(self) -> bool:
        """Whether autolm.step's compiled graphs (one layer each, with its own buffers) can run the layers: not
        with per-layer inputs or KV sharing (the eager one-token step runs them)."""
        return not self.model.per_layer_dim and all(
            layer.self_attn.kv_source is None for layer in self.model.layers
        )

    def attention_shapes(self) -> list[tuple[int, int]]:
        """A KV-shared layer's cache buffers are zero wide (it reads another layer's)."""
        shapes = super().attention_shapes()
        return [
            (1, 0) if layer.self_attn.kv_source is not None else s
            for layer, s in zip(self.model.layers, shapes)
        ]

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """The token embeddings (and an untied head), then the per-layer ones to the same rows, as transformers."""
        out = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        _resize_per_layer(self, mean_resizing)
        return out


def _resize_per_layer(model: nn.Module, mean_resizing: bool) -> None:
    body, n = model.model, model.config.vocab_size
    if not body.per_layer_dim or body.embed_tokens_per_layer.weight.shape[0] == n:
        return
    old = body.embed_tokens_per_layer.weight
    std = float(model.config.extra.get("initializer_range", 0.02))
    with torch.no_grad():
        new = embedding(n, old.shape[1]).to(old.device, old.dtype)
        new.weight = nn.Parameter(resized_rows(old, n, mean_resizing, std), requires_grad=old.requires_grad)
    body.embed_tokens_per_layer = new
    model.config.vocab_size_per_layer_input = n
