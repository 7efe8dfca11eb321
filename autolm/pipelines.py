"""`pipeline("text-generation", model=..., tokenizer=...)`: transformers' text-generation pipeline for plain
prompts and chat messages, as its LLM tutorial uses it; `pipeline("text-classification", ...)` for sequence
classifiers and reward models. (A module named like transformers' `pipelines`, so that importing it never hides
the `autolm.pipeline` function.)"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import GenerationError
from .load import from_pretrained
from .pipelines_qa import QuestionAnsweringPipeline
from .pipelines_spans import TokenClassificationPipeline
from .pipelines_zero_shot import ZeroShotClassificationPipeline
from .tokenizer import AutoTokenizer

SPANS = {"token-classification": TokenClassificationPipeline, "ner": TokenClassificationPipeline,
         "question-answering": QuestionAnsweringPipeline,
         "zero-shot-classification": ZeroShotClassificationPipeline}  # fmt: skip
TASKS = ("text-generation", "text-classification", "sentiment-analysis", "feature-extraction", *SPANS)
HEADS = {"text-generation": "causal_lm", "feature-extraction": "base", "ner": "token_classification",
         "token-classification": "token_classification", "question-answering": "question_answering"}  # fmt: skip
# (the rest: sequence classification)


def _is_chat(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


class TextGenerationPipeline:
    """Calls return, per input, a list with one {"generated_text": ...}: the prompt and its continuation (or the
    continuation alone with return_full_text=False; token ids with return_tensors=True); for chat messages, the
    messages with the assistant's reply appended (or its text alone). batch_size > 1 generates that many inputs
    at a time, left-padded with the tokenizer's pad token, as transformers batches them."""

    def __init__(self, model, tokenizer, batch_size: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.task = "text-generation"
        self.batch_size = batch_size

    def __call__(self, text_inputs, return_full_text: bool = True, return_tensors: bool = False,
                 batch_size: int | None = None, **generate_kwargs):  # fmt: skip
        batched = isinstance(text_inputs, (list, tuple)) and bool(text_inputs) and not _is_chat(text_inputs)
        items = list(text_inputs) if batched else [text_inputs]
        size = max(1, batch_size or self.batch_size)
        out = []
        for i in range(0, len(items), size):
            prompts = [self._encode(x) for x in items[i : i + size]]
            for (prompt, ids), seq in zip(
                prompts, self._generate([ids for _, ids in prompts], generate_kwargs)
            ):
                out.append(self._result(prompt, ids, seq, return_full_text, return_tensors))
        return out if batched else out[0]

    def _encode(self, prompt) -> tuple[Any, torch.Tensor]:
        """(the prompt, its token ids (T,))."""
        tok = self.tokenizer
        if _is_chat(prompt):
            go_on = (
                prompt[-1]["role"] == "assistant"
            )  # as transformers: a final assistant message is continued
            enc = tok.apply_chat_template(
                list(prompt),
                add_generation_prompt=not go_on,
                continue_final_message=go_on,
                return_tensors="pt",
            )
        elif isinstance(prompt, str):
            enc = tok(prompt, return_tensors="pt")
        else:
            raise GenerationError(
                f"text-generation pipeline: expected a string, chat messages or a list of them, got {prompt!r}"
            )
        return prompt, enc["input_ids"][0]

    def _generate(self, rows: list[torch.Tensor], generate_kwargs: dict) -> list[torch.Tensor]:
        """Each row's prompt and continuation: the rows left-padded to one batch where there are several."""
        pad = self.tokenizer.pad_token_id
        if len(rows) > 1 and pad is None:
            raise GenerationError("text-generation pipeline: batching needs a pad token (set tokenizer.pad_token, "
                                  "e.g. to its eos_token) or batch_size=1")  # fmt: skip
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        if len(rows) > 1:
            generate_kwargs = {"pad_token_id": pad, **generate_kwargs}
        with torch.no_grad():
            seqs = self.model.generate(ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                       **generate_kwargs)  # fmt: skip
        return [seq[width - len(r) :] for seq, r in zip(seqs, rows)]

    def _result(self, prompt, ids: torch.Tensor, seq: torch.Tensor, full: bool, tensors: bool) -> list[dict]:
        tok = self.tokenizer
        if tensors:
            return [{"generated_token_ids": (seq if full else seq[len(ids) :]).tolist()}]
        # transformers' arithmetic: the new text is the full decoding minus the decoded prompt's characters
        text = tok.decode(seq, skip_special_tokens=True)
        new = text[len(tok.decode(ids, skip_special_tokens=True)) :]
        if not _is_chat(prompt):
            return [{"generated_text": prompt + new if full else new}]
        if not full:
            return [{"generated_text": new}]
        if prompt[-1]["role"] == "assistant":
            reply = {**prompt[-1], "content": prompt[-1]["content"] + new}
            return [{"generated_text": [*prompt[:-1], reply]}]
        return [{"generated_text": [*prompt, {"role": "assistant", "content": new}]}]


class TextClassificationPipeline:
    """transformers' text-classification pipeline: per text (or {"text", "text_pair"}) the top label and its
    score, or with top_k the k best (top_k=None: every label), sorted. Scores: sigmoid for one label or
    multi-label problems, softmax for several labels, the logits for regression (function_to_apply chooses).
    batch_size > 1 runs that many texts at a time, padded with the tokenizer's pad token."""

    def __init__(self, model, tokenizer, batch_size: int = 1):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.task = "text-classification"

    def __call__(self, inputs, top_k: int | str | None = "", function_to_apply: str | None = None,
                 batch_size: int | None = None):  # fmt: skip
        legacy = top_k == ""  # as transformers: no top_k given -> the top label alone
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        size = max(1, batch_size or self.batch_size)
        scores = []
        for i in range(0, len(items), size):
            scores += self._scores(items[i : i + size], function_to_apply)
        out = [self._labels(row, 1 if legacy else top_k, legacy) for row in scores]
        if isinstance(inputs, (list, tuple)):
            return out
        return [out[0]] if isinstance(inputs, str) and legacy else out[0]

    def _scores(self, texts: list, function_to_apply: str | None) -> list[torch.Tensor]:
        tok, model = self.tokenizer, self.model
        if len(texts) > 1 and tok.pad_token_id is None:
            raise GenerationError("text-classification pipeline: batching needs a pad token (set "
                                  "tokenizer.pad_token) or batch_size=1")  # fmt: skip
        if all(isinstance(t, dict) for t in texts):
            pairs = [t.get("text_pair") for t in texts]
            enc = tok([t["text"] for t in texts], text_pair=pairs if any(pairs) else None,
                      padding=len(texts) > 1, return_tensors="pt")  # fmt: skip
        elif all(isinstance(t, str) for t in texts):
            enc = tok(texts, padding=len(texts) > 1, return_tensors="pt")
        else:
            raise GenerationError(f"text-classification pipeline: expected strings or {{'text', 'text_pair'}} "
                                  f"dicts, got {texts!r}")  # fmt: skip
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"].to(model.device),
                           attention_mask=enc["attention_mask"].to(model.device), use_cache=False).logits  # fmt: skip
        config = model.config
        how = function_to_apply or (
            "none" if config.problem_type == "regression"
            else "sigmoid" if config.problem_type == "multi_label_classification" or config.num_labels == 1
            else "softmax"
        )  # fmt: skip
        funcs = {"sigmoid": torch.sigmoid, "softmax": lambda x: x.softmax(-1), "none": lambda x: x}
        if how.lower() not in funcs:
            raise GenerationError(f"function_to_apply {how!r}: expected 'sigmoid', 'softmax' or 'none'")
        return list(funcs[how.lower()](logits.float()))

    def _labels(self, scores: torch.Tensor, top_k: int | None, legacy: bool):
        names = self.model.config.id2label or {}
        if legacy:
            return {"label": names.get(int(scores.argmax()), f"LABEL_{int(scores.argmax())}"),
                    "score": float(scores.max())}  # fmt: skip
        ranked = sorted(
            ({"label": names.get(i, f"LABEL_{i}"), "score": float(v)} for i, v in enumerate(scores)),
            key=lambda d: d["score"], reverse=True,
        )  # fmt: skip
        return ranked if top_k is None else ranked[:top_k]


class FeatureExtractionPipeline:
    """transformers' feature-extraction pipeline: per text the model's first output for it alone, as nested lists
    (1, tokens, hidden), or tensors with return_tensors=True: the body's last_hidden_state for a model loaded by
    name (AutoModel), as transformers loads it."""

    def __init__(self, model, tokenizer, batch_size: int = 1):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.task = "feature-extraction"

    def __call__(self, inputs, return_tensors: bool = False, tokenize_kwargs: dict | None = None,
                 truncation: bool | None = None, batch_size: int | None = None):  # fmt: skip
        kwargs = dict(tokenize_kwargs or {})
        if truncation is not None:
            kwargs["truncation"] = truncation
        out = []
        for text in [inputs] if isinstance(inputs, str) else list(inputs):
            enc = self.tokenizer(text, return_tensors="pt", **kwargs)
            with torch.no_grad():
                first = self.model(**{k: v.to(self.model.device) for k, v in enc.items()}, use_cache=False)[0]
            out.append(first.cpu() if return_tensors else first.tolist())
        return out[0] if isinstance(inputs, str) else out


def pipeline(
    task: str,
    model=None,
    tokenizer=None,
    device: str | int | torch.device | None = None,
    dtype: Any = "auto",
    torch_dtype: Any = None,
    model_kwargs: dict | None = None,
    batch_size: int = 1,
    **kwargs: Any,
) -> Any:  # the task's pipeline: TextGenerationPipeline, TextClassificationPipeline, ... (SPANS)
    """transformers' `pipeline` for "text-generation", "text-classification" (or "sentiment-analysis"),
    "feature-extraction", "token-classification" (or "ner"), "question-answering" and "zero-shot-classification":
    a model (or a folder / repo id to load one and its tokenizer from) and a tokenizer; the last three take their
    call arguments here too."""
    if task not in TASKS:
        raise GenerationError(f"pipeline: task {task!r} is not supported (autolm runs {', '.join(TASKS)})")
    if kwargs and task not in SPANS:  # the span pipelines take their call arguments as defaults
        raise GenerationError(f"pipeline got unsupported arguments: {', '.join(sorted(kwargs))}")
    if isinstance(device, int):
        device = "cpu" if device < 0 else f"cuda:{device}"
    if model is None or isinstance(model, (str, os.PathLike)):
        if model is None:
            raise GenerationError("pipeline: pass model= (a model, a folder or a repo id)")
        name = os.fspath(model)
        dtype = torch_dtype if torch_dtype is not None else dtype
        head = HEADS.get(task, "sequence_classification")
        model = from_pretrained(name, dtype=dtype, device=device, head=head, **(model_kwargs or {}))
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
    if task in SPANS:
        return SPANS[task](model, tokenizer, batch_size, **kwargs)
    kinds = {"text-generation": TextGenerationPipeline, "feature-extraction": FeatureExtractionPipeline}
    return kinds.get(task, TextClassificationPipeline)(model, tokenizer, batch_size)
