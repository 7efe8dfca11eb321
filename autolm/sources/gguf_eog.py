"""The tokens that end a generation from a GGUF file, as llama.cpp decides them (llama-vocab.cpp's
special_eog_ids): the file's end-of-sequence, end-of-turn, end-of-message and fill-in-the-middle pad / repo / file
separator tokens (tokenizer.ggml.*_token_id; the last three by their text where the file names none), and every token whose text is one of llama.cpp's end-of-turn markers
(`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`, ...: converters write many of them only as the chat template's
turn end, with the end-of-sequence token another). Two of llama.cpp's exceptions are kept: `<|end|>` is no end
where the vocabulary has `<|return|>` and `<|call|>` (gpt-oss' harmony format) or `<|calls|>` and `<|flush|>`
(Solar Open), and `</s>` none beside `<|tool_response>` or `<|plamo:eos|>` (Gemma 4, PLaMo)."""

from __future__ import annotations

from typing import Any

# llama.cpp's list (llama-vocab.cpp, the loop that fills special_eog_ids by the token's text)
MARKERS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
     "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
     "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~["}
)  # fmt: skip
# fill-in-the-middle tokens llama.cpp finds by their text where the file names none (tokenizer.ggml.fim_*_token_id)
FIM = {
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
KEEP = MARKERS | {"<|plamo:eos|>", *(t for texts in FIM.values() for t in texts)}  # what a model's read keeps
# the exceptions: (the markers whose presence makes the token no end, the token)
_NOT_ENDS = ((("<|return|>", "<|call|>"), "<|end|>"), (("<|calls|>", "<|flush|>"), "<|end|>"),
             (("<|tool_response>",), "</s>"), (("<|plamo:eos|>",), "</s>"))  # fmt: skip


def end_of_generation(metadata: dict[str, Any]) -> list[int]:
    """The token ids that end a generation (module docstring), the end-of-sequence token first. `metadata`: a
    GGUFFile's, read with its strings or with the texts in KEEP kept (GGUFFile(keep=KEEP))."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    found = getattr(tokens, "found", None)
    if found is None:
        found = {i: t for i, t in enumerate(tokens or ()) if t in KEEP}
    ids = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    for kind, names in FIM.items():
        named = min((i for i, t in found.items() if t in names), default=None)
        ids.append(metadata.get(f"tokenizer.ggml.{kind}_token_id", named))
    texts = set(found.values())
    not_ends = {text for present, text in _NOT_ENDS if all(p in texts for p in present)}
    ends = sorted(i for i, t in found.items() if t in MARKERS and t not in not_ends)
    return list(dict.fromkeys(i for i in [*ids, *ends] if isinstance(i, int) and not isinstance(i, bool)))
