"""What GGUF out puts in a file, before any of it is written: the metadata keys and the tensors as llama.cpp's
converter (convert_hf_to_gguf.py) makes them of a model, and the check that the file describes the model.

The family's `GGUFLayout` drives it, the inverse of what the reader (autolm.sources.gguf) does with it:
- metadata: the keys every converter writes (TextModel.set_gguf_parameters: sizes, head counts, the head size
  as key/value length, RoPE base and linear / YaRN scaling of the global layers, the sliding layers' base as
  rope.freq_base_swa), Llama's (vocabulary size, rope.dimension_count), the layout's own `config` keys, then the
  layout's `write_config(metadata, config)`, the inverse of its `derive` (Phi-3's rotary dimensions, Mixtral's
  keys as "llama");
- tensors: renamed by the layout, `norm_shift` added to the norms (Gemma), q/k rows permuted (`permute_qk`),
  Conv1D weights transposed (`transposed`), stacked experts split into llama.cpp's ffn_{gate,up,down}_exps by
  the family's checkpoint rule that assembles them on reading (`split`), RoPE parameters written as tensors
  (`rope_tensors`: Phi-3's LongRoPE factors).

`check` then reads the planned metadata and tensor names back as the reader would (config_from_gguf) and
compares the config with the model's wherever it changes what the model computes (sizes, activations, biases,
soft-caps, every layer's window and RoPE table, the RoPE frequencies and scaling). Where llama.cpp's format
cannot say what the model does (a Gemma attention scale it does not derive, SmolLM3 NoPE layers off its fixed
interval, Qwen-MoE dense layers, a gpt-oss SwiGLU limit but its own), that is a ConfigError naming the model
type and the fields: a file is never written that loads as another model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ._util import own_names
from .errors import ConfigError
from .nn.rope import inv_freq_and_scale
from .sources.gguf import _CONFIG_KEYS, _LAYER_NAMES, _TOP_NAMES, ROPE_FREQS, config_from_gguf

logger = logging.getLogger("autolm.gguf")
# RoPE parameters of YaRN scaling -> llama.cpp's keys (TextModel.set_gguf_parameters)
_YARN = (
    ("rope.scaling.original_context_length", "original_max_position_embeddings"),
    ("rope.scaling.yarn_ext_factor", "extrapolation_factor"),
    ("rope.scaling.yarn_attn_factor", "attention_factor"),
    ("rope.scaling.yarn_beta_fast", "beta_fast"),
    ("rope.scaling.yarn_beta_slow", "beta_slow"),
)
# config fields that do not change what the model computes (or are compared through layer_window / RoPE)
_NOT_COMPARED = {
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "extra",
    "name_or_path", "use_cache", "rope_spelling", "rope_parameters", "sliding_window", "use_sliding_window",
    "layer_types", "max_window_layers", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "no_rope_layer_interval", "input_jitter_noise",
}  # fmt: skip
# llama.cpp tensors the converter keeps in F32 whatever the type asked for (besides 1-D ones and biases), by the
# name's last part: routers, learned positions, the recurrent layers' convolutions (ssm_conv1d, shortconv.conv,
# Kimi Linear's ssm_conv1d_q/k/v)
F32_TENSORS = ("ffn_gate_inp", "ffn_gate_inp_shexp", "position_embd", "ssm_conv1d", "conv", "ssm_conv1d_q",
               "ssm_conv1d_k", "ssm_conv1d_v")  # fmt: skip


def metadata(model) -> dict[str, Any]:
    """The "<arch>.*" metadata (keys without the prefix) the family's converter writes for `model`."""
    c, layout = model.config, model.gguf
    out: dict[str, Any] = {}
    windowed = any(c.layer_window(i) for i in range(c.num_hidden_layers))
    for key, field in [*_CONFIG_KEYS.items(), *layout.config]:
        value = getattr(c, field, None)
        if value is None or isinstance(value, bool) or (field == "sliding_window" and not windowed):
            continue
        out[key] = value
    if getattr(c, "head_dim", None) is not None:
        out["attention.key_length"] = out["attention.value_length"] = c.head_dim
    rope_kinds = c.rope_parameters or {}
    rope = rope_kinds.get("full_attention", rope_kinds)  # per layer type (Gemma 3): the global layers'
    out["rope.freq_base"] = float(rope.get("rope_theta", 10000.0))
    if "rope_theta" in rope_kinds.get("sliding_attention", {}):
        out["rope.freq_base_swa"] = float(rope_kinds["sliding_attention"]["rope_theta"])
    if rope.get("rope_type") in ("linear", "yarn") and rope.get("factor") is not None:
        out["rope.scaling.type"] = rope["rope_type"]
        out["rope.scaling.factor"] = float(rope["factor"])
    if rope.get("rope_type") == "yarn":
        # llama.cpp reads these as floats (a config's integer beta_fast too: an integer key would be refused)
        out.update((key, rope[name] if "context" in key else float(rope[name])) for key, name in _YARN
                   if rope.get(name) is not None)  # fmt: skip
    if layout.write_config is not None:
        layout.write_config(out, c)
    return out


def _split_rules(model) -> list:
    return [r for r in getattr(model.checkpoint_rules, "assembled", ()) if hasattr(r, "split")]


def _names(model) -> dict[str, dict[str, str]]:
    """HF module path inside a decoder layer / at the top -> llama.cpp's tensor name stem."""
    layout = model.gguf
    layer = {v: k for k, v in _LAYER_NAMES.items()} | {v: k for k, v in layout.layer}
    top = {v: k for k, v in _TOP_NAMES.items()} | {v: k for k, v in layout.top}
    blocks = None  # the layers' paths -> their block numbers, where the layout numbers them its own way
    if layout.block_prefix is not None:
        meta = metadata(model)
        paths = (layout.block_prefix(i, meta.get) for i in range(model.config.num_hidden_layers))
        blocks = {path: i for i, path in enumerate(paths) if path is not None}
    return {"layer": layer, "top": top, "blocks": blocks}


def _in_block(name: str, model, names: dict) -> tuple[int | str, str] | None:
    """(block number, the name inside its layer) for a decoder layer's parameter, else None."""
    if names.get("blocks") is not None:  # GGUFLayout.block_prefix
        inside = ((i, name[len(p) + 1 :]) for p, i in names["blocks"].items() if name.startswith(p + "."))
        return next(inside, None)
    prefix = model.layers_prefix + "."
    if name.startswith(prefix):
        index, _, rest = name[len(prefix) :].partition(".")
        return index, rest
    return None


def gguf_name(name: str, model, names: dict) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'; a parameter the layout names whole
    ('self_attn.sinks', HRM-Text's 'model.z_L_init') gets '.weight' (None: not a tensor llama.cpp reads)."""
    block = _in_block(name, model, names)
    if block is not None:
        index, rest = block
        module, _, kind = rest.rpartition(".")
        if module in names["layer"]:
            return f"blk.{index}.{names['layer'][module]}.{kind}"
        return f"blk.{index}.{names['layer'][rest]}.weight" if rest in names["layer"] else None
    if name in names["top"]:
        return f"{names['top'][name]}.weight"
    module, _, kind = name.rpartition(".")
    stem = names["top"].get(module)
    return None if stem is None else f"{stem}.{kind}"


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (HF rotate-half rows -> interleaved pairs); kernels.llama_qk_order undoes it."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for every tensor of the file, in the converter's layout (module docstring)."""
    c, layout, names, rules = model.config, model.gguf, _names(model), _split_rules(model)
    rope = c.rope_parameters or {}
    for out, key in layout.rope_tensors:
        if rope.get(key) is not None:
            yield out, torch.tensor(rope[key], dtype=torch.float32)
    if rope.get("rope_type") == "llama3":  # as llama.cpp's converter: each frequency's divisor
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        plain, _ = inv_freq_and_scale({"rope_theta": rope.get("rope_theta", 10000.0)}, head_dim, 0)
        scaled, _ = inv_freq_and_scale(rope, head_dim, c.max_position_embeddings)
        yield ROPE_FREQS, plain / scaled
    stacks: dict[str, dict[int, torch.Tensor]] = {}  # GGUFLayout.stacked: members collected until all came
    with own_names(model):
        state = model.state_dict()
    for name, t in state.items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        member = _stack_member(name, model)
        if member is not None:
            out, i, n = member
            got = stacks.setdefault(out, {})
            got[i] = t
            if len(got) == n:
                del stacks[out]
                yield out, torch.stack([got[j] for j in range(n)])
            continue
        pieces = next((p for p in (r.split(name, t) for r in rules) if p is not None), [(name, t)])
        for piece, w in pieces:
            out = gguf_name(piece, model, names)
            if out is None:
                raise ConfigError(f"tensor {piece!r} has no llama.cpp name in the {layout.arch!r} layout")
            if out.split(".")[-2] in layout.bare:  # llama.cpp's name without the suffix (GGUFLayout.bare)
                out = out.removesuffix(".weight")
            yield out, _converted(w, out, piece, model)


def _stack_member(name: str, model) -> tuple[str, int, int] | None:
    """(llama.cpp name, member index, member count) for a parameter of a ModuleList the converter stacks into one
    tensor (GGUFLayout.stacked: StableLM's per-head q/k norms), else None."""
    prefix = model.layers_prefix + "."
    if not model.gguf.stacked or not name.startswith(prefix):
        return None
    index, _, rest = name[len(prefix) :].partition(".")
    for stem, members in model.gguf.stacked:
        i, _, kind = rest.removeprefix(members + ".").partition(".")
        if rest.startswith(members + ".") and i.isdigit() and kind in ("weight", "bias"):
            n = len(model.get_submodule(f"{prefix}{index}.{members}"))
            return f"blk.{index}.{stem}.{kind}", int(i), n
    return None


def _converted(t: torch.Tensor, out: str, name: str, model) -> torch.Tensor:
    layout, c = model.gguf, model.config
    if layout.permute_qk and (".attn_q." in out or ".attn_k." in out):
        t = permute(t, c.num_attention_heads if ".attn_q." in out else c.num_key_value_heads)
    if layout.permute_qk_norm and (".attn_q_norm." in out or ".attn_k_norm." in out) and t.dim() == 2:
        t = permute(t.reshape(-1), t.shape[0]).reshape(t.shape)  # each head's columns, as its q/k rows
    # the converter's grouping of the rows (GPT-NeoX's q/k/v): the reader's index inverted
    order = layout.rows(out, c)
    if order is not None:
        t = t[torch.argsort(order)]
    if out.endswith(".weight") and out.split(".")[-2] in layout.transposed:
        t = t.t().contiguous()  # GPT-2's Conv1D weights: llama.cpp's converter writes them (out, in)
    if layout.norm_shift and name.endswith(layout.norm_shift_suffix):
        t = t.float() + layout.norm_shift  # Gemma's (1 + w) norms, stored as 1 + w
    return t


class _Planned(SimpleNamespace):
    """The planned file as config_from_gguf reads a GGUFFile: metadata, tensor names, RoPE tensors' values."""

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.layout.unprefixed:
            return self.metadata.get(key, default)
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def values(self, t) -> list[float]:
        return [float(x) for x in self.rope[t.name].reshape(-1)]


def check(model, meta: dict[str, Any], names: list[str], rope: dict[str, torch.Tensor],
          shapes: dict[str, tuple[int, ...]] | None = None) -> None:  # fmt: skip
    """ConfigError unless the config the reader makes of this metadata and these tensors (their shapes in GGUF's
    order, where given) computes as the model's does (see the module docstring)."""
    c, layout, shapes = model.config, model.gguf, shapes or {}
    planned = _Planned(family=type(model), layout=layout, architecture=layout.arch, rope=rope,
                       path=f"GGUF out of {c.model_type!r}",
                       tensors=[SimpleNamespace(name=n, shape=shapes.get(n)) for n in names],
                       metadata={k if k in layout.unprefixed else f"{layout.arch}.{k}": v
                                 for k, v in meta.items()})  # fmt: skip
    planned.metadata["tokenizer.ggml.tokens"] = range(c.vocab_size)  # the writer pads the vocabulary to it
    try:
        back = _computed(config_from_gguf(planned))
    except ConfigError as e:
        raise ConfigError(
            f"llama.cpp's {layout.arch!r} format cannot hold this {c.model_type!r} model ({e})"
        ) from None
    want = _computed(c)
    _windows_dropped(layout.arch, c.model_type, want, back)
    _epsilons_taken(layout.arch, c.model_type, want, back)
    differ = [f"{f} ({back.get(f)!r} for {v!r})" for f, v in want.items()
              if not f.startswith(("RoPE", "rope")) and not _same(v, back.get(f))]  # fmt: skip
    if any(f.startswith("RoPE") and not _same(v, back.get(f)) for f, v in want.items()):
        differ.append(f"RoPE ({back['rope_parameters']} for {want['rope_parameters']})")
    if differ:
        raise ConfigError(
            f"llama.cpp's {layout.arch!r} format cannot hold this {c.model_type!r} model: the file its converter "
            f"writes would load with other {', '.join(differ)}"
        )


def _windows_dropped(arch: str, model_type: str, want: dict[str, Any], back: dict[str, Any]) -> None:
    """Sliding windows the format has no room for (llama.cpp's converter writes Mistral as "llama", StarCoder2 as
    "starcoder2", and their graphs attend over the whole context): written as the converter writes them, with a
    warning, since the model computes the same over prompts as long as the window; any other difference is
    refused."""
    if not _same(want["layer windows"], back["layer windows"]) and not any(back["layer windows"]):
        window = max(w for w in want["layer windows"] if w)
        logger.warning(
            "llama.cpp's %r format has no sliding window: the file attends over the whole context where this %r "
            "model attends over the last %d tokens (the same up to %d tokens)",
            arch,
            model_type,
            window,
            window,
        )
        want["layer windows"] = back["layer windows"]


# epsilons a format holds no key for, its graph taking another one's value instead (llama.cpp norms Falcon-Mamba's
# dt, B and C at the layers' epsilon): written as the converter writes them, with a warning
_EPSILONS_TAKEN = ("mixer_rms_eps",)


def _epsilons_taken(arch: str, model_type: str, want: dict[str, Any], back: dict[str, Any]) -> None:
    for field in _EPSILONS_TAKEN:
        if field in want and not _same(want[field], back.get(field)):
            logger.warning(
                "llama.cpp's %r format has no %s: the file computes with %g where this %r model uses %g",
                arch,
                field,
                back.get(field),
                model_type,
                want[field],
            )
            want[field] = back.get(field)


def _computed(c) -> dict[str, Any]:
    """What of a config changes the model's computation, comparable across configs."""
    skip = _NOT_COMPARED | set(getattr(c, "gguf_not_compared", ()))  # fields a family compares its own way
    out = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in skip}
    out.update(c.gguf_compared() if hasattr(c, "gguf_compared") else {})
    n = c.num_hidden_layers
    out["rope_parameters"] = c.rope_parameters  # shown; compared through the frequencies below
    out["layer windows"] = [c.layer_window(i) for i in range(n)]
    out["layer RoPE"] = [c.layer_rope(i) for i in range(n)] if hasattr(c, "layer_rope") else None
    # the width RoPE turns: a family's own (dots3 Note's qk_rope_head_dim, its head_dim in no file) or the head's
    head_dim = (
        getattr(c, "rope_head_dim", None)
        or getattr(c, "head_dim", None)
        or c.hidden_size // c.num_attention_heads
    )
    partial = getattr(c, "partial_rotary_default", False)
    for kind, rope in c.rope_kinds().items():
        for length in (None, 1 << 20):  # LongRoPE's short and long factors, dynamic RoPE's growth
            freq, scale = inv_freq_and_scale(rope, head_dim, c.max_position_embeddings, length, partial)
            out[f"RoPE {kind!r} at {length or 'start'}"] = (freq.numpy(), scale)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=0)
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b
