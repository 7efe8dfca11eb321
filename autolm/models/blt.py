"""BLT (Meta's Byte Latent Transformer, transformers' BltForCausalLM): a byte-level LM that groups bytes into
patches of varying length and runs its large transformer over the patches. Per forward (blt_layers.py):

1. patches: the patcher (a small byte LM) gives each byte's next-byte entropy; a patch starts at bytes 0 and 1 and
   after every byte whose entropy exceeds patching_threshold (patches longer than max_patch_length split);
   without the patcher (patch_in_forward false, or patching_mode not "entropy") every byte is its own patch;
2. byte embeddings plus hash n-gram embeddings (encoder_hash_byte_group_size, _nb_functions, _vocab);
3. the local encoder's byte layers (sliding window local_attention_window_len), each patch max-pooled and
   cross-attending to its bytes (cross_attn_k vectors a patch);
4. the global transformer, causal over the patches;
5. the local decoder: the encoder's byte states cross-attend to the global patch states (a byte to the patch
   before its own, the last byte of a patch to that patch) between its byte layers; a norm; the LM head.

Decoding: the patches of the whole sequence follow from its bytes, so each forward with a cache runs the whole
sequence again: the cache keeps the bytes and positions seen so far (a recurrent-style state, one slot) and
returns the logits of the new ones. Exact (transformers' generate cannot keep a cache for BLT either: it runs the
whole sequence each step), with no speed-up from the cache; no one-token step or compiled step.
output_hidden_states / output_attentions give None. llama.cpp has no BLT architecture: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import validate_rope
from ..errors import ConfigError, GenerationError
from ..nn import embedding
from . import blt_layers as L
from .base import CausalLM
from .interop import device_map_of

_COMMON = dict(num_key_value_heads=None, rms_norm_eps=1e-5, dropout=0.0, rope_parameters=None, hidden_act="silu",
               initializer_range=0.02)  # fmt: skip
# transformers' sub-configs' fields and defaults (rope_theta: their default_theta)
PARTS = {
    "encoder_config": (dict(_COMMON, vocab_size=260, cross_attn_all_layers=False, cross_attn_k=2,
                            hidden_size_global=2048, hidden_size=1024, num_attention_heads=16, num_hidden_layers=1,
                            max_position_embeddings=24576, intermediate_size=None, sliding_window=None), 500000.0),
    "decoder_config": (dict(_COMMON, vocab_size=260, cross_attn_all_layers=True, cross_attn_k=2,
                            hidden_size_global=2048, hidden_size=1024, num_attention_heads=16, num_hidden_layers=9,
                            max_position_embeddings=24576, intermediate_size=2816, pad_token_id=None,
                            bos_token_id=None, eos_token_id=None, tie_word_embeddings=False), 500000.0),
    "global_config": (dict(_COMMON, hidden_size=2048, num_attention_heads=16, num_hidden_layers=25,
                           max_position_embeddings=4096, intermediate_size=5632, tie_word_embeddings=False), 500000.0),
    "patcher_config": (dict(_COMMON, vocab_size=260, hidden_size=768, num_hidden_layers=14, num_attention_heads=12,
                            max_position_embeddings=8192, intermediate_size=2048, tie_word_embeddings=False,
                            sliding_window=512), 10000.0),
}  # fmt: skip
# autolm's common fields that BLT's top-level config.json does not have (the decoder's, for the LM head)
_NOT_TOP = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "hidden_act", "rms_norm_eps", "attention_dropout", "sliding_window")  # fmt: skip


def filled(name: str, given: dict | None) -> dict:
    """A sub-config's dict with transformers' defaults and derived values filled in (its other keys kept)."""
    defaults, theta = PARTS[name]
    d = {**defaults, **(given or {})}
    if d.get("rope_parameters") is None:
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta", theta)}
    h, heads = d["hidden_size"], d["num_attention_heads"]
    d["num_key_value_heads"] = d["num_key_value_heads"] or heads
    if not d["intermediate_size"] and _is_int(h):
        d["intermediate_size"] = int(8 * h / 3)
    if name != "encoder_config" and _is_int(h) and _is_int(heads) and heads > 0:
        d["head_dim"] = h // heads
    if name == "patcher_config":
        d["hidden_act"] = "silu"  # transformers sets it whatever the file says
    d["tie_word_embeddings"] = False
    return d


@dataclass(repr=False)
class BltConfig(PretrainedConfig):
    """transformers' BltConfig: the patching and hashing fields and the four sub-configs (dicts as config.json
    holds them, transformers' defaults filled in; `part(name)` reads one). hidden_size and the other common
    fields are the decoder's (the LM head's input) and are not written."""

    model_type: ClassVar[str] = "blt"
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "patch_in_forward")

    vocab_size: int = 260
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    patch_in_forward: bool = True
    patch_size: int | None = 4
    patching_mode: str | None = "entropy"
    patching_threshold: float | None = 1.335442066192627
    patching_batch_size: int | None = 1
    max_patch_length: int | None = None
    local_attention_window_len: int | None = 512
    cross_attn_k: int | None = 2
    encoder_hash_byte_group_size: list[int] | None = None
    encoder_hash_byte_group_vocab: int | None = 500002
    encoder_hash_byte_group_nb_functions: int | None = 1
    patcher_config: dict | None = None
    encoder_config: dict | None = None
    decoder_config: dict | None = None
    global_config: dict | None = None
    rope_parameters: dict[str, Any] = field(  # written only: each part has its own RoPE
        default_factory=lambda: {"rope_type": "default", "rope_theta": 500000.0}
    )

    def __post_init__(self) -> None:
        self.encoder_hash_byte_group_size = self.encoder_hash_byte_group_size or [3, 4, 5, 6, 7, 8]
        for name in PARTS:
            given = getattr(self, name)
            if given is not None and not isinstance(given, dict):
                raise ConfigError(f"{self.source}: {name} must be an object, found {given!r}")
            setattr(self, name, filled(name, given))
        self.encoder_config["sliding_window"] = self.local_attention_window_len
        enc, glob = self.encoder_config, self.global_config
        out = enc["hidden_size"] * self.cross_attn_k if _is_int(self.cross_attn_k) else None
        glob["encoder_cross_output_size"] = out if out != glob["hidden_size"] else None
        dec = self.decoder_config
        for f in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
        ):
            setattr(self, f, dec[f])
        self.num_hidden_layers, self.head_dim = dec["num_hidden_layers"], None
        super().__post_init__()

    def part(self, name: str) -> SimpleNamespace:
        """A sub-config ("encoder_config", ...) as attributes."""
        return SimpleNamespace(**getattr(self, name))

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # each part has its own RoPE

    @property
    def embedding_width(self) -> int:
        return self.encoder_config["hidden_size"]  # the byte embeddings' (model.local_encoder.embed_tokens)

    @property
    def embedding_rows(self) -> int:
        return self.encoder_config["vocab_size"]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_TOP:
            out.pop(key, None)
        return out

    def validate(self) -> None:
        super().validate()
        src = self.source
        for name in ("cross_attn_k", "encoder_hash_byte_group_vocab", "encoder_hash_byte_group_nb_functions"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"{src}: {name} must be a positive integer, found {v!r}")
        for name in ("patch_size", "max_patch_length", "local_attention_window_len", "patching_batch_size"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v > 0):
                raise ConfigError(f"{src}: {name} must be a positive integer or null, found {v!r}")
        sizes = self.encoder_hash_byte_group_size
        if not isinstance(sizes, list) or not all(_is_int(n) and n > 0 for n in sizes):
            raise ConfigError(f"{src}: encoder_hash_byte_group_size must be a list of positive integers, "
                              f"found {sizes!r}")  # fmt: skip
        if not isinstance(self.patching_mode, str):
            raise ConfigError(f"{src}: patching_mode must be a string, found {self.patching_mode!r}")
        if self.patching_mode == "entropy" and not _is_number(self.patching_threshold):
            raise ConfigError(
                f"{src}: patching_threshold must be a number, found {self.patching_threshold!r}"
            )
        for name in PARTS:
            self._validate_part(name)
        self._validate_shapes()

    def _validate_part(self, name: str) -> None:
        d, src = getattr(self, name), self.source
        for f in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                  "intermediate_size", "max_position_embeddings", *(("vocab_size",) if "vocab_size" in d else ())):  # fmt: skip
            if not _is_int(d[f]) or d[f] < 1:
                raise ConfigError(f"{src}: {name}.{f} must be a positive integer, found {d[f]!r}")
        if d["hidden_size"] % d["num_attention_heads"] or d["num_attention_heads"] % d["num_key_value_heads"]:
            raise ConfigError(f"{src}: {name}.num_attention_heads ({d['num_attention_heads']}) must divide "
                              f"hidden_size ({d['hidden_size']}) and be a multiple of num_key_value_heads "
                              f"({d['num_key_value_heads']})")  # fmt: skip
        if d["hidden_act"] not in self.activations:
            raise ConfigError(f"{src}: {name}.hidden_act {d['hidden_act']!r} is not supported "
                              f"(expected one of {self.activations})")  # fmt: skip
        if not _is_number(d["rms_norm_eps"]) or not 0 < d["rms_norm_eps"] < 1:
            raise ConfigError(
                f"{src}: {name}.rms_norm_eps must be a positive number below 1, found {d['rms_norm_eps']!r}"
            )
        if d.get("sliding_window") is not None and not (
            _is_int(d["sliding_window"]) and d["sliding_window"] > 0
        ):
            raise ConfigError(f"{src}: {name}.sliding_window must be a positive integer or null")
        validate_rope(d["rope_parameters"], f"{src}: {name}")

    def _validate_shapes(self) -> None:
        """The parts' widths must fit together (transformers fails in its forward where they do not)."""
        enc, dec, glob, src = self.encoder_config, self.decoder_config, self.global_config, self.source
        checks = (
            ("decoder_config.hidden_size", dec["hidden_size"], enc["hidden_size"], "encoder_config.hidden_size"),
            ("decoder_config.hidden_size_global", dec["hidden_size_global"], glob["hidden_size"],
             "global_config.hidden_size"),
            ("encoder_config.cross_attn_k", enc["cross_attn_k"], self.cross_attn_k, "cross_attn_k"),
            ("decoder_config.cross_attn_k", dec["cross_attn_k"], self.cross_attn_k, "cross_attn_k"),
        )  # fmt: skip
        for name, value, want, other in checks:
            if value != want:
                raise ConfigError(f"{src}: {name} ({value!r}) must equal {other} ({want!r})")
        if self.tie_word_embeddings and (enc["vocab_size"], enc["hidden_size"]) != (
            self.vocab_size,
            dec["hidden_size"],
        ):
            raise ConfigError(f"{src}: tie_word_embeddings: the byte embeddings ({enc['vocab_size']} x "
                              f"{enc['hidden_size']}) and the LM head differ in shape")  # fmt: skip


class BltModel(nn.Module):
    """transformers' BltModel: the local encoder, global transformer, local decoder, hash embeddings, patcher."""

    def __init__(self, config: BltConfig):
        super().__init__()
        self.config = config
        glob = config.part("global_config")
        self.local_encoder = L.BltLocalEncoder(config.part("encoder_config"))
        self.global_transformer = L.BltGlobalTransformer(glob)
        self.local_decoder = L.BltLocalDecoder(config.part("decoder_config"))
        n = config.encoder_hash_byte_group_nb_functions * len(config.encoder_hash_byte_group_size)
        self.encoder_hash_tok_embedding = embedding(
            config.encoder_hash_byte_group_vocab * n, config.encoder_config["hidden_size"]
        )
        self.patcher = L.BltPatcher(config.part("patcher_config")) if config.patch_in_forward else None
        self.gradient_checkpointing = False

    @property
    def embed_tokens(self) -> nn.Module:
        return self.local_encoder.embed_tokens

    def patch_lengths(self, input_ids: torch.Tensor) -> torch.Tensor:
        c, (B, T) = self.config, input_ids.shape
        if c.patching_mode == "entropy" and self.patcher is not None:
            with torch.no_grad():  # transformers' patcher is frozen
                entropies = self.patcher(input_ids)
            if c.patch_size is not None:
                lengths = L.lengths_from_entropies(entropies, T, c.patching_threshold)
            else:
                lengths = torch.ones((B, T), dtype=entropies.dtype, device=input_ids.device)
            return L.split_long(lengths, c.max_patch_length)
        return L.split_long(
            torch.ones((B, T + 1), dtype=input_ids.dtype, device=input_ids.device), c.max_patch_length
        )

    def forward(self, input_ids: torch.Tensor, attention_mask, position_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's normed byte states (B, T, h) for the bytes input_ids (B, T)."""
        c, (B, T) = self.config, input_ids.shape
        lengths = self.patch_lengths(input_ids)
        P, k = lengths.shape[1], c.cross_attn_k
        x = L.hash_embeddings(input_ids, self.local_encoder.embed_tokens, self.encoder_hash_tok_embedding, c)
        mask = L.causal_mask(T, c.local_attention_window_len, attention_mask, x.dtype, x.device)
        ids = L.patch_ids_of(lengths, T)
        enc_cross = L.cross_mask(ids, P, k, True, x.dtype)
        h, patches = self.local_encoder(x, position_ids, mask, enc_cross, P, ids)
        patches = self.global_transformer(patches.reshape(B, P, -1))
        dec_cross = L.cross_mask(L.patch_ids_of(lengths[:, 1:], T), P, k, False, x.dtype)
        return self.local_decoder(h, patches, position_ids, mask, dec_cross)


class BltForCausalLM(CausalLM):
    """transformers' BltForCausalLM."""

    config_class = BltConfig
    embeddings_name: ClassVar[str] = "model.local_encoder.embed_tokens"
    layers_prefix: ClassVar[str] = (
        "model"  # every part's layers (quantization covers them all, the patcher's too)
    )
    checkpoint_stack: ClassVar[str] = "model.local_decoder.layers"  # autolm.load's size check: the decoder's
    one_token_step: ClassVar[bool] = False  # every forward runs the whole sequence (see the module docstring)
    recurrent: ClassVar[bool] = True  # the cache's state (the bytes so far) cannot go back a token
    rows_apart: ClassVar[bool] = True  # padding moves a row's patches: served rows run alone (serve.rows)
    compiled_graphs: ClassVar[bool] = False
    tp_patterns: ClassVar[dict[str, str]] = {}  # transformers has no tensor-parallel plan for BLT
    _no_split_modules: ClassVar[list[str]] = ["BltTransformerLayer", "BltCrossAttention"]

    def __init__(self, config: BltConfig):
        super().__init__(config, BltModel(config))

    def blocks(self) -> list[str]:
        return [
            f"model.{name}" for name, m in self.model.named_children() if any(True for _ in m.parameters())
        ] + ["lm_head"]

    def attention_shapes(self) -> list[tuple[int, int]]:
        return [(1, 0)]  # one zero-width slot: its state holds the bytes and positions so far

    def layer_devices(self) -> list[torch.device]:
        return [self.device]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the local encoder's device (under a device_map, its block's)."""
        device_map = device_map_of(self)
        if device_map:
            d = device_map["model.local_encoder"]
            return torch.device("cpu" if d == "disk" else d)
        return self.model.embed_tokens.weight.device

    def decoder_states(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                       cache_position, output_hidden_states, output_attentions, *rest):  # fmt: skip
        """The whole sequence (the cache's bytes, then these) through the model; the new bytes' states."""
        if inputs_embeds is not None or input_ids is None:
            raise GenerationError(
                "BLT takes input_ids only (its patcher reads the bytes): inputs_embeds is not supported"
            )
        B, T = input_ids.shape
        cache = self.forward_cache(past_key_values, use_cache, B, T)
        past = cache.length if cache is not None else 0
        if position_ids is None:  # transformers': counted from the cache's length, padding or not
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, -1)
        ids, pos = input_ids, position_ids.expand(B, -1)
        if past:
            seen = cache.state(0)
            ids, pos = torch.cat([seen[0], ids], dim=1), torch.cat([seen[1], pos], dim=1)
        mask = None if attention_mask is None else attention_mask[:, : past + T]
        h = self.model(ids, mask, pos)[:, past:]
        if cache is not None:
            cache.set_state(0, (ids, pos))
            cache.length = past + T
        return h, cache, None, None
