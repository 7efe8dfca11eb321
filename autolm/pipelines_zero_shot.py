"""`pipeline("zero-shot-classification")`: transformers' ZeroShotClassificationPipeline on an NLI classifier (a
sequence classifier whose config.label2id has an "entailment" label): each candidate label becomes the hypothesis
"This example is {label}." paired with the text; the entailment logits, softmaxed over the labels (or, with
multi_label or one label, entailment against contradiction for each label), rank them."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .errors import GenerationError, TokenizerError
from .pipelines_spans import check_keys

logger = logging.getLogger("autolm")


def _labels(candidate_labels) -> list[str]:
    if isinstance(candidate_labels, str):
        return [label.strip() for label in candidate_labels.split(",") if label.strip()]
    return list(candidate_labels or [])


class ZeroShotClassificationPipeline:
    """Calls return, per text, {"sequence", "labels", "scores"}: the candidate labels from the likeliest, and their
    scores; for a list of texts, a list of those. Each (text, hypothesis) pair runs alone. Arguments given to
    `pipeline()` are every call's defaults."""

    task = "zero-shot-classification"
    call_args = ("candidate_labels", "hypothesis_template", "multi_label", "batch_size")

    def __init__(self, model, tokenizer, batch_size: int = 1, **defaults: Any):
        check_keys("zero-shot-classification pipeline", defaults, self.call_args)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.defaults = defaults
        if self.entailment_id == -1:
            logger.warning("Failed to determine 'entailment' label id from the label2id mapping in the model "
                           "config. Setting to -1. Define a descriptive label2id mapping in the model config to "
                           "ensure correct outputs.")  # fmt: skip

    @property
    def entailment_id(self) -> int:
        for label, i in (self.model.config.label2id or {}).items():
            if label.lower().startswith("entail"):
                return int(i)
        return -1

    def __call__(self, sequences, *args: Any, **kwargs: Any):
        if len(args) == 1 and "candidate_labels" not in kwargs:
            kwargs["candidate_labels"] = args[0]
        elif args:
            raise GenerationError(
                f"zero-shot-classification pipeline: unable to understand extra arguments {args}"
            )
        check_keys("zero-shot-classification pipeline", kwargs, self.call_args)
        opts = {**self.defaults, **kwargs}
        labels = _labels(opts.get("candidate_labels"))
        template = opts.get("hypothesis_template", "This example is {}.")
        texts = [sequences] if isinstance(sequences, str) else list(sequences or [])
        if not labels or not texts:
            raise GenerationError(
                "candidate_labels: you must include at least one label and at least one sequence"
            )
        if template.format(labels[0]) == template:
            raise GenerationError(f"hypothesis_template {template!r} was not able to be formatted with the "
                                  "target labels: it must hold {} where the label goes")  # fmt: skip
        out = [self._classify(t, labels, template, bool(opts.get("multi_label", False))) for t in texts]
        return out[0] if isinstance(sequences, str) else out

    def _classify(self, text: str, labels: list[str], template: str, multi_label: bool) -> dict:
        logits = np.concatenate([self._logits([text, template.format(label)]) for label in labels])
        if multi_label or len(labels) == 1:  # entailment against contradiction for each label alone
            entail = self.entailment_id
            pair = logits[..., [-1 if entail == 0 else 0, entail]]
            scores = (np.exp(pair) / np.exp(pair).sum(-1, keepdims=True))[..., 1]
        else:  # the entailment logits softmaxed over the labels
            entail = logits[..., self.entailment_id]
            scores = np.exp(entail) / np.exp(entail).sum(-1, keepdims=True)
        top = list(reversed(scores.argsort()))
        return {"sequence": text, "labels": [labels[i] for i in top], "scores": scores[top].tolist()}

    def _logits(self, pair: list[str]) -> np.ndarray:
        """The classifier's logits (1, num_labels) for one (text, hypothesis) pair, the text truncated (only it)
        to tokenizer.model_max_length where one is set."""
        tok, model = self.tokenizer, self.model
        if tok.pad_token is None:  # as transformers: padding needs a pad token
            logger.error("Tokenizer was not supporting padding necessary for zero-shot, attempting to use "
                         "`pad_token=eos_token`")  # fmt: skip
            tok.pad_token = tok.eos_token
        limit = getattr(tok, "max_length", None)
        try:
            enc = tok([pair], padding=True, truncation="only_first" if limit is not None else None,
                      max_length=limit, return_tensors="pt")  # fmt: skip
        except (
            TokenizerError
        ) as e:  # the text is already shorter than the hypothesis leaves it: not truncated
            if "too short" not in str(e):
                raise
            enc = tok([pair], padding=True, return_tensors="pt")
        inputs = {k: enc[k].to(model.device) for k in tok.model_input_names if k in enc}
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits.float().cpu().numpy()
