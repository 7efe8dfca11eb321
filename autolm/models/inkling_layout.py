"""The original (sglang) layout transformers writes Inkling's image-text model (`inkling_mm_model`) in, read as the
text model's names (transformers' conversion_mapping for it): `model.llm.*` is the language model (`embed`,
`embed_norm`, `unembed` the head), `attn.wq_du` / `wk_dv` / `wv_dv` / `wr_du` / `wo_ud` the attention's projections,
`attn_norm` / `mlp_norm` the layer norms, the convolutions' weights without their `conv1d` module, `mlp.gate.bias`
the correction bias; the gate and up rows interleaved (gate0, up0, gate1, ...) in `mlp.w13_dn.weight` (the dense
MLP), `mlp.experts.w13_weight` (each expert's rows) and `mlp.shared_experts.shared_w13_weight`. The audio and vision
towers are skipped. Saved, the model is the text model (transformers' InklingForCausalLM names)."""

from __future__ import annotations

import torch

from ..nn import CheckpointRules, Ignored, Rename
from .image_text import IMAGE_TEXT_RULES


def loaded_as(checkpoint: str, model) -> Rename:
    return Rename(checkpoint, model, r"(?!)", "")  # loading only: saved under the text model's names


def llm_renames(*projections: tuple[str, str]) -> tuple[Rename, ...]:
    """The names the Inklings' original layouts share: the language model (`model.llm.*`), its embeddings and
    head, and the attention's projections (these five and `projections`, (original, transformers') pairs)."""
    pairs = (
        ("wq_du", "q_proj"),
        ("wk_dv", "k_proj"),
        ("wv_dv", "v_proj"),
        ("wr_du", "r_proj"),
        ("wo_ud", "o_proj"),
    )
    return (
        loaded_as(r"^model\.llm\.unembed\.", "lm_head."),
        loaded_as(r"^model\.llm\.embed\.", "model.embed_tokens."),
        loaded_as(r"^model\.llm\.embed_norm\.", "model.embed_tokens.embed_norm."),
        loaded_as(r"^model\.llm\.", "model."),
        *(
            loaded_as(rf"\.attn\.{ours}\.", f".self_attn.{theirs}.")
            for ours, theirs in (*pairs, *projections)
        ),
    )


ORIGINAL_RENAMES = (
    *llm_renames(),
    loaded_as(r"\.attn\.(q_norm|k_norm|rel_logits_proj)\.", r".self_attn.\1."),
    loaded_as(r"\.attn\.(k_sconv|v_sconv)\.weight$", r".self_attn.\1.conv1d.weight"),
    loaded_as(r"\.(attn_sconv|mlp_sconv)\.weight$", r".\1.conv1d.weight"),
    loaded_as(r"\.attn_norm\.", ".input_layernorm."),
    loaded_as(r"\.mlp_norm\.", ".post_attention_layernorm."),
    loaded_as(r"\.mlp\.gate\.bias$", ".mlp.gate.e_score_correction_bias"),
    loaded_as(r"\.mlp\.experts\.w2_weight$", ".mlp.experts.down_proj"),
    loaded_as(r"\.shared_experts\.shared_w2_weight$", ".shared_experts.down_proj"),
    loaded_as(r"\.mlp\.w2_md\.weight$", ".mlp.down_proj.weight"),
)
# the interleaved gate/up tensors: checkpoint suffix -> (dimension of the rows, the model's tensors)
INTERLEAVED = {
    "mlp.experts.w13_weight": (1, ("mlp.experts.gate_up_proj",)),
    "shared_experts.shared_w13_weight": (1, ("shared_experts.gate_proj", "shared_experts.up_proj")),
    "mlp.w13_dn.weight": (0, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
}


class OriginalLayoutRules(CheckpointRules):
    """The family's rules plus the original layout's: its names, and its interleaved gate/up rows split into the
    model's gate and up halves (one tensor, [gate; up], for the experts)."""

    def __init__(self, rules=()):
        super().__init__([*ORIGINAL_RENAMES, *rules, *IMAGE_TEXT_RULES,
                          Ignored(r"(model\.)?(audio|audio_tower|mtp)\..+")])  # fmt: skip

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        for suffix, (dim, parts) in INTERLEAVED.items():
            if name.startswith("model.llm.") and name.endswith(suffix):
                prefix = name[: -len(suffix)]
                halves = [t.unflatten(dim, (-1, 2)).select(dim + 1, j).contiguous() for j in (0, 1)]
                if len(parts) == 1:
                    return [(prefix + parts[0], torch.cat(halves, dim))]
                return [(prefix + part, h) for part, h in zip(parts, halves, strict=True)]
        return super().split(name, t)
