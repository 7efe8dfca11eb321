"""GGUF in and out of Muse Glimmer's language model as llama.cpp (0.3.36) writes and runs it: its converter
(conversion/muse_glimmer.py, MuseGlimmerModel) and its "muse-glimmer" graph (src/models/muse-glimmer.cpp).

- The converter adds 1 to the four layer norms (HF names ending "layernorm.weight") and not to the final norm;
  the q/k rows are permuted for llama.cpp's interleaved RoPE (as Llama's);
- `qk_scale_factor` goes in as tensors: each layer's attn_q_norm a head_dim vector holding it, attn_k_norm ones
  (the weightless q/k norms times those). Reading takes qk_scale_factor from them (every value the same, the k norms
  ones, else a ConfigError) and drops them; writing makes them from the config (QKNormOut);
- metadata: TextModel's keys, final_logit_softcapping, logit_scale (output_multiplier), the window and
  attention.sliding_window_pattern (a flag per layer).

The graph fixes what the file does not say: the post-sublayer norms' epsilon at 1e-8, SiLU, no attention biases,
RoPE on exactly the sliding layers (rope_parameters' theta) and an untied head (output.weight required). Reading
sets those; GGUF out refuses a model that differs (a ConfigError naming the field)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, GGUFLayout, Ignored
from .gemma2 import GEMMA_GGUF_LAYER

ARCH = "muse-glimmer"
POST_NORM_EPS = 1e-8  # llama.cpp's graph: post_norm_eps
_Q, _K = "gguf_attn_q_norm_", "gguf_attn_k_norm_"  # the q/k norms' values in the rope dict (rope_tensors)
_MAX_BLOCKS = 256  # blocks whose q/k norms are read (Muse Glimmer 30B: 52)
# the q/k norm tensors of a file (autolm's norms hold no weights): read into the config, not the model
QK_NORMS_IGNORED = Ignored(r"model\.layers\.\d+\.self_attn\.[qk]_norm\.weight")


class QKNormOut:
    """Checkpoint rule for GGUF out: each layer's q_proj comes with the q/k norm weights the converter synthesizes
    (attn_q_norm: qk_scale_factor in every place, attn_k_norm: ones); nothing to assemble on reading."""

    def __init__(self, config: Any = None):
        self.config = config

    def piece(self, name: str) -> None:
        return None

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        m = re.fullmatch(r"(.+\.self_attn)\.q_proj\.weight", name)
        if m is None or self.config is None:
            return None
        hd = self.config.head_dim
        q = torch.full((hd,), float(self.config.qk_scale_factor), dtype=torch.float32)
        return [(f"{m[1]}.q_norm.weight", q), (f"{m[1]}.k_norm.weight", torch.ones(hd)), (name, t)]


def with_rules(rules: CheckpointRules, config: Any) -> CheckpointRules:
    """The family's checkpoint rules with GGUF's: the q/k norms written (QKNormOut) and, read, dropped."""
    return CheckpointRules([QKNormOut(config), QK_NORMS_IGNORED, *rules.rules])


def _refuse(c: Any, field: str, why: str) -> None:
    raise ConfigError(f"llama.cpp's {ARCH!r} format cannot hold this {c.model_type!r} model: {why} ({field})")


def write_config(out: dict[str, Any], c: Any) -> None:
    """MuseGlimmerModel.set_gguf_parameters' keys beyond autolm's common ones; what the graph runs otherwise refused."""
    n = c.num_hidden_layers
    sliding = [t == "sliding_attention" for t in c.layer_types]
    if c.tie_word_embeddings:
        _refuse(c, "tie_word_embeddings", "llama.cpp's graph needs an untied head (output.weight)")
    if not math.isclose(c.post_norm_eps, POST_NORM_EPS, rel_tol=1e-6):
        _refuse(c, "post_norm_eps", f"llama.cpp's graph norms after the sublayers at {POST_NORM_EPS:g}")
    if c.hidden_act != "silu":
        _refuse(c, "hidden_activation", "llama.cpp's graph runs a SiLU-gated MLP")
    if c.attention_bias:
        _refuse(c, "attention_bias", "llama.cpp's graph reads no attention biases")
    if [bool(c.layer_rope_theta[i]) for i in range(n)] != sliding:
        _refuse(c, "layer_rope_theta", "llama.cpp's graph rotates exactly the sliding layers (layer_types)")
    if not c.sliding_window:
        _refuse(c, "sliding_window", "llama.cpp's graph needs attention.sliding_window")
    out["attention.sliding_window"] = c.sliding_window
    out["attention.sliding_window_pattern"] = sliding
    out["final_logit_softcapping"] = float(c.final_logit_softcapping)
    out["logit_scale"] = float(c.output_multiplier)


def _one_value(rope: dict[str, Any], prefix: str, n: int, what: str) -> float:
    """The one value every layer's q (or k) norm holds, popped from the rope dict; a ConfigError otherwise."""
    got = {i: rope.pop(f"{prefix}{i}") for i in range(_MAX_BLOCKS) if f"{prefix}{i}" in rope}
    if sorted(got) != list(range(n)):
        raise ConfigError(
            f"a {ARCH} GGUF needs blk.N.{what}.weight in each of its {n} blocks, found {sorted(got)}"
        )
    values = {v for vs in got.values() for v in vs}
    if len(values) != 1:
        raise ConfigError(f"{what}: a {ARCH} GGUF's {what} weights must hold one value (qk_scale_factor for "
                          f"attn_q_norm, 1 for attn_k_norm), found {sorted(values)[:8]}")  # fmt: skip
    return values.pop()


def derive(d: dict[str, Any], get) -> None:
    """The config llama.cpp reads of a muse-glimmer file (the module docstring), in config.json's terms."""
    n, rope = d.get("num_hidden_layers"), d.get("rope_parameters") or {}
    if not isinstance(n, int) or n <= 0:
        return  # the config's validation names what is wrong
    d["qk_scale_factor"] = _one_value(rope, _Q, n, "attn_q_norm")
    if _one_value(rope, _K, n, "attn_k_norm") != 1.0:
        raise ConfigError(f"attn_k_norm: a {ARCH} GGUF's k norms must be ones (autolm's are weightless)")
    flags = get("attention.sliding_window_pattern", 4)
    if isinstance(flags, list):
        if len(flags) < n:
            raise ConfigError(f"attention.sliding_window_pattern: {len(flags)} flags for {n} layers")
        flags = [bool(f) for f in flags[:n]]
    elif not _is_int(flags) or flags < 0:
        raise ConfigError(
            f"attention.sliding_window_pattern must be a flag per layer or a count, found {flags!r}"
        )
    else:  # llama.cpp's load_swa_pattern: every n-th layer full (0: none)
        flags = [flags == 0 or i % flags < flags - 1 for i in range(n)]
    d["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags]
    d["layer_rope_theta"] = [rope.get("rope_theta", 10000.0) if f else 0 for f in flags]
    if not get("final_logit_softcapping"):
        raise ConfigError(f"final_logit_softcapping: a {ARCH} GGUF without one is not supported")


LAYOUT = GGUFLayout(
    ARCH,
    config=(
        ("attention.key_length", "head_dim"),
        ("final_logit_softcapping", "final_logit_softcapping"),
        ("logit_scale", "output_multiplier"),
    ),
    layer=(("attn_gate", "self_attn.gate_proj"), *GEMMA_GGUF_LAYER),
    permute_qk=True,
    fixed=(("post_norm_eps", POST_NORM_EPS), ("hidden_activation", "silu"), ("attention_bias", False)),
    norm_shift=1.0,
    norm_shift_suffix="layernorm.weight",
    derive=derive,
    write_config=write_config,
    rope_tensors=tuple(
        (f"blk.{i}.attn_{qk}_norm.weight", f"{key}{i}")
        for i in range(_MAX_BLOCKS)
        for qk, key in (("q", _Q), ("k", _K))
    ),
)
