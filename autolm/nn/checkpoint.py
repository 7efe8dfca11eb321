"""How a family's checkpoint names and lays out its tensors, when that differs from the model's own names.

transformers 5 keeps some checkpoints in their original layout and converts while loading (and back while
saving): Mixtral's `block_sparse_moe.experts.3.w1.weight` files become the model's stacked
`mlp.experts.gate_up_proj[3, :I]`. A family declares the same conversions as data, a list of rules:

- `Rename(checkpoint, model)`: regular expressions over names, one per direction;
- `Stacked(target, parts)`: per-expert tensors `<prefix>.experts.<e>.<part>` that the model holds as one
  parameter `<prefix>.experts.<target>` of shape (experts, sum of the parts' rows, ...);
- `Split(checkpoint, parts)`: one checkpoint tensor `<prefix><checkpoint>` the model holds as several,
  `<prefix><part>` for each part, its rows cut evenly in order (HRM-Text's fused `attn.gqkv_proj`);
- `Ignored(model)`: tensors some checkpoints carry that the model computes itself (old GPT-2 files' attention
  mask buffers), by a regular expression over the model's name for them: skipped while loading.

`CheckpointRules.to_model` maps one checkpoint name while loading; `Assembler` collects the pieces of a stacked
parameter until it is whole; `CheckpointRules.to_checkpoint` turns a state dict back into the checkpoint's
names for saving, so files autolm writes load in transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError


@dataclass(frozen=True)
class Rename:
    """A name change: `checkpoint` -> `model` while loading, `model_back` -> `checkpoint_back` while saving."""

    checkpoint: str
    model: str
    model_back: str
    checkpoint_back: str


@dataclass(frozen=True)
class Stacked:
    """Per-expert tensors held by the model as one stacked parameter (see the module docstring)."""

    target: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    """One checkpoint tensor held by the model as several (see the module docstring): name suffixes."""

    checkpoint: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Ignored:
    """Checkpoint tensors the model does not hold (see the module docstring): a full match of the model name."""

    model: str


class CheckpointRules:
    """A family's rules; an empty list means the checkpoint's names are the model's."""

    def __init__(self, rules: list[Rename | Stacked | Split | Ignored] | tuple = ()):
        self.rules = tuple(rules)
        self.renames = [r for r in rules if isinstance(r, Rename)]
        self.splits = [r for r in rules if isinstance(r, Split)]
        self.stacked = [r for r in rules if isinstance(r, Stacked)]
        self._ignored = [re.compile(r.model) for r in rules if isinstance(r, Ignored)]
        self._piece = {
            rule: re.compile(rf"(.+)\.experts\.(\d+)\.({'|'.join(map(re.escape, rule.parts))})")
            for rule in self.stacked
        }
        # rules that assemble a parameter from pieces their own way (nn.expert_formats: MXFP4, llama.cpp's experts)
        self.assembled = [r for r in rules if hasattr(r, "piece")]

    def __bool__(self) -> bool:
        return bool(self.renames or self.stacked or self.splits or self._ignored)

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        """The checkpoint's tensor as the model's pieces (Split rules, names still the checkpoint's), or None."""
        for r in self.splits:
            if name.endswith(r.checkpoint):
                prefix = name[: -len(r.checkpoint)]
                return [(prefix + part, c) for part, c in zip(r.parts, t.chunk(len(r.parts), 0), strict=True)]
        return None

    def ignores(self, name: str) -> bool:
        """Whether the tensor the model calls `name` (after to_model) is one the model does not hold."""
        return any(p.fullmatch(name) for p in self._ignored)

    def renamed(self, name: str) -> str:
        """A checkpoint's name for a module or tensor under the model's (the Rename rules only)."""
        for r in self.renames:
            name = re.sub(r.checkpoint, r.model, name)
        return name

    def to_model(self, name: str) -> tuple[str, tuple[Stacked, int, int] | None]:
        """(model name, None) for a whole tensor, or (model name of the stacked parameter, (rule, expert, part))."""
        name = self.renamed(name)
        for rule, pattern in self._piece.items():
            m = pattern.fullmatch(name)
            if m:
                return f"{m.group(1)}.experts.{rule.target}", (
                    rule,
                    int(m.group(2)),
                    rule.parts.index(m.group(3)),
                )
        for rule in self.assembled:
            hit = rule.piece(name)  # (model name, the piece's key) or None
            if hit is not None:
                return hit[0], (rule, hit[1])
        return name, None

    def to_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state dict under the checkpoint's names, stacked parameters split back into their pieces (views)."""
        out: dict[str, torch.Tensor] = {}
        targets = {f".experts.{r.target}": r for r in self.stacked}
        state_dict = self._fused(state_dict)
        for name, t in state_dict.items():
            rule = next((r for suffix, r in targets.items() if name.endswith(suffix)), None)
            if rule is None:
                out[self._back(name)] = t
                continue
            prefix = name[: -len(f".experts.{rule.target}")]
            rows = t.shape[1] // len(rule.parts)
            for e in range(t.shape[0]):
                for i, part in enumerate(rule.parts):
                    out[self._back(f"{prefix}.experts.{e}.{part}")] = t[e, i * rows : (i + 1) * rows]
        return out

    def _fused(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Split rules' pieces concatenated back into the checkpoint's tensor."""
        if not self.splits:
            return state_dict
        out = dict(state_dict)
        for name in state_dict:
            for r in self.splits:
                if name.endswith(r.parts[0]):
                    prefix = name[: -len(r.parts[0])]
                    pieces = [out.pop(prefix + part) for part in r.parts]
                    out[prefix + r.checkpoint] = torch.cat(pieces)
        return out

    def _back(self, name: str) -> str:
        for r in self.renames:
            name = re.sub(r.model_back, r.checkpoint_back, name)
        return name


class Assembler:
    """Collects the pieces of stacked parameters while a checkpoint streams in; `add` returns the whole tensor
    once its last piece arrived."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes  # the model's expected shape of each stacked parameter
        self.pieces: dict[str, dict[tuple[int, int], torch.Tensor]] = {}

    def add(
        self, name: str, piece: tuple[Stacked, int, int], t: torch.Tensor, source: str
    ) -> torch.Tensor | None:
        if not isinstance(piece[0], Stacked):
            return self._add_assembled(name, piece, t, source)
        rule, expert, part = piece
        shape = self.shapes.get(name)
        if shape is None:
            return None
        experts, rows = shape[0], shape[1] // len(rule.parts)
        want = (rows, *shape[2:])
        if expert >= experts or tuple(t.shape) != want:
            raise CheckpointError(
                f"{source}: expert {expert} part {rule.parts[part]!r} of {name!r} has shape {tuple(t.shape)}; "
                f"the model expects {experts} experts of {want}"
            )
        got = self.pieces.setdefault(name, {})
        got[(expert, part)] = t
        if len(got) < experts * len(rule.parts):
            return None
        del self.pieces[name]
        return torch.stack([torch.cat([got[(e, p)] for p in range(len(rule.parts))]) for e in range(experts)])

    def _add_assembled(self, name: str, piece: tuple, t: torch.Tensor, source: str) -> torch.Tensor | None:
        """A piece of a rule that assembles its own parameters: `rule.pieces(name)` of them, then `rule.assemble`."""
        rule, key = piece
        shape = self.shapes.get(name)
        if shape is None:
            return None
        got = self.pieces.setdefault(name, {})
        got[key] = t
        if len(got) < rule.pieces(name):
            return None
        del self.pieces[name]
        return rule.assemble(got, shape, name, source)

    def missing(self) -> list[str]:
        """Stacked parameters some of whose pieces never came."""
        return sorted(self.pieces)


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp's converter (convert_hf_to_gguf.py) writes a family: its `general.architecture`, the
    metadata keys (after "<arch>.") and tensor names beyond the Llama ones autolm.sources.gguf knows, and
    whether q/k rows are permuted for llama.cpp's interleaved RoPE (Llama, Mistral; not Qwen)."""

    arch: str
    config: tuple[tuple[str, str], ...] = ()  # (GGUF key, config field)
    layer: tuple[tuple[str, str], ...] = ()  # (blk.N.<name>, module path inside layer N)
    top: tuple[tuple[str, str], ...] = ()  # (<name>, module path)
    permute_qk: bool = False
    # per-head q/k norms (blk.N.attn_q_norm / attn_k_norm, (heads, head_dim)) whose columns the converter permutes
    # within each head as the q/k rows (Chameleon's)
    permute_qk_norm: bool = False
    fixed: tuple[tuple[str, Any], ...] = ()  # config fields the converter does not write, set to these
    # blk.N.<name> weights the converter transposes (GPT-2's Conv1D, stored (in, out) by the checkpoint and the
    # model): transposed back on reading
    transposed: tuple[str, ...] = ()
    # added by the converter to every `*norm.weight` (Gemma stores its (1 + w) norms as 1 + w); subtracted on reading
    norm_shift: float = 0.0
    # the HF names' ending norm_shift applies to (Muse Glimmer's converter shifts "layernorm.weight": not the final norm)
    norm_shift_suffix: str = "norm.weight"
    # config fields llama.cpp derives rather than reads (Gemma's attention scale, layer pattern, local RoPE):
    # derive(the config dict read so far, get) fills them in, get(key) reading the file's "<arch>.<key>"
    derive: Callable[[dict[str, Any], Callable[[str], Any]], None] | None = None
    # its inverse for GGUF out (autolm.gguf_plan): write_config(the "<arch>.*" metadata planned so far, keys
    # without the prefix, the model's config) changes the keys to what the family's converter writes
    write_config: Callable[[dict[str, Any], Any], None] | None = None
    # config fields llama.cpp reads off a tensor's presence (optional biases): (tensor, field) set true where the
    # file has the tensor, e.g. ("blk.0.attn_q.bias", "attention_bias"); a name with "{}" gives the field the
    # numbers of the blocks that have it (MiMo-V2-Flash's routers: ("blk.{}.ffn_gate_inp.weight", ...)), for
    # `derive` to read and replace
    present: tuple[tuple[str, str], ...] = ()
    # config fields llama.cpp reads off a tensor's shape (Laguna's attention gate, per head or per element):
    # (tensor, field) set to the tensor's shape (GGUF's order, ne0 first) where the file has it, for `derive` to
    # read and replace
    shaped: tuple[tuple[str, str], ...] = ()
    # tensors that hold RoPE parameters, not weights (Phi-3's LongRoPE factors): (tensor, key of rope_parameters)
    rope_tensors: tuple[tuple[str, str], ...] = ()
    # rows the converter regroups (GPT-NeoX's fused q/k/v): row_order(blk.N.<name>'s name, config) gives, for each of
    # the model's rows (of the weight and the bias), the file's row, or None where the tensor keeps the model's order
    row_order: Callable[[str, Any], Any] | None = None
    # tensors the converter stacks from the members of a ModuleList: (<name>, the list's path): blk.N.<name> with the
    # path inside the layer (StableLM's per-head q/k norms), or a top-level <name> with the list's full path (Gemma
    # 3n's AltUp projections); row i of the file's tensor is member i's parameter
    stacked: tuple[tuple[str, str], ...] = ()
    # a metadata key (after "<arch>.") that claims a file for this family where families share `arch` (OLMo 3's
    # attention.sliding_window under "olmo2"): a file holding it (non-empty) loads as this family, one without it
    # as the family that claims nothing (models.gguf_family); or (key, value): a file whose key holds that value
    # (DeepSeek V3's sigmoid expert_gating_func under "deepseek2", where V2's files hold softmax's)
    claim: str | tuple[str, Any] | None = None
    # blk.N.<name> tensors llama.cpp names without a ".weight" suffix (Mamba's and Gated DeltaNet's ssm_a): read
    # as <name>.weight, written without the suffix
    bare: tuple[str, ...] = ()
    # metadata keys llama.cpp reads without the "<arch>." prefix (Apertus' xielu.* arrays): read and written bare
    unprefixed: tuple[str, ...] = ()
    # whether llama.cpp's rope_freqs (Llama 3's RoPE scaling as per-frequency divisors) is read as for Llama in a
    # family with a `derive` (which leaves the RoPE parameters as the file gives them): EXAONE 4's converter writes it
    rope_freqs: bool = False
    # how the converter writes a SentencePiece-style vocabulary (byte fallback, "\u2581" for spaces) where not as
    # llama.cpp's "llama" model: write_vocab(GGUFWriter, tokenizer.json's spec, tokens, token types) (Gemma 4's
    # "gemma4", with its merges)
    write_vocab: Callable[[Any, dict[str, Any], list[str], list[int]], None] | None = None
    # where blk.N is not the layer `<layers_prefix>.N` (HRM-Text's two stacks, the H stack's blocks after the L
    # stack's): block_prefix(N, get) gives the model's path of blk.N's layer, or None past the file's blocks; get(key)
    # reads the file's (or the planned file's) "<arch>.<key>"
    block_prefix: Callable[[int, Callable[[str], Any]], str | None] | None = None

    def rows(self, tensor: str, config: Any) -> Any:
        """row_order for a file's tensor name: blk.N.<name>.weight gives <name>, which may hold a dot
        (indexer.attn_k); a top-level tensor its last name before the suffix."""
        if self.row_order is None:
            return None
        parts = tensor.split(".")
        return self.row_order(".".join(parts[2:-1]) if tensor.startswith("blk.") else parts[-2], config)


def transformers_state_dict(module: torch.nn.Module) -> None:
    """Hooks for a model whose modules are named otherwise than transformers' (BERT's, XLM's, ...): state_dict()
    gives transformers' names (its `checkpoint_rules` back; autolm's own inside _util.own_names), and
    load_state_dict() takes them (autolm's own names stay as they are). Every key is renamed at once: RoBERTa's
    untied head swaps two names."""
    module.register_state_dict_post_hook(_checkpoint_names)
    module.register_load_state_dict_pre_hook(_model_names)


def _renamed(state_dict, prefix: str, rename: Callable[[str], str]) -> None:
    tensors = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    for key, t in tensors.items():
        state_dict[prefix + rename(key[len(prefix) :])] = t


def _checkpoint_names(module: torch.nn.Module, state_dict, prefix: str, local_metadata) -> None:
    if not module.__dict__.get("_own_names"):
        _renamed(state_dict, prefix, module.checkpoint_rules._back)


def _model_names(module: torch.nn.Module, state_dict, prefix: str, *args) -> None:
    _renamed(state_dict, prefix, module.checkpoint_rules.renamed)
