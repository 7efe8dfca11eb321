"""Qwen4-Exp's text model (model_type qwen4_exp_text; qwen4_exp: the image-text checkpoints' language model): Qwen 3.5
MoE's layers (autolm.models.qwen3_5_moe: Gated DeltaNet with separate projections, gated attention, experts with a
gated shared expert; the top k renormalised with `norm_topk_prob`) with

- `hc_count` residual streams and gated residual connections in place of the pre-norms and the final norm
  (autolm.models.qwen4_exp_ple.GatedResidual): the embeddings are repeated into every stream;
- QSA on the attention layers (layer type "indexed_attention"; "full_attention" reads as it): a token indexer that
  keeps the top blocks of keys for each query (autolm.models.qwen4_exp_qsa);
- Per-Layer Embeddings of hashed token n-grams added to the streams before the `ple_layer_ids` layers (one-indexed,
  linear-attention layers only; autolm.models.qwen4_exp_ple);
- the DeltaNet's output gate by `output_gate_type` (SiLU or sigmoid; hidden_act where unset).

Checkpoints keep one tensor per expert, and each n-gram table in `split_ngram_parts` shards
(`ngram_embedding.shard_<i>.weight`, joined while loading and split again while saving); the image-text ones keep
the language model under model.language_model.* (the vision tower and the multi-token-prediction layers skipped).
No GGUF layout yet (llama.cpp's "qwen4exp" is not read or written).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..config_fields import read_rope
from ..errors import CheckpointError, ConfigError, GenerationError
from ..nn import CheckpointRules
from ..nn.gated_delta import GatedRMSNorm
from .base import CausalLM, DecoderModel
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .qwen2_moe import QWEN_MOE_RULES, QWEN_MOE_TP
from .qwen3_5 import Qwen3_5GatedDeltaNet
from .qwen3_5_moe import Qwen3_5MoeTextConfig
from .qwen3_next import moe_or_mlp
from .qwen4_exp_ple import GatedResidual, PLELayer
from .qwen4_exp_qsa import IndexedAttention

_QSA = ("indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget", "indexer_compress_ratio")


def _positive(config: Any, *names: str) -> None:
    for name in names:
        v = getattr(config, name)
        if not _is_int(v) or v < 1:
            raise ConfigError(f"{config.source}: {name} must be a positive integer, found {v!r}")


@dataclass(repr=False)
class Qwen4ExpTextConfig(Qwen3_5MoeTextConfig):
    """transformers' Qwen4ExpTextConfig (its fields and defaults)."""

    model_type: ClassVar[str] = "qwen4_exp_text"
    hc_count: int = 4
    hc_lowrank: int = 320
    ple_layer_ids: list[int] | None = None
    ple_embed_dim: int | None = None
    ple_conv_kernel_size: int = 4
    ngram_size: int = 3
    heads_per_ngram: int = 8
    ngram_vocab_size_base: int = 20_000_000
    make_ngram_vocab_size_divisible_by: int = 128
    seed: int = 1234
    split_ngram_parts: int = 512
    indexer_n_heads: int | None = None
    indexer_kv_heads: int | None = None
    indexer_head_dim: int | None = None
    indexer_budget: int | None = None
    indexer_compress_ratio: int | None = None
    num_experts_per_tok: int = 10
    num_experts: int = 512
    norm_topk_prob: bool = True
    output_gate_type: str | None = None

    def __post_init__(self) -> None:
        if self.ple_layer_ids is None:
            self.ple_layer_ids = []
        elif isinstance(self.ple_layer_ids, list) and all(_is_int(i) for i in self.ple_layer_ids):
            self.ple_layer_ids = sorted(set(self.ple_layer_ids))
        if self.ple_embed_dim is None:
            self.ple_embed_dim = self.hidden_size
        self.extra.setdefault("number_of_conv_states", 3 if self.ple_layer_ids else 1)
        super().__post_init__()
        if isinstance(self.layer_types, list):
            self.layer_types = ["indexed_attention" if t == "full_attention" else t for t in self.layer_types]

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        rope, spelling = read_rope(d, cls, source)
        if "partial_rotary_factor" in d:  # transformers 4's place for it
            rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
        return rope, spelling  # none given: every dimension turns (not Qwen 3.5's 0.25)

    def hybrid_post_init(self) -> None:
        rope = self.rope_parameters
        super().hybrid_post_init()
        self.rope_parameters = rope  # without Qwen 3.5's default factor

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.rope_spelling == "v4" and "partial_rotary_factor" not in self.rope_parameters:
            out.pop("partial_rotary_factor", None)
        return out

    def validate(self) -> None:
        types, rope = self.layer_types, self.rope_parameters
        if isinstance(types, list):  # checked by Qwen 3.5's rules, "indexed_attention" its "full_attention"
            self.layer_types = ["full_attention" if t == "indexed_attention" else t for t in types]
        if isinstance(rope, dict):
            self.rope_parameters = {"partial_rotary_factor": 1.0, **rope}
        try:
            super().validate()
        finally:
            self.layer_types, self.rope_parameters = types, rope
        src = self.source
        if (self.output_gate_type or self.hidden_act) not in ("sigmoid", "silu"):
            raise ConfigError(f"{src}: output_gate_type must be 'sigmoid' or 'silu' (hidden_act where unset), found "
                              f"{self.output_gate_type or self.hidden_act!r}")  # fmt: skip
        _positive(self, "hc_count", "hc_lowrank")
        if self.hc_count < 2:
            raise ConfigError(f"{src}: hc_count must be at least 2, found {self.hc_count}")
        self.validate_qsa()
        self.validate_ple()

    def validate_qsa(self) -> None:
        src, given = self.source, [n for n in _QSA if getattr(self, n) is not None]
        if not given:  # no QSA settings: a config transformers reads, a model neither builds (needs_qsa)
            return
        missing = [n for n in _QSA if n not in given]
        if missing:
            raise ConfigError(f"{src}: the attention layers' QSA indexer needs {', '.join(missing)}")
        _positive(self, *_QSA)
        if self.indexer_kv_heads != 1:
            raise ConfigError(f"{src}: indexer_kv_heads must be 1, found {self.indexer_kv_heads}")
        if self.indexer_budget % self.indexer_compress_ratio:
            raise ConfigError(f"{src}: indexer_budget ({self.indexer_budget}) must be a multiple of "
                              f"indexer_compress_ratio ({self.indexer_compress_ratio})")  # fmt: skip
        rotary = int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))
        if rotary > self.indexer_head_dim:
            raise ConfigError(f"{src}: indexer_head_dim ({self.indexer_head_dim}) must hold the {rotary} rotary "
                              "dimensions of an attention head")  # fmt: skip

    def validate_ple(self) -> None:
        src, ids = self.source, self.ple_layer_ids
        if not isinstance(ids, list) or not all(_is_int(i) and 1 <= i <= self.num_hidden_layers for i in ids):
            raise ConfigError(f"{src}: ple_layer_ids must list layer numbers in 1 .. {self.num_hidden_layers}, "
                              f"found {ids!r}")  # fmt: skip
        if not ids:
            return
        _positive(self, "ple_embed_dim", "ple_conv_kernel_size", "heads_per_ngram", "ngram_vocab_size_base",
                  "make_ngram_vocab_size_divisible_by", "split_ngram_parts")  # fmt: skip
        if not _is_int(self.ngram_size) or self.ngram_size < 2:
            raise ConfigError(
                f"{src}: ngram_size must be an integer of at least 2, found {self.ngram_size!r}"
            )
        heads = (self.ngram_size - 1) * self.heads_per_ngram
        if self.ple_embed_dim % heads:
            raise ConfigError(f"{src}: ple_embed_dim ({self.ple_embed_dim}) must be a multiple of the {heads} n-gram "
                              "heads ((ngram_size - 1) * heads_per_ngram)")  # fmt: skip
        bad = [i for i in ids if self.layer_types[i - 1] != "linear_attention"]
        if bad:
            raise ConfigError(f"{src}: ple_layer_ids {bad} are not linear_attention layers (PLE needs one)")
        if self.eos_token_id is None or self.eos_token_id == []:
            raise ConfigError(
                f"{src}: eos_token_id must be set where ple_layer_ids are (n-grams stop at EOS)"
            )


class Qwen4ExpConfig(ImageTextConfig):
    """transformers' Qwen4ExpConfig (model_type qwen4_exp: the image-text checkpoints): their language model's
    text_config, read as a Qwen4ExpTextConfig."""

    model_type: ClassVar[str] = "qwen4_exp"
    text_class: ClassVar[type] = Qwen4ExpTextConfig


class Qwen4ExpGatedDeltaNet(Qwen3_5GatedDeltaNet):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        act = config.output_gate_type or config.hidden_act
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps, act)


class Qwen4ExpTextDecoderLayer(nn.Module):
    """Per-layer embeddings (some layers), then Gated DeltaNet or indexed attention, then the experts, each block
    inside its gated residual over the streams."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        types = config.layer_types
        if types[layer_idx] == "linear_attention":
            self.linear_attn = Qwen4ExpGatedDeltaNet(config, layer_idx)
        else:  # its indexer's keys in the cache after the layers' own
            slot = config.num_hidden_layers + sum(t != "linear_attention" for t in types[:layer_idx])
            self.self_attn = IndexedAttention(config, layer_idx, slot)
        self.mlp = moe_or_mlp(config, layer_idx)
        ids = config.ple_layer_ids
        self.ple = PLELayer(config, layer_idx, ids.index(layer_idx + 1)) if layer_idx + 1 in ids else None
        self.attn_hyper_connection = GatedResidual(config)
        self.mlp_hyper_connection = GatedResidual(config)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.ple is not None:
            x = x + self.ple(x, ctx.ple_ids, ctx)
        mixer = self.linear_attn if hasattr(self, "linear_attn") else self.self_attn
        x = self.attn_hyper_connection(x, lambda y: mixer(y, ctx))
        return self.mlp_hyper_connection(x, self.mlp)


class Qwen4ExpTextModel(DecoderModel):
    """The embeddings repeated into hc_count streams, the layers, the streams' last mix (`hyper_connection_mixer`,
    no final norm). The per-layer embeddings read the token ids: those embed() was given, or the ids whose
    embeddings inputs_embeds are (transformers' reverse_embedding)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "hyper_connection_mixer"}

    def __init__(self, config: Any):
        super().__init__(config, Qwen4ExpTextDecoderLayer, GatedResidual(config, combine=False))
        self._embedded: tuple[torch.Tensor, torch.Tensor] | None = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids)
        self._embedded = (x, input_ids) if self.config.ple_layer_ids else None
        return x

    def token_ids(self, x: torch.Tensor) -> torch.Tensor:
        """The token ids (B, T) of input vectors x: embed()'s own, else found in the embedding table."""
        embedded, self._embedded = self._embedded, None
        if embedded is not None and embedded[0] is x:
            return embedded[1]
        w, ids = self.embed_tokens.weight, []
        for v in x.detach().reshape(-1, x.shape[-1]).to(w.device, w.dtype):
            # the rows whose first feature matches, checked whole
            rows = (w[:, 0] == v[0]).nonzero().flatten()
            rows = rows[(w[rows] == v).all(-1)]
            if not len(rows):
                raise GenerationError("inputs_embeds without input_ids must be the model's own token embeddings: "
                                      "Qwen4-Exp's per-layer embeddings are looked up by token id")  # fmt: skip
            ids.append(rows[0])
        return torch.stack(ids).view(x.shape[:2]).to(x.device)

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        if self.config.ple_layer_ids:
            ctx.ple_ids = self.token_ids(x)
        return super().run(x.repeat(1, 1, self.config.hc_count), ctx, hidden_states)


class NGramShards:
    """Checkpoint rule: the n-gram tables in `split_ngram_parts` shards along the rows (transformers' Concatenate
    while loading, torch.chunk while saving)."""

    def __init__(self, config: Any):
        self.parts = config.split_ngram_parts

    def piece(self, name: str) -> tuple[str, int] | None:
        m = re.fullmatch(r"(.+\.ngram_embedding)\.shard_(\d+)\.weight", name)
        return None if m is None else (f"{m.group(1)}.weight", int(m.group(2)))

    def pieces(self, name: str) -> int:
        return self.parts

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        t = torch.cat([got[i] for i in sorted(got)])
        if sorted(got) != list(range(self.parts)) or tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: the shards {sorted(got)} of {name!r} make {tuple(t.shape)}; the model "
                                  f"expects {self.parts} shards making {tuple(shape)}")  # fmt: skip
        return t


class Qwen4ExpRules(CheckpointRules):
    """The family's rules, with the n-gram tables split into their shards again for saving."""

    def __init__(self, rules, parts: int):
        super().__init__(rules)
        self.parts = parts

    def to_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in super().to_checkpoint(state_dict).items():
            if not name.endswith(".ngram_embedding.weight"):
                out[name] = t
                continue
            for i, part in enumerate(torch.chunk(t, self.parts, dim=0)):
                out[f"{name[: -len('weight')]}shard_{i}.weight"] = part
        return out


class Qwen4ExpForCausalLM(CausalLM):
    """transformers' Qwen4ExpForCausalLM (the text model; model_type qwen4_exp_text, or qwen4_exp's language model).
    The one-token step runs eagerly (per-layer embeddings, and the indexed layers keep their indexer's keys in the
    cache)."""

    config_class = Qwen4ExpTextConfig
    checkpoint_rules = CheckpointRules([*IMAGE_TEXT_RULES, *QWEN_MOE_RULES.rules])
    tp_patterns: ClassVar[dict[str, str]] = QWEN_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["Qwen4ExpTextDecoderLayer"]
    recurrent: ClassVar[bool] = True
    compiled_graphs: ClassVar[bool] = False  # per-layer inputs and indexer keys: not one layer's own buffers

    def __init__(self, config: Any):
        if config.indexer_budget is None and any(t != "linear_attention" for t in config.layer_types):
            raise ConfigError(f"{config.source}: the attention layers' QSA indexer needs {', '.join(_QSA)}")
        super().__init__(config, Qwen4ExpTextModel(config))
        rules = [*type(self).checkpoint_rules.rules, NGramShards(config)]
        self.checkpoint_rules = Qwen4ExpRules(rules, config.split_ngram_parts)

    def indexers(self) -> list[nn.Module]:
        return [layer.self_attn.indexer for layer in self.model.layers if hasattr(layer, "self_attn")]

    def attention_shapes(self) -> list[tuple[int, int]]:
        """The layers' own, then one head per indexed layer: its raw index keys and RoPE tables (cos, sin)."""
        c = self.config
        rotary = int(c.head_dim * c.rope_parameters.get("partial_rotary_factor", 1.0))
        extra = [(1, ix.index_head_dim + 2 * rotary) for ix in self.indexers()]
        return [*super().attention_shapes(), *extra]

    def layer_devices(self) -> list[torch.device]:
        devices = super().layer_devices()
        return [*devices, *(devices[ix.layer_idx] for ix in self.indexers())]
