"""Gemma 4 as llama.cpp's Gemma4Model converter writes it (arch "gemma4", conversion/gemma.py), for the models
gemma4.py runs: 31B's dense layers, 26B-A4B's experts beside the dense MLP, E2B / E4B's per-layer inputs, KV
sharing and double-wide MLPs.

Metadata: Gemma3Model's keys (no norm shift: Gemma 4's norms are times w), the full layers' head size as
attention.key_length / value_length and rope.dimension_count, the sliding layers' as *_swa, the layer pattern as
attention.sliding_window_pattern (a flag per layer, true: sliding), attention.shared_kv_layers,
embedding_length_per_layer_input (0 without per-layer inputs), head_count_kv per layer where config.json names the
full layers' KV heads (num_global_key_value_heads or per_layer_config), feed_forward_length per layer with
use_double_wide_mlp, expert_feed_forward_length; the experts' count and top k as TextModel writes them.

Tensors: gguf-py's names (layer_scalar as layer_output_scale, the stacked experts as ffn_gate_up_exps /
ffn_down_exps); the router's scale as ffn_gate_inp.scale and its per_expert_scale as ffn_down_exps.scale
(Gemma4GGUF renames them both ways); the full layers' proportional RoPE as rope_freqs: a divisor per frequency,
1 for the rotated ones, 1e30 for the rest (their rotation vanishes), read back as partial_rotary_factor. Full layers
without v_proj (attention_k_eq_v) have no attn_v: the file's absence of it is the flag.

The vocabulary as the converter's set_vocab writes it (write_vocab): tokenizer model "gemma4", the tokens in id
order scored -1000, byte pieces typed BYTE, special tokens CONTROL, the channel / tool-call markers USER_DEFINED
(always rendered), the merges, no prefix space; autolm.sources.gguf_tokenizer_gemma4 reads it back.

llama.cpp's graph runs tanh GELU, no attention biases and no proportional RoPE factor (GGUF out refuses others,
naming the field); the per-layer embeddings have as many rows as the vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..nn import CheckpointRules, GGUFLayout, Ignored
from ..nn.expert_formats import GGUFExperts
from ..nn.rope import proportional_inv_freq
from .gemma4_small import kv_sources

_V = "gguf_attn_v_"  # a non-shared layer's attn_v is in the file (GGUFLayout.present markers, popped by derive)
_FREQS = "gguf_rope_freqs"  # rope_freqs' values in the rope dict (GGUFLayout.rope_tensors), read by derive
_UNROTATED = 1e30  # the converter's divisor for the frequencies proportional RoPE leaves out
# config fields compared through what they compute (compared): effective per layer, or not run by llama.cpp
NOT_COMPARED = ("query_pre_attn_scalar", "attn_logit_softcapping", "use_bidirectional_attention",
                "hidden_size_per_layer_input", "vocab_size_per_layer_input", "use_double_wide_mlp",
                "attention_k_eq_v")  # fmt: skip


class Gemma4GGUF:
    """Checkpoint rule (nn.checkpoint's assembling kind) for llama.cpp's tensors as the GGUF reader names them:
    whole parameters and buffers read as `<name>.weight`, the router's scales as `.scale` of ffn_gate_inp /
    ffn_down_exps; on GGUF out (split) the inverse, and the rope_freqs tensor before the embeddings."""

    _READ = (
        (r"(.+)\.(layer_scalar|experts\.gate_up_proj|experts\.down_proj)\.weight", r"\1.\2"),
        (r"(.+)\.router\.proj\.scale", r"\1.router.scale"),
        (r"(.+)\.experts\.down_proj\.scale", r"\1.router.per_expert_scale"),
    )

    def __init__(self, config: Any = None):
        self.config = config

    def piece(self, name: str) -> tuple[str, str] | None:
        for pattern, target in self._READ:
            if re.fullmatch(pattern, name):
                return re.sub(pattern, target, name), "whole"
        return None

    def pieces(self, name: str) -> int:
        return 1

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        t = got["whole"]
        if t.numel() != torch.Size(shape).numel():
            raise CheckpointError(f"{source}: {name!r} from llama.cpp's {tuple(t.shape)} does not fit the model's "
                                  f"{tuple(shape)}")  # fmt: skip
        return t.reshape(shape).contiguous()

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if name.endswith(".router.scale"):
            return [(name.replace(".router.scale", ".router.proj.scale"), t)]
        if name.endswith(".router.per_expert_scale"):
            return [(name.replace(".router.per_expert_scale", ".experts.down_proj.scale"), t)]
        if name == "model.embed_tokens.weight" and self.config is not None:
            return [("rope_freqs.weight", rope_freqs(self.config)), (name, t)]
        return None


@dataclass(frozen=True)
class SplitExperts(GGUFExperts):
    """Reading only: a file with the experts' gate and up apart (ffn_gate_exps / ffn_up_exps, which llama.cpp's
    graph takes too) joined into gate_up_proj; GGUF out writes them fused, as the converter does."""

    def split(self, name: str, t: torch.Tensor) -> None:
        return None


def with_rules(rules: CheckpointRules, config: Any) -> CheckpointRules:
    """The family's checkpoint rules and, first, its GGUF ones: Gemma4GGUF (with the config: GGUF out's
    rope_freqs), SplitExperts, the file's rope_freqs skipped on reading (the config holds it)."""
    return CheckpointRules([Gemma4GGUF(config), SplitExperts(), Ignored(r"rope_freqs\.weight"), *rules.rules])


def rope_freqs(c: Any) -> torch.Tensor:
    """Gemma4Model.generate_extra_tensors: the full layers' proportional RoPE as a divisor per frequency."""
    rope = c.rope_parameters.get("full_attention") or {}
    hd = c.kind_head_dim("full_attention")
    rotated = int(hd * rope.get("partial_rotary_factor", 1.0) / 2)
    return torch.tensor([1.0] * rotated + [_UNROTATED] * (hd // 2 - rotated), dtype=torch.float32)


def _refuse(c: Any, field: str, why: str) -> None:
    raise ConfigError(f"llama.cpp's 'gemma4' format cannot hold this {c.model_type!r} model: {why} ({field})")


def write_config(out: dict[str, Any], c: Any) -> None:
    """What Gemma4Model.set_gguf_parameters writes beyond autolm's common keys (the module docstring); a full-
    layer RoPE llama.cpp cannot run refused."""
    rope = c.rope_parameters.get("full_attention") or {}
    if rope.get("rope_type") != "proportional":
        _refuse(
            c, "rope_parameters['full_attention'] rope_type", "the converter writes proportional RoPE only"
        )
    if rope.get("factor", 1.0) != 1.0:
        _refuse(c, "rope_parameters['full_attention'] factor", "its graph has no proportional RoPE factor")
    n, types, hd_full = c.num_hidden_layers, c.layer_types, c.kind_head_dim("full_attention")
    out["attention.key_length"] = out["attention.value_length"] = out["rope.dimension_count"] = hd_full
    out["attention.key_length_swa"] = out["attention.value_length_swa"] = c.head_dim
    out["rope.dimension_count_swa"] = c.head_dim
    out["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in types]
    out["embedding_length_per_layer_input"] = c.hidden_size_per_layer_input or 0
    if c.sliding_window is not None:
        out["attention.sliding_window"] = c.sliding_window
    first_shared = n - c.num_kv_shared_layers
    if c.use_double_wide_mlp:
        out["feed_forward_length"] = [c.intermediate_size * (1 if i < first_shared else 2) for i in range(n)]
    if _global_kv_given(c):
        full = types.index("full_attention")
        out["attention.head_count_kv"] = [c.num_key_value_heads if t == "sliding_attention" else
                                          c.layer_kv_heads(full) for t in types]  # fmt: skip


def _global_kv_given(c: Any) -> bool:
    """Whether config.json names the full layers' KV heads (the converter then writes them per layer)."""
    if c.extra.get("num_global_key_value_heads") is not None:
        return True
    table = c.extra.get("per_layer_config") or {}
    return any(
        c.layer_types[int(i)] == "full_attention" and "num_key_value_heads" in e for i, e in table.items()
    )


def compared(c: Any) -> dict[str, Any]:
    """What GGUF out compares of a config beside its fields (gguf_plan._computed): each layer's heads, values and
    MLP width, the per-layer inputs, the proportional RoPE tables."""
    n, sources, p = c.num_hidden_layers, kv_sources(c), c.hidden_size_per_layer_input or 0
    full = {k: r for k, r in c.own_rope_kinds().items() if r.get("rope_type") == "proportional"}
    return {
        "layer head sizes": [c.layer_head_dim(i) for i in range(n)],
        "layer KV heads": [c.layer_kv_heads(i) for i in range(n)],
        "layers whose values are their keys": [
            c.attention_k_eq_v and sources[i] is None and t == "full_attention"
            for i, t in enumerate(c.layer_types)
        ],
        "layer MLP widths": [
            c.intermediate_size * (2 if c.use_double_wide_mlp and s is not None else 1) for s in sources
        ],
        "per-layer inputs": (p, c.vocab_size_per_layer_input if p else None),
        "proportional RoPE": {
            k: proportional_inv_freq(r, c.kind_head_dim(k)).tolist() for k, r in full.items()
        },
    }


def derive(d: dict[str, Any], get) -> None:
    """The config llama.cpp reads of a gemma4 file (the module docstring), in config.json's terms."""
    has_v = {int(k[len(_V) :]) for k in [k for k in d if k.startswith(_V)] if d.pop(k)}
    rope = d.get("rope_parameters") or {}
    freqs = rope.pop(_FREQS, None)
    n, flags = d.get("num_hidden_layers"), get("attention.sliding_window_pattern")
    if not isinstance(n, int) or n <= 0 or not isinstance(flags, list) or len(flags) < n:
        raise ConfigError(
            f"a gemma4 GGUF needs attention.sliding_window_pattern, a flag per layer, found {flags!r}"
        )
    types = d["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags[:n]]
    hd_full = get("attention.key_length")
    d["head_dim"], d["global_head_dim"] = get("attention.key_length_swa", hd_full), hd_full
    shared = d.get("num_kv_shared_layers") or 0
    own_full = [i for i, t in enumerate(types) if t == "full_attention" and i < n - shared]
    d["attention_k_eq_v"] = any(i not in has_v for i in own_full)
    d["vocab_size_per_layer_input"] = d.get("vocab_size")
    d["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", rope["rope_theta"])},
        "full_attention": {"rope_type": "proportional", "rope_theta": rope["rope_theta"],
                           "partial_rotary_factor": _partial(freqs, hd_full)},
    }  # fmt: skip
    _per_layer_sizes(d, types, n - shared)


def _partial(freqs: list[float] | None, hd_full: Any) -> float:
    """partial_rotary_factor of the full layers' rope_freqs: its leading 1s (rotated) of head_dim / 2."""
    if freqs is None:
        return 1.0
    rotated = sum(1 for f in freqs if f == 1.0)
    if any(f != 1.0 and f < _UNROTATED / 2 for f in freqs) or freqs[:rotated] != [1.0] * rotated:
        raise ConfigError("a gemma4 GGUF's rope_freqs must be 1 for the rotated frequencies, then 1e30 (as the "
                          "converter writes the full layers' proportional RoPE)")  # fmt: skip
    return rotated / (len(freqs) or 1)


def _per_layer_sizes(d: dict[str, Any], types: list[str], first_shared: int) -> None:
    """head_count_kv and feed_forward_length given per layer -> the sliding layers' KV heads and the full
    layers' (num_global_key_value_heads with attention_k_eq_v, else per_layer_config), the MLP width and
    use_double_wide_mlp."""
    kv = d.get("num_key_value_heads")
    if isinstance(kv, list):
        swa = [k for k, t in zip(kv, types) if t == "sliding_attention"]
        full = [k for k, t in zip(kv, types) if t == "full_attention"]
        d["num_key_value_heads"] = swa[0] if swa else full[0]
        if len(set(swa)) > 1 or len(set(full)) > 1:
            raise ConfigError(f"a gemma4 GGUF's attention.head_count_kv must be one value for the sliding layers "
                              f"and one for the full ones, found {kv}")  # fmt: skip
        if full and d["attention_k_eq_v"]:
            d["num_global_key_value_heads"] = full[0]
        elif full:
            entry = {"head_dim": d["global_head_dim"], "num_key_value_heads": full[0]}
            d["per_layer_config"] = {str(i): entry for i, t in enumerate(types) if t == "full_attention"}
    ff = d.get("intermediate_size")
    if isinstance(ff, list):
        want = [ff[0] * (1 if i < first_shared else 2) for i in range(len(types))]
        if ff != want:
            raise ConfigError(f"a gemma4 GGUF's feed_forward_length per layer must double over the KV-shared "
                              f"layers only (use_double_wide_mlp), found {ff}")  # fmt: skip
        d["intermediate_size"], d["use_double_wide_mlp"] = ff[0], True


# the tokens the converter types USER_DEFINED so that llama.cpp always renders them (for its chat parser)
VISIBLE = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                     "<tool_response|>", '<|"|>'})  # fmt: skip


def write_vocab(writer, spec: dict[str, Any], tokens: list[str], types: list[int]) -> None:
    """Gemma4Model.set_vocab: tokens with gguf-py's LlamaHfVocab types (an added token of the model's own
    vocabulary that is not special is NORMAL), the VISIBLE markers USER_DEFINED, the merges as gguf-py's
    SpecialVocab writes them (a space inside a half as U+0120)."""
    base = spec["model"]["vocab"]
    for i, t in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types[i] = 6
        elif t in VISIBLE:
            types[i] = 4
        elif types[i] == 4 and t in base:
            types[i] = 1
    merges = spec["model"].get("merges") or []
    writer.add_string("tokenizer.ggml.model", "gemma4")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m) for m in merges]
    )
    writer.add_bool("tokenizer.ggml.add_space_prefix", False)


# llama.cpp's Gemma 4 tensor names where they differ from Llama's (its ffn_norm is the pre-MLP norm)
LAYOUT = GGUFLayout(
    "gemma4",
    config=(
        ("final_logit_softcapping", "final_logit_softcapping"),
        ("attention.shared_kv_layers", "num_kv_shared_layers"),
        ("embedding_length_per_layer_input", "hidden_size_per_layer_input"),
        ("expert_count", "num_experts"),
        ("expert_used_count", "top_k_experts"),
        ("expert_feed_forward_length", "moe_intermediate_size"),
    ),
    layer=(
        ("post_attention_norm", "post_attention_layernorm"),
        ("ffn_norm", "pre_feedforward_layernorm"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
        ("pre_ffw_norm_2", "pre_feedforward_layernorm_2"),
        ("post_ffw_norm_1", "post_feedforward_layernorm_1"),
        ("post_ffw_norm_2", "post_feedforward_layernorm_2"),
        ("layer_output_scale", "layer_scalar"),
        ("ffn_gate_up_exps", "experts.gate_up_proj"),
        ("ffn_down_exps", "experts.down_proj"),
        ("ffn_gate_exps", "experts.gate_proj"),  # SplitExperts' pieces
        ("ffn_up_exps", "experts.up_proj"),
        ("ffn_gate_inp", "router.proj"),
        ("inp_gate", "per_layer_input_gate"),
        ("proj", "per_layer_projection"),
        ("post_norm", "post_per_layer_input_norm"),
    ),
    top=(
        ("per_layer_token_embd", "model.embed_tokens_per_layer"),
        ("per_layer_model_proj", "model.per_layer_model_projection"),
        ("per_layer_proj_norm", "model.per_layer_projection_norm"),
        ("rope_freqs", "rope_freqs"),  # Gemma4GGUF's piece; ignored on reading (the config holds it)
    ),
    fixed=(("hidden_activation", "gelu_pytorch_tanh"), ("attention_bias", False)),
    derive=derive,
    write_config=write_config,
    present=(
        ("blk.0.ffn_gate_inp.weight", "enable_moe_block"),
        *((f"blk.{i}.attn_v.weight", f"{_V}{i}") for i in range(1024)),
    ),
    rope_tensors=(("rope_freqs.weight", _FREQS),),
    write_vocab=write_vocab,
)
