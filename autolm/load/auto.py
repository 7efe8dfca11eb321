"""The transformers- and peft-named entry points over the one load path: `AutoModelForCausalLM`, `AutoModel`,
`AutoModelFor{Sequence,Token}Classification`, `AutoModelForQuestionAnswering`, `AutoPeftModelFor...` and `AutoConfig`, each a head (build.HEADS) on
`from_pretrained`."""

from __future__ import annotations

import os
from typing import Any

import torch

from .._util import parse_dtype
from ..config import PretrainedConfig
from ..errors import ConfigError
from ..hub import HUB_KWARGS, resolve_model_dir
from ..models import config_class, load_config
from ..sources import open_source
from . import _from_pretrained, from_pretrained
from .build import model_class


class AutoModelForCausalLM:
    """`AutoModelForCausalLM.from_pretrained(...)` and `from_config(...)`, as in transformers."""

    head = "causal_lm"  # what from_pretrained builds on the family's body (build.HEADS)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        return from_pretrained(pretrained_model_name_or_path, *args, head=cls.head, **kwargs)

    @classmethod
    def from_config(
        cls, config, dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None, **_: Any
    ):
        """A randomly initialised model (for training from scratch or tests)."""
        model = model_class(config.model_type, cls.head)(config)
        model.tie_weights()
        dtype = torch_dtype if torch_dtype is not None else dtype
        return model.to(parse_dtype(dtype)) if dtype not in (None, "auto") else model


class AutoModel(AutoModelForCausalLM):
    """transformers' `AutoModel.from_pretrained(path)` for a decoder: the family's body alone (`LlamaModel`, ...),
    returning `last_hidden_state` (the normed hidden states embedding models pool), from a base model's
    checkpoint or a causal LM's."""

    head = "base"


class AutoModelForSequenceClassification(AutoModelForCausalLM):
    """transformers' `AutoModelForSequenceClassification.from_pretrained(path, num_labels=...)`: the family's body
    with a `score` head (models.heads); a causal LM's checkpoint gets a fresh head (a warning says so), as a
    reward model starts."""

    head = "sequence_classification"


class AutoModelForTokenClassification(AutoModelForCausalLM):
    """transformers' `AutoModelForTokenClassification.from_pretrained(path, num_labels=...)`: the family's body with
    a label head over every token (models.heads); a causal LM's checkpoint gets a fresh head (a warning says so)."""

    head = "token_classification"


class AutoModelForQuestionAnswering(AutoModelForCausalLM):
    """transformers' `AutoModelForQuestionAnswering.from_pretrained(path)`: the family's body with `qa_outputs`, a
    start and an end logit per token (models.question_answering); a causal LM's checkpoint gets a fresh head."""

    head = "question_answering"


class AutoPeftModelForCausalLM:
    """peft's `AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=False, **base_model_kwargs)`: the
    base model that adapter_config.json names, with the adapter on it (a PeftModel, in eval mode unless trainable).
    It lives here, not in autolm.lora, because it loads base models."""

    head = "causal_lm"  # the base model's head (build.HEADS)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ):
        model = _from_pretrained(
            pretrained_model_name_or_path, adapter_name, is_trainable, head=cls.head, **kwargs
        )
        if not hasattr(model, "peft_config"):
            raise ConfigError(
                f"{pretrained_model_name_or_path}: not an adapter folder (no adapter_config.json)"
            )
        return model


class AutoPeftModelForSequenceClassification(AutoPeftModelForCausalLM):
    """peft's `AutoPeftModelForSequenceClassification`: a SEQ_CLS adapter on its base model loaded as a sequence
    classifier (the adapter's trained `score` copy on it)."""

    head = "sequence_classification"


class AutoPeftModelForTokenClassification(AutoPeftModelForCausalLM):
    """peft's `AutoPeftModelForTokenClassification`: a TOKEN_CLS adapter on its base model loaded as a token
    classifier (the adapter's trained head copy on it)."""

    head = "token_classification"


class AutoPeftModelForQuestionAnswering(AutoPeftModelForCausalLM):
    """peft's `AutoPeftModelForQuestionAnswering`: a QUESTION_ANS adapter on its base model loaded as an
    extractive QA model (the adapter's trained `qa_outputs` copy on it)."""

    head = "question_answering"


class AutoConfig:
    """`AutoConfig.from_pretrained(dir | repo id | path/to/config.json, gguf_file=None, **overrides)`, `AutoConfig.for_model`."""

    @staticmethod
    def from_pretrained(
        path_or_repo_id: str | os.PathLike,
        return_unused_kwargs: bool = False,
        gguf_file: str | None = None,
        **kwargs: Any,
    ) -> PretrainedConfig:
        if gguf_file is None:
            config = load_config(path_or_repo_id, **kwargs)
        else:
            hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
            kwargs.pop("trust_remote_code", None)
            config = open_source(resolve_model_dir(os.fspath(path_or_repo_id), **hub), gguf_file).config(
                **kwargs
            )
        return (config, {}) if return_unused_kwargs else config

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> PretrainedConfig:
        return config_class(model_type)(**kwargs)


__all__ = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
]
