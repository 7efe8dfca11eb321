"""transformers' names for the BERT-style CausalLMs (models/bert.py and its relatives): the checkpoint rules
between them and autolm's (applied to state_dict() by nn.transformers_state_dict)."""

from __future__ import annotations

import re

from ..nn import CheckpointRules, Ignored, Rename


def _rules(prefix: str, head: str, tied: bool = True) -> CheckpointRules:
    """transformers' names <-> autolm's for a body under `prefix` and a head module `head` (BERT:
    cls.predictions, whose transform is the head's dense and norm; RoBERTa: lm_head). The decoder's bias is, in a
    tied model's files, the head's `bias` (transformers ties the two and writes that one); an untied model's
    decoder has its own, and the head's `bias` (unused, as in transformers) is kept as head.bias. Names are marked
    "~" while renamed, so that no rule renames another's result (RoBERTa's head is called lm_head too)."""
    p, h = re.escape(prefix), re.escape(head)
    t = f"{head}.transform." if head == "cls.predictions" else f"{head}."
    keep = r"(?!bias$)" if tied else ""
    return CheckpointRules([
        Rename(rf"^{p}\.embeddings\.word_embeddings\.", "model.embed_tokens.", r"^model\.embed_tokens\.",
               f"{prefix}.embeddings.word_embeddings."),
        Rename(rf"^{p}\.embeddings\.", "model.embeddings.", r"^model\.embeddings\.", f"{prefix}.embeddings."),
        Rename(rf"^{p}\.encoder\.layer\.", "model.layers.", r"^model\.layers\.", f"{prefix}.encoder.layer."),
        Rename(rf"^{h}\.decoder\.{keep}", "~lm_head.", rf"^lm_head\.{keep}", "~decoder."),
        Rename(rf"^{h}\.bias$", "~lm_head.bias" if tied else "~head.bias",
               r"^lm_head\.bias$" if tied else r"^head\.bias$", "~bias"),
        Rename(rf"^{re.escape(t)}(?=(dense|LayerNorm|layer_norm)\.)", "~head.", r"^head\.", "~transform."),
        Rename(r"^~", "", r"^~decoder\.", f"{head}.decoder."),
        Rename(r"(?!)", "", r"^~bias$", f"{head}.bias"),
        Rename(r"(?!)", "", r"^~transform\.", t),
        Ignored(rf"{h}\.decoder\.bias"),  # a tied model's bias again (older files)
        Ignored(rf"{p}\.embeddings\.(position_ids|token_type_ids)"),  # old files' buffers
        Ignored(rf"{p}\.pooler\..*"),  # an encoder file's pooler, which the CausalLM has not
    ])  # fmt: skip
