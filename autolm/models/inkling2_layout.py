"""The original layout transformers writes Inkling 2 in (its conversion_mapping for inkling2_text / inkling2), read
as the text model's names: `model.llm.*` the language model (`embed`, `embed_norm`, `unembed` the head),
`attn.wq_du` / `wk_dv` / `wv_dv` / `wr_du` / `wo_ud` / `gate_attn` / `attn_sink_proj` the attention's projections,
`attn_norm` / `mlp_norm` / `{q,k,v}_input_norm` the norms, `attn_sconv` / `mlp_sconv` the residual convolutions
(weights without their `conv1d` module), `static_w` and a bare `weight_proj` tensor for the dynamic ones,
`mlp.gate.bias` the correction bias, `mlp.experts.w13_weight` each expert's gate and up rows interleaved
(gate0, up0, gate1, ...), `w2_weight` the down projection, and `attn_res.attn_queries.i` (layer i + 1's
`attention_input`), `attn_res.mlp_queries.i`, `attn_res.output_query` (`final_input`) the block residuals' queries.
The image-text model's language model is `model.language_model.*` or `model.llm.*`; its vision tower is skipped.
Saved, the model is the text model under transformers' module names."""

from __future__ import annotations

import torch

from ..nn import CheckpointRules
from .image_text import IMAGE_TEXT_RULES
from .inkling_layout import llm_renames, loaded_as

_LAYER = r"^model\.llm\.attn_res\.attn_queries\.(\d+)$"
ORIGINAL_RENAMES = (
    loaded_as(_LAYER, lambda m: f"model.llm.layers.{int(m.group(1)) + 1}.attention_input.query"),
    loaded_as(r"^model\.llm\.attn_res\.mlp_queries\.(\d+)$", r"model.llm.layers.\1.mlp_input.query"),
    loaded_as(r"^model\.llm\.attn_res\.output_query$", "model.llm.final_input.query"),
    *llm_renames(("gate_attn", "gate_proj"), ("attn_sink_proj", "sink_proj")),
    loaded_as(r"\.attn\.(q_l2_clip|rel_l2_clip|rel_logits_proj|k_sconv|v_sconv)\.", r".self_attn.\1."),
    loaded_as(r"\.attn_sconv\.", ".post_attention_convolution."),
    loaded_as(r"\.mlp_sconv\.", ".post_mlp_convolution."),
    loaded_as(r"(convolution|sconv)\.weight$", r"\1.conv1d.weight"),
    loaded_as(r"sconv\.static_w$", "sconv.static_weight"),
    loaded_as(r"sconv\.weight_proj$", "sconv.weight_proj.weight"),
    loaded_as(r"\.attn_norm\.", ".input_layernorm."),
    loaded_as(r"\.mlp_norm\.", ".post_attention_layernorm."),
    loaded_as(r"\.(q|k|v)_input_norm\.", r".\1_input_layernorm."),
    loaded_as(r"\.mlp\.gate\.bias$", ".mlp.gate.e_score_correction_bias"),
    loaded_as(r"\.mlp\.experts\.w2_weight$", ".mlp.experts.down_proj"),
)


class Inkling2LayoutRules(CheckpointRules):
    """The image-text names, then the original layout's; the experts' interleaved gate/up rows split into the
    model's [gate; up]."""

    def __init__(self):
        super().__init__([loaded_as(r"^model\.language_model\.", "model.llm."), *ORIGINAL_RENAMES,
                          *IMAGE_TEXT_RULES])  # fmt: skip

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if name.endswith("mlp.experts.w13_weight"):
            halves = [t.unflatten(1, (-1, 2)).select(2, j) for j in (0, 1)]
            return [(name[: -len("w13_weight")] + "gate_up_proj", torch.cat(halves, 1))]
        return super().split(name, t)
