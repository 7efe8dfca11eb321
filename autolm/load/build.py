"""What a load builds: the model class for the checkpoint and the head asked for, and the checks of the config
against the checkpoint's tensors and the arguments made before anything is built."""

from __future__ import annotations

import torch

from .._util import parse_dtype
from ..errors import ConfigError
from ..models import FAMILIES
from ..models import model_class as family_class
from ..models.heads import base_model, sequence_classification, token_classification
from ..models.question_answering import question_answering
from .stream import layer_index

HEADS = {
    "causal_lm": None,
    "sequence_classification": sequence_classification,
    "token_classification": token_classification,
    "question_answering": question_answering,
    "base": base_model,
}


def model_class(model_type: str, head: str = "causal_lm") -> type:
    """The class a load builds: the family's causal LM, its sequence or token classifier, its QA head or its body alone (models.heads)."""
    cls = family_class(model_type)
    if HEADS[head] is None:
        return cls
    # BART's and BERT's decoders: transformers' other heads for them run what autolm does not
    if getattr(cls, "causal_only", None):
        raise ConfigError(f"{model_type}: autolm loads it as a causal LM only; transformers' {head} model for it is "
                          f"{cls.causal_only}, which autolm does not run")  # fmt: skip
    family = FAMILIES.get(model_type)  # transformers names the classes by the config's family (Gemma3Text...)
    return HEADS[head](cls, family[1].removesuffix("Config") if family else None)


def check_head(head: str, gguf_file) -> None:
    """The head asked for (HEADS); a GGUF file loads as the causal LM it holds."""
    if head not in HEADS:
        raise ConfigError(f"head={head!r}: expected one of {', '.join(HEADS)}")
    if head != "causal_lm" and gguf_file is not None:
        raise ConfigError(f"{gguf_file}: a GGUF file holds a causal LM; load it with AutoModelForCausalLM (the "
                          f"{head} head loads from safetensors)")  # fmt: skip


def check_size(config, shapes: dict | None, cls) -> None:
    """Compare the model the config describes with the checkpoint's tensors before anything is built: a config
    that claims far more layers than the checkpoint holds would otherwise cost time and memory first."""
    if not shapes:
        return
    names = [cls.checkpoint_rules.to_model(n)[0] for n in shapes]
    # a family whose stacks of layers run several times (HRM-Text) holds fewer layers: one stack's, numbered under
    # its first stack's name
    prefix = getattr(cls, "checkpoint_stack", cls.layers_prefix)
    layers = {layer_index(n, prefix) for n in names} - {-1}
    if getattr(config, "checkpoint_layers", config.num_hidden_layers) > len(layers):
        raise ConfigError(
            f"{config.source}: num_hidden_layers is {config.num_hidden_layers} but the checkpoint "
            f"holds {len(layers)} decoder layers"
        )
    emb = shapes.get(f"{cls.embeddings_name}.weight")
    if emb is not None and tuple(emb) != (config.embedding_rows, config.embedding_width):
        raise ConfigError(
            f"{config.source}: vocab_size {config.vocab_size} and hidden_size give embeddings of "
            f"{(config.embedding_rows, config.embedding_width)} but the checkpoint's are {tuple(emb)}"
        )


def config_dtype(config) -> torch.dtype | None:
    """dtype='auto': the config's dtype when it names one, else None (the first floating tensor's dtype)."""
    name = config.dtype
    if isinstance(name, torch.dtype):
        return name
    try:
        d = parse_dtype(name) if isinstance(name, str) else None
    except ConfigError:
        return None
    return d if isinstance(d, torch.dtype) else None


SCORE_METHODS = ("from_2_way_softmax", "no_post_processing")


def score_from_tokens(config, directory: str, shapes: dict | None) -> tuple[str, list[int]] | None:
    """vLLM's causal LM read as a classifier (its `hf_overrides`: `classifier_from_token` with `method`, or
    `is_original_qwen3_reranker`, as Qwen3-Reranker is served): (method, the tokens' ids), whose rows of the LM head
    make the `score` head; config.num_labels set to match. from_2_way_softmax: one label, the difference of the two
    rows (its sigmoid is the softmax over the two tokens, false then true); no_post_processing: a label per token.
    None when the config asks for nothing, or the checkpoint already holds its `score`."""
    tokens = config.extra.get("classifier_from_token")
    if tokens is None:
        return None
    method = config.extra.get("method")
    if method is None and config.extra.get("is_original_qwen3_reranker"):
        method = "from_2_way_softmax"
    if method not in SCORE_METHODS:
        raise ConfigError(f"{config.source}: classifier_from_token needs method {' or '.join(SCORE_METHODS)} "
                          f"(or is_original_qwen3_reranker: true), found {method!r}")  # fmt: skip
    two = method == "from_2_way_softmax"
    strings = isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)
    if not strings or (two and len(tokens) != 2):
        want = "two tokens (false, true)" if two else "a list of tokens"
        raise ConfigError(f"{config.source}: classifier_from_token must be {want}, found {tokens!r}")
    config.num_labels = 1 if two else len(tokens)
    if shapes is not None and "score.weight" in shapes:
        return None
    from ..tokenizer import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(directory).convert_tokens_to_ids(tokens)
    unknown = [t for t, i in zip(tokens, ids) if i is None]
    if unknown:
        raise ConfigError(
            f"{directory}: classifier_from_token names tokens the tokenizer does not have: {unknown}"
        )
    return method, ids
