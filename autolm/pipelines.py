"""`pipeline("text-generation", model=..., tokenizer=...)`: transformers' text-generation pipeline for plain
prompts and chat messages, as its LLM tutorial uses it. (A module named like transformers' `pipelines`, so that
importing it never hides the `autolm.pipeline` function.)"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import GenerationError
from .load import from_pretrained
from .tokenizer import AutoTokenizer

TASKS = ("text-generation",)


def _is_chat(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


class TextGenerationPipeline:
    """Calls return, per input, a list with one {"generated_text": ...}: the prompt and its continuation (or the
    continuation alone with return_full_text=False; token ids with return_tensors=True); for chat messages, the
    messages with the assistant's reply appended (or its text alone)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.task = "text-generation"

    def __call__(
        self, text_inputs, return_full_text: bool = True, return_tensors: bool = False, **generate_kwargs
    ):
        batched = isinstance(text_inputs, (list, tuple)) and bool(text_inputs) and not _is_chat(text_inputs)
        items = list(text_inputs) if batched else [text_inputs]
        out = [self._one(x, return_full_text, return_tensors, generate_kwargs) for x in items]
        return out if batched else out[0]

    def _one(self, prompt, full: bool, tensors: bool, generate_kwargs: dict) -> list[dict]:
        tok = self.tokenizer
        chat = _is_chat(prompt)
        if chat:
            messages = list(prompt)
            go_on = (
                messages[-1]["role"] == "assistant"
            )  # as transformers: a final assistant message is continued
            enc = tok.apply_chat_template(
                messages, add_generation_prompt=not go_on, continue_final_message=go_on, return_tensors="pt"
            )
        elif isinstance(prompt, str):
            enc = tok(prompt, return_tensors="pt")
        else:
            raise GenerationError(
                f"text-generation pipeline: expected a string, chat messages or a list of them, got {prompt!r}"
            )
        ids = enc["input_ids"].to(self.model.device)
        mask = enc.get("attention_mask")
        with torch.no_grad():
            seq = self.model.generate(ids, attention_mask=None if mask is None else mask.to(ids.device),
                                      **generate_kwargs)[0]  # fmt: skip
        if tensors:
            return [{"generated_token_ids": (seq if full else seq[ids.shape[1] :]).tolist()}]
        # transformers' arithmetic: the new text is the full decoding minus the decoded prompt's characters
        text = tok.decode(seq, skip_special_tokens=True)
        new = text[len(tok.decode(ids[0], skip_special_tokens=True)) :]
        if not chat:
            return [{"generated_text": prompt + new if full else new}]
        if not full:
            return [{"generated_text": new}]
        if messages[-1]["role"] == "assistant":
            reply = {**messages[-1], "content": messages[-1]["content"] + new}
            return [{"generated_text": [*messages[:-1], reply]}]
        return [{"generated_text": [*messages, {"role": "assistant", "content": new}]}]


def pipeline(
    task: str,
    model=None,
    tokenizer=None,
    device: str | int | torch.device | None = None,
    dtype: Any = "auto",
    torch_dtype: Any = None,
    model_kwargs: dict | None = None,
    **kwargs: Any,
) -> TextGenerationPipeline:
    """transformers' `pipeline` for "text-generation": a model (or a folder / repo id to load one and its
    tokenizer from) and a tokenizer."""
    if task not in TASKS:
        raise GenerationError(f"pipeline: task {task!r} is not supported (autolm runs {', '.join(TASKS)})")
    if kwargs:
        raise GenerationError(f"pipeline got unsupported arguments: {', '.join(sorted(kwargs))}")
    if isinstance(device, int):
        device = "cpu" if device < 0 else f"cuda:{device}"
    if model is None or isinstance(model, (str, os.PathLike)):
        if model is None:
            raise GenerationError("pipeline: pass model= (a model, a folder or a repo id)")
        name = os.fspath(model)
        dtype = torch_dtype if torch_dtype is not None else dtype
        model = from_pretrained(name, dtype=dtype, device=device, **(model_kwargs or {}))
        tokenizer = tokenizer if tokenizer is not None else name
    elif device is not None:
        model = model.to(device)
    if tokenizer is None:  # as transformers: the tokenizer from where the model was loaded
        tokenizer = getattr(model, "name_or_path", None)
    if tokenizer is None:
        raise GenerationError(
            "pipeline: pass tokenizer= with a model object (or model= as a folder / repo id)"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    return TextGenerationPipeline(model, tokenizer)
