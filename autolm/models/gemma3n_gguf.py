"""Gemma 3n as llama.cpp's Gemma3NModel converter writes it (arch "gemma3n", conversion/gemma.py), and what
llama.cpp's graph (src/models/gemma3n.cpp) runs of it.

Metadata: Gemma3Model's keys (no norm shift: Gemma 3n's norms are times w; feed_forward_length one per layer; the
full layers' RoPE base as rope.freq_base, the sliding ones' as rope.freq_base_swa), altup.active_idx,
altup.num_inputs, embedding_length_per_layer_input, attention.shared_kv_layers, activation_sparsity_scale (the
normal quantile of each layer's sparsity: -inf for 0) and attention.sliding_window_pattern (a flag per layer, true:
sliding).

Tensors: gguf-py's names; correct_output_scale as altup_correct_scale.weight; the AltUp (un)embedding projections
stacked into one (n - 1, h, h) tensor each (altup_proj, altup_unembd_proj); the token and per-layer embeddings
padded with zero rows to vocab_size.

llama.cpp's graph fixes what the converter does not write, and GGUF out refuses a model that differs, naming the
field (read back, a file gives these values): four AltUp streams, the first active, correct_output_scale applied,
laurel_rank 64, hidden_size_per_layer_input 256, one
intermediate_size for all layers, activation sparsity 0.95 on the first 10 layers and none after,
keys and values shared from layer 20 on (num_kv_shared_layers = num_hidden_layers - 20, or 0 under 21 layers),
tanh GeLU, no attention biases, plain RoPE, final soft-capping at 30 (the file's value is not read). Differences it keeps: llama.cpp's sparsity cut-off
takes the unbiased std (transformers' the biased one: a tiny shift of the cut-off), and token ids from
vocab_size_per_layer_input on read zero per-layer embeddings (transformers' read row 0): the file's per-layer
table has vocab_size rows, so a model read from GGUF has vocab_size_per_layer_input = vocab_size.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..nn import CheckpointRules, GGUFLayout
from .gemma4_small import kv_sources

# config fields GGUF out does not compare: training only, or written as the converter does (the module docstring)
NOT_COMPARED = ("query_pre_attn_scalar", "attn_logit_softcapping", "use_bidirectional_attention",
                "vocab_size_per_layer_input", "altup_coef_clip")  # fmt: skip
_KV_FROM = 20  # llama.cpp's n_layer_kv_from_start for gemma3n
_SPARSE = 10  # llama.cpp's n_layer_sparsity (at 0.95)
_SOFTCAP = 30.0  # llama.cpp's f_final_logit_softcapping (gemma3n does not read the file's)


def compared(c: Any) -> dict[str, Any]:
    return {}


def _quantile(s: float) -> float:
    return float(torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(s, dtype=torch.float32)))


class Gemma3nGGUF:
    """Checkpoint rule (nn.checkpoint's assembling kind) for llama.cpp's tensors as the GGUF reader names them:
    correct_output_scale read as `<name>.weight`; on GGUF out (split) the inverse, the AltUp projections stacked
    (one tensor once all came) and the embeddings padded to vocab_size."""

    def __init__(self, config: Any = None):
        self.config = config
        self.members: dict[str, dict[int, torch.Tensor]] = {}

    def piece(self, name: str) -> tuple[str, str] | None:
        m = re.fullmatch(r"(.+\.altup\.correct_output_scale)\.weight", name)
        return (m.group(1), "whole") if m else None

    def pieces(self, name: str) -> int:
        return 1

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        t = got["whole"]
        if t.numel() != torch.Size(shape).numel():
            raise CheckpointError(f"{source}: {name!r} from llama.cpp's {tuple(t.shape)} does not fit the model's "
                                  f"{tuple(shape)}")  # fmt: skip
        return t.reshape(shape)

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        m = re.fullmatch(
            r"(model\.altup_(?:un)?embed_projections|model\.altup_projections)\.(\d+)\.weight", name
        )
        if m:
            got = self.members.setdefault(m.group(1), {})
            got[int(m.group(2))] = t
            if len(got) < self.config.altup_num_inputs - 1:
                return []
            del self.members[m.group(1)]
            return [(f"{m.group(1)}.weight", torch.stack([got[i] for i in range(len(got))]))]
        if name.endswith(".altup.correct_output_scale"):
            return [(f"{name}.weight", t)]
        if name in ("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight"):
            rows = self.config.vocab_size - t.shape[0]
            if rows > 0:
                return [(name, torch.cat([t, t.new_zeros(rows, t.shape[1])]))]
        return None


def with_rules(rules: CheckpointRules, config: Any) -> CheckpointRules:
    """The family's checkpoint rules and, first, its GGUF one."""
    return CheckpointRules([Gemma3nGGUF(config), *rules.rules])


def _refuse(c: Any, field: str, why: str) -> None:
    raise ConfigError(
        f"llama.cpp's 'gemma3n' format cannot hold this {c.model_type!r} model: {why} ({field})"
    )


def write_config(out: dict[str, Any], c: Any) -> None:
    """What Gemma3NModel.set_gguf_parameters writes beyond autolm's common keys (the module docstring); what
    llama.cpp's graph fixes refused where the model differs."""
    for field, want in (
        ("altup_num_inputs", 4),
        ("altup_active_idx", 0),
        ("hidden_size_per_layer_input", 256),
    ):
        if getattr(c, field) != want:
            _refuse(c, field, f"its graph runs {want} only")
    if len(set(c.intermediate_size)) > 1:
        _refuse(c, "intermediate_size", "its graph sizes every layer's MLP as the first one's")
    if c.final_logit_softcapping != _SOFTCAP:
        _refuse(
            c,
            "final_logit_softcapping",
            f"its graph soft-caps the logits at {_SOFTCAP} whatever the file says",
        )
    for kind, rope in c.rope_parameters.items():
        if rope.get("rope_type", "default") != "default":
            _refuse(c, f"rope_parameters[{kind!r}] rope_type", "its graph runs plain RoPE only")
    first = c.num_hidden_layers - c.num_kv_shared_layers
    llama = [first - (2 if t == "sliding_attention" else 1) for t in c.layer_types[first:]]
    if c.num_kv_shared_layers and kv_sources(c)[first:] != llama:
        _refuse(c, "layer_types", f"its graph reads the shared layers' keys and values from layers {first - 2} "
                f"(sliding) and {first - 1} (full)")  # fmt: skip
    out["attention.key_length"] = out["attention.value_length"] = c.head_dim
    out["rope.freq_base"] = c.rope_parameters["full_attention"]["rope_theta"]
    out["rope.freq_base_swa"] = c.rope_parameters["sliding_attention"]["rope_theta"]
    out["altup.active_idx"], out["altup.num_inputs"] = c.altup_active_idx, c.altup_num_inputs
    out["activation_sparsity_scale"] = [_quantile(s) for s in c.activation_sparsity_pattern]
    out["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]
    out["feed_forward_length"] = list(c.intermediate_size)


def derive(d: dict[str, Any], get) -> None:
    """The config llama.cpp runs of a gemma3n file (the module docstring), in config.json's terms."""
    n, flags = d.get("num_hidden_layers"), get("attention.sliding_window_pattern")
    if not isinstance(n, int) or n <= 0 or not isinstance(flags, list) or len(flags) < n:
        raise ConfigError(
            f"a gemma3n GGUF needs attention.sliding_window_pattern, a flag per layer, found {flags!r}"
        )
    d["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags[:n]]
    rope = d.get("rope_parameters") or {}
    d["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", 10000.0)},
        "full_attention": {"rope_type": "default", "rope_theta": rope.get("rope_theta", 1000000.0)},
    }
    d["vocab_size_per_layer_input"] = d.get("vocab_size")
    d["activation_sparsity_pattern"] = [0.95 if i < _SPARSE else 0.0 for i in range(n)]
    d["num_kv_shared_layers"] = max(0, n - _KV_FROM)
    d["final_logit_softcapping"] = _SOFTCAP
    if not isinstance(d.get("intermediate_size"), (int, list)):
        raise ConfigError(f"a gemma3n GGUF needs feed_forward_length, found {d.get('intermediate_size')!r}")


LAYOUT = GGUFLayout(
    "gemma3n",
    config=(
        ("final_logit_softcapping", "final_logit_softcapping"),
        ("attention.shared_kv_layers", "num_kv_shared_layers"),
        ("embedding_length_per_layer_input", "hidden_size_per_layer_input"),
        ("altup.active_idx", "altup_active_idx"),
        ("altup.num_inputs", "altup_num_inputs"),
        ("attention.key_length", "head_dim"),
    ),
    layer=(
        ("post_attention_norm", "post_attention_layernorm"),
        ("ffn_norm", "pre_feedforward_layernorm"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
        ("inp_gate", "per_layer_input_gate"),
        ("proj", "per_layer_projection"),
        ("post_norm", "post_per_layer_input_norm"),
        ("altup_correct_coef", "altup.correction_coefs"),
        ("altup_correct_scale", "altup.correct_output_scale"),
        ("altup_predict_coef", "altup.prediction_coefs"),
        ("altup_router", "altup.modality_router"),
        ("altup_router_norm", "altup.router_norm"),
        ("laurel_l", "laurel.linear_left"),
        ("laurel_r", "laurel.linear_right"),
        ("laurel_post_norm", "laurel.post_laurel_norm"),
    ),
    top=(
        ("per_layer_token_embd", "model.embed_tokens_per_layer"),
        ("per_layer_model_proj", "model.per_layer_model_projection"),
        ("per_layer_proj_norm", "model.per_layer_projection_norm"),
        ("altup_proj", "model.altup_projections"),
        ("altup_unembd_proj", "model.altup_unembed_projections"),
    ),
    # stacked over a ModuleList of the body (read back by the GGUF reader's top-level `stacked` entries)
    stacked=(
        ("altup_proj", "model.altup_projections"),
        ("altup_unembd_proj", "model.altup_unembed_projections"),
    ),
    fixed=(
        ("hidden_activation", "gelu_pytorch_tanh"),
        ("attention_bias", False),
        ("laurel_rank", 64),
        ("altup_correct_scale", True),
    ),
    derive=derive,
    write_config=write_config,
)
