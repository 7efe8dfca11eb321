"""ERNIE 4.5 VL's language model (baidu/ERNIE-4.5-VL-28B-A3B, -424B-A47B; model_type ernie4_5_vl_moe_text, and
ernie4_5_vl_moe: the image-text checkpoints' language model): ERNIE 4.5 MoE's decoder (autolm.models.ernie4_5_moe:
interleaved RoPE in fp32, `use_bias` on q/k/v/o and the dense and shared MLPs, softmax routing with a correction
bias and a clamped sum) whose experts are split by modality:

- `mlp_layer_types` says which layers are "dense" (an MLP of intermediate_size) and which "sparse" (default: the
  first dense, the rest sparse); a sparse layer holds `text_moe` and `vision_moe`, each a router (`gate`, with its
  own `moe_statics.e_score_correction_bias`) and moe_num_experts experts, of moe_intermediate_size[0] (text) and
  [1] (vision) rows, plus `shared_experts` (moe_num_shared_experts * moe_intermediate_size[0] rows, ungated);
- transformers runs a token through the vision experts only where moe_mm_token_type_ids marks it an image or video
  token; without it (text: the processor gives none, generation drops it after the prompt) every token takes the
  text experts. autolm runs text: the vision experts are held (loaded, saved) and never run;
- 3-D RoPE (`mrope_section` [h, w, t] in rope_parameters, [22, 22, 20] where absent): transformers pre-permutes
  the frequencies (the h and w shares of the first h + w alternate) and recomposes them per axis; with every axis
  the text position, as on text, it is ERNIE 4.5's plain interleaved RoPE exactly. transformers builds it only for
  h == w and h + w + t == head_dim / 2 (t > 0), so autolm refuses other sections by name; they are kept in the
  config and written back.

The head has no bias; the image-text model ties it by its outer tie_word_embeddings (default true), whatever
text_config says. Checkpoints (the Hub's, and transformers' save_pretrained, which writes them back the same way):
the language model as model.layers.* / model.embed_tokens / model.norm, the routers' weights transposed, (hidden,
experts), as `mlp.gate.weight` (text) and `mlp.gate.weight_1` (vision), both correction biases in one (2, experts)
`mlp.moe_statics.e_score_correction_bias`, and one tensor per expert, text experts 0 .. n - 1 then vision experts
n .. 2n - 1 (`mlp.experts.<e>.gate_proj.weight`); the vision tower (`vision_model`) and the resampler skipped.
transformers' own layout (model.language_model.*, stacked experts) reads too. Saved, the model is the text model
(ernie4_5_vl_moe_text, transformers' layout), which transformers' Ernie4_5_VLMoeTextModel loads. llama.cpp
converts no ERNIE 4.5 VL model: no GGUF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import CheckpointError, ConfigError, GenerationError
from ..nn import CheckpointRules, Experts, GatedMLP, Ignored, RMSNorm, SparseMoeBlock
from .base import LLAMA_TP, CausalLM, DecoderModel
from .ernie4_5 import Ernie4_5Config, Ernie4_5DecoderLayer
from .ernie4_5_moe import Ernie4_5_MoeConfig, Ernie4_5_MoeTopKRouter
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig

_SECTIONS = [22, 22, 20]  # transformers' mrope_section where rope_parameters has none


@dataclass(repr=False)
class Ernie4_5_VLMoeTextConfig(Ernie4_5Config):
    """transformers' Ernie4_5_VLMoeTextConfig: ERNIE-4.5-VL-28B-A3B's sizes, no head_dim field (hidden_size /
    num_attention_heads unless config.json gives one), no token ids by default, moe_intermediate_size as [text,
    vision], mlp_layer_types (dense / sparse per layer)."""

    model_type: ClassVar[str] = "ernie4_5_vl_moe_text"
    attribute_map: ClassVar[dict[str, str]] = Ernie4_5_MoeConfig.attribute_map
    absent_keys: ClassVar[tuple[str, ...]] = ("attention_dropout", "sliding_window", "head_dim")
    bool_fields: ClassVar[tuple[str, ...]] = (*Ernie4_5Config.bool_fields, "output_router_logits")

    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02
    moe_intermediate_size: list[int] | None = None
    num_experts_per_tok: int = 6
    num_experts: int = 64
    moe_num_shared_experts: int = 2
    moe_norm_min: float = 1e-12
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        if self.mlp_layer_types is None and _is_int(self.num_hidden_layers):
            self.mlp_layer_types = ["dense"] + ["sparse"] * (self.num_hidden_layers - 1)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = [1536, 512]
        super().__post_init__()

    def sparse(self, i: int) -> bool:
        """Whether layer i has the text and vision experts (else a dense MLP)."""
        return self.mlp_layer_types[i] == "sparse"

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        """ERNIE 4.5's RoPE: on text the 3-D sections turn every frequency by the text position."""
        return {"default": {k: v for k, v in self.rope_parameters.items() if k != "mrope_section"}}

    def validate(self) -> None:
        super().validate()
        src, sizes, types = self.source, self.moe_intermediate_size, self.mlp_layer_types
        n, k = self.num_experts, self.num_experts_per_tok  # config.json's moe_num_experts and moe_k
        if not _is_int(n) or not 0 < n <= 4096:
            raise ConfigError(
                f"{src}: moe_num_experts must be a positive integer (at most 4096), found {n!r}"
            )
        if not _is_int(k) or not 0 < k <= n:
            raise ConfigError(f"{src}: moe_k must be an integer in [1, moe_num_experts = {n}], found {k!r}")
        shared, norm_min = self.moe_num_shared_experts, self.moe_norm_min
        if not _is_int(shared) or shared < 0:
            raise ConfigError(
                f"{src}: moe_num_shared_experts must be a non-negative integer, found {shared!r}"
            )
        if not _is_number(norm_min) or norm_min <= 0:
            raise ConfigError(f"{src}: moe_norm_min must be a positive number, found {norm_min!r}")
        if not (isinstance(sizes, list) and len(sizes) == 2 and all(_is_int(s) and s > 0 for s in sizes)):
            raise ConfigError(
                f"{src}: moe_intermediate_size must be two positive integers [text, vision], found {sizes!r}"
            )
        if not (isinstance(types, list) and len(types) >= self.num_hidden_layers) or (
            set(types) - {"dense", "sparse"}
        ):
            raise ConfigError(f"{src}: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                              f"{self.num_hidden_layers} layers, found {str(types)[:200]}")  # fmt: skip
        if self.rope_parameters.get("rope_type") != "default":
            raise ConfigError(f"{src}: ERNIE 4.5 VL's RoPE type must be 'default' (as transformers requires), "
                              f"found {self.rope_parameters.get('rope_type')!r}")  # fmt: skip
        s = self.rope_parameters.get("mrope_section", _SECTIONS)
        half = self.head_dim // 2
        if not (isinstance(s, list) and len(s) == 3 and all(_is_int(x) for x in s)) or not (
            s[0] == s[1] >= 0 and s[2] > 0 and sum(s) == half
        ):
            raise ConfigError(
                f"{src}: RoPE mrope_section must be [h, w, t] with h == w and t > 0 summing to head_dim / 2 "
                f"({half}), found {s!r}{'' if 'mrope_section' in self.rope_parameters else ' (the default)'}"
            )


class Ernie4_5_VLMoeConfig(ImageTextConfig):
    """transformers' Ernie4_5_VLMoeConfig (model_type ernie4_5_vl_moe): its language model's config, the head tied
    by the outer tie_word_embeddings (default true)."""

    model_type: ClassVar[str] = "ernie4_5_vl_moe"
    text_class: ClassVar[type] = Ernie4_5_VLMoeTextConfig
    tie_default: ClassVar[bool | None] = True


class Ernie4_5_VLMoeMoeBlock(nn.Module):
    """transformers' Ernie4_5_VLMoeMoeBlock on text: the text experts (`text_moe`) plus the shared experts; the
    vision experts (`vision_moe`) held, never run (module docstring)."""

    def __init__(self, config: Ernie4_5_VLMoeTextConfig):
        super().__init__()
        h, n, k, act = config.hidden_size, config.num_experts, config.num_experts_per_tok, config.hidden_act
        text, vision = config.moe_intermediate_size

        def modality(inter: int) -> SparseMoeBlock:
            return SparseMoeBlock(
                Ernie4_5_MoeTopKRouter(h, n, k, config.moe_norm_min), Experts(n, h, inter, act)
            )

        self.text_moe, self.vision_moe = modality(text), modality(vision)
        self.vision_moe.held = True  # never run on text (autolm.nn.moe.experts_summary)
        shared = config.moe_num_shared_experts
        self.shared_experts = GatedMLP(h, text * shared, act, bias=config.use_bias) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.text_moe(x)
        return y if self.shared_experts is None else y + self.shared_experts(x)


class Ernie4_5_VLMoeDecoderLayer(Ernie4_5DecoderLayer):
    """ERNIE 4.5's layer (interleaved RoPE, use_bias); in sparse layers the modality-split experts."""

    def __init__(self, config: Ernie4_5_VLMoeTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.sparse(layer_idx):
            self.mlp = Ernie4_5_VLMoeMoeBlock(config)


class Ernie4_5_VLMoeTextModel(DecoderModel):
    def __init__(self, config: Ernie4_5_VLMoeTextConfig):
        super().__init__(config, Ernie4_5_VLMoeDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


_MODALITY = ("text_moe", "vision_moe")


class _HubRules(CheckpointRules):
    """The Hub's routers and correction biases (module docstring) as the model's tensors: `mlp.gate.weight` and
    `mlp.gate.weight_1` transposed into text_moe's and vision_moe's gate, `mlp.moe_statics.e_score_correction_bias`
    (2, experts) cut into their rows."""

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        for i, suffix in enumerate((".mlp.gate.weight", ".mlp.gate.weight_1")):
            if name.endswith(suffix):
                return [(f"{name.removesuffix(suffix)}.mlp.{_MODALITY[i]}.gate.weight", t.T.contiguous())]
        suffix = ".mlp.moe_statics.e_score_correction_bias"
        if name.endswith(suffix):
            if t.dim() != 2 or t.shape[0] != 2:
                raise CheckpointError(
                    f"{name}: a (2, experts) tensor expected (text, vision), got {tuple(t.shape)}"
                )
            prefix = name.removesuffix(suffix)
            return [(f"{prefix}.mlp.{m}.gate.moe_statics.e_score_correction_bias", t[i : i + 1].clone())
                    for i, m in enumerate(_MODALITY)]  # fmt: skip
        return super().split(name, t)


class _HubExperts:
    """Assembles the Hub's per-expert tensors (text experts 0 .. n - 1, vision experts n .. 2n - 1) into
    text_moe's and vision_moe's stacked gate_up_proj ([gate; up]) and down_proj."""

    _PIECE = re.compile(r"(.+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")

    def __init__(self, num_experts: int):
        self.n = num_experts

    def piece(self, name: str) -> tuple[str, tuple[int, int]] | None:
        m = self._PIECE.fullmatch(name)
        if m is None:
            return None
        e, part = int(m.group(2)), m.group(3)
        if e >= 2 * self.n:
            raise CheckpointError(f"{name}: expert {e} beyond the {self.n} text and {self.n} vision experts")
        target = "down_proj" if part == "down_proj" else "gate_up_proj"
        return f"{m.group(1)}.{_MODALITY[e // self.n]}.experts.{target}", (e % self.n, part == "up_proj")

    def pieces(self, name: str) -> int:
        return self.n * (1 if name.endswith(".down_proj") else 2)

    def assemble(self, got: dict, shape: tuple, name: str, source: str) -> torch.Tensor:
        parts = 1 if name.endswith(".down_proj") else 2
        want = (shape[1] // parts, *shape[2:])
        bad = [k for k, t in got.items() if tuple(t.shape) != want]
        if bad:
            raise CheckpointError(f"{source}: expert {bad[0][0]} of {name!r} has shape {tuple(got[bad[0]].shape)}; "
                                  f"the model expects {want}")  # fmt: skip
        return torch.stack([torch.cat([got[(e, p)] for p in range(parts)]) for e in range(self.n)])


class Ernie4_5_VLMoeForCausalLM(CausalLM):
    """ERNIE 4.5 VL's language model (transformers has it as Ernie4_5_VLMoeTextModel, with the head of
    Ernie4_5_VLMoeForConditionalGeneration: no bias)."""

    config_class = Ernie4_5_VLMoeTextConfig
    checkpoint_rules = _HubRules(
        [
            *IMAGE_TEXT_RULES,
            Ignored(r"model\.resampler_model\..+"),  # the vision features' resampler
            Ignored(r"model\.mtp_.*"),  # a multi-token-prediction block, as ERNIE 4.5 MoE's files hold
        ]
    )
    # transformers' base_model_tp_plan less its experts entries: nn.Experts cuts its own intermediate rows
    tp_patterns: ClassVar[dict[str, str]] = {
        **LLAMA_TP,
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["Ernie4_5_VLMoeDecoderLayer"]
    # the routers' weights and correction biases stay fp32 under a bf16 / fp16 model, as transformers keeps them
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["gate.weight", "moe_statics"]

    def __init__(self, config: Ernie4_5_VLMoeTextConfig):
        super().__init__(config, Ernie4_5_VLMoeTextModel(config))
        rules = type(self).checkpoint_rules.rules
        self.checkpoint_rules = _HubRules([*rules, _HubExperts(config.num_experts)])

    def forward(self, *args: Any, **kwargs: Any):
        """CausalLM's forward; token types that mark image or video tokens (which transformers would run through
        the vision experts) refused by name: text's, all zero, are text's run."""
        for key in ("moe_mm_token_type_ids", "mm_token_type_ids"):
            types = kwargs.get(key)
            if isinstance(types, torch.Tensor) and bool(types.any()):
                raise GenerationError(
                    f"{type(self).__name__}.forward: {key} marks image or video tokens, but autolm runs ERNIE 4.5 "
                    "VL's language model on text alone (its text experts): pass text tokens only"
                )
        return super().forward(*args, **kwargs)
