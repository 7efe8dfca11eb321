"""`pipeline("token-classification")` (alias "ner"): transformers' TokenClassificationPipeline on a token classifier
(`AutoModelForTokenClassification`) and autolm's tokenizer, with its post-processing: the offsets of each token in
the text, special tokens skipped, softmax scores, words put back together from their tokens and entities grouped by
their B-/I- tags (aggregation_strategy), long texts in overlapping windows (stride). Scores are numpy floats, as
transformers gives them. The question-answering pipeline is in pipelines_qa, the zero-shot one in
pipelines_zero_shot."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .errors import GenerationError

STRATEGIES = ("none", "simple", "first", "average", "max")
WORD_STRATEGIES = ("first", "average", "max")


def check_keys(where: str, given: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise GenerationError(f"{where} got unsupported arguments: {', '.join(unknown)} "
                              f"(it takes {', '.join(allowed)})")  # fmt: skip


def pad_batch(items: list[dict], tokenizer) -> dict:
    """transformers' pad_collate_fn: rows of (1, T, ...) tensors padded on the tokenizer's padding side, input_ids
    with the pad token, special_tokens_mask / p_mask with 1, anything else with 0."""
    if len(items) == 1:
        return items[0]
    if tokenizer.pad_token_id is None:
        raise GenerationError("batch_size > 1 needs a pad token (set tokenizer.pad_token) or batch_size=1")
    fill = {"input_ids": tokenizer.pad_token_id, "special_tokens_mask": 1, "p_mask": 1}
    out = {}
    for key, first in items[0].items():
        if not torch.is_tensor(first) or first.dim() < 2:
            out[key] = [item[key] for item in items]
            continue
        width = max(item[key].shape[1] for item in items)
        t = torch.full((len(items), width, *first.shape[2:]), fill.get(key, 0), dtype=first.dtype)
        for i, item in enumerate(items):
            n = item[key].shape[1]
            if tokenizer.padding_side == "left":
                t[i, width - n :] = item[key][0]
            else:
                t[i, :n] = item[key][0]
        out[key] = t
    return out


def get_tag(name: str) -> tuple[str, str]:
    """("B" or "I", the tag): a label without a B-/I- prefix continues (I)."""
    if name.startswith(("B-", "I-")):
        return name[0], name[2:]
    return "I", name


class TokenClassificationPipeline:
    """Calls return, per text, the tokens' (aggregation_strategy "none": entity, score, index, word, start, end) or
    the entities' (entity_group, score, word, start, end) whose label is not in ignore_labels (default ["O"]);
    for a list of texts, a list of those. batch_size > 1 runs that many texts (or windows) at a time, padded on the
    tokenizer's padding side as transformers batches them. Arguments given to `pipeline()` are the defaults of
    every call."""

    task = "token-classification"
    call_args = (
        "aggregation_strategy",
        "ignore_labels",
        "stride",
        "is_split_into_words",
        "delimiter",
        "batch_size",
    )

    def __init__(self, model, tokenizer, batch_size: int = 1, **defaults: Any):
        check_keys("token-classification pipeline", defaults, self.call_args)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.defaults = defaults
        self._check(**defaults)

    def _check(self, aggregation_strategy="none", ignore_labels=None, stride=None, is_split_into_words=False,
               delimiter=None, batch_size=None) -> str:  # fmt: skip
        how = str(getattr(aggregation_strategy, "value", aggregation_strategy)).lower()
        if how not in STRATEGIES:
            raise GenerationError(
                f"aggregation_strategy {aggregation_strategy!r}: expected one of {STRATEGIES}"
            )
        if stride is not None:
            if stride >= self.tokenizer.model_max_length:
                raise GenerationError(f"stride {stride} must be less than tokenizer.model_max_length "
                                      f"({self.tokenizer.model_max_length})")  # fmt: skip
            if how == "none":
                raise GenerationError('stride needs an aggregation_strategy other than "none" (the windows\' '
                                      "entities are merged)")  # fmt: skip
        if ignore_labels is not None and not isinstance(ignore_labels, (list, tuple, set)):
            raise GenerationError(f"ignore_labels: expected a list of labels, got {ignore_labels!r}")
        return how

    def __call__(self, inputs, **kwargs: Any):
        check_keys("token-classification pipeline", kwargs, self.call_args)
        args = {**self.defaults, **kwargs}
        how = self._check(**args)
        split = bool(args.get("is_split_into_words", False))
        if split and not all(isinstance(x, list) for x in inputs):
            inputs, single = [inputs], False  # as transformers: one pre-split text, answered as a list of one
        elif isinstance(inputs, str):
            inputs, single = [inputs], True
        elif isinstance(inputs, (list, tuple)) and inputs:
            inputs, single = list(inputs), False
        else:
            raise GenerationError(
                f"token-classification pipeline: expected a text or a list of texts, got {inputs!r}"
            )
        delimiter = args.get("delimiter") if args.get("delimiter") is not None else " "
        chunks = [self._chunks(x, split, delimiter, args.get("stride")) for x in inputs]
        outputs = self._run(
            [c for cs in chunks for c in cs], max(1, args.get("batch_size") or self.batch_size)
        )
        ignore = args.get("ignore_labels")
        results, at = [], 0
        for cs in chunks:
            results.append(
                self._postprocess(outputs[at : at + len(cs)], how, ["O"] if ignore is None else ignore)
            )
            at += len(cs)
        return results[0] if single else results

    def _chunks(self, sentence, split: bool, delimiter: str, stride: int | None) -> list[dict]:
        """The text's windows as the model's inputs (one unless stride is given and the text is longer than
        tokenizer.model_max_length), with what the post-processing needs."""
        tok, params, word_chars = self.tokenizer, {}, None
        if split:
            if not isinstance(sentence, list):
                raise GenerationError("is_split_into_words=True: each input must be a list of words")
            words, word_chars, at = sentence, [], 0
            for w in words:
                word_chars.append((at, at + len(w)))
                at += len(w) + len(delimiter)
            sentence, text, params["is_split_into_words"] = delimiter.join(words), words, True
        elif isinstance(sentence, str):
            text = sentence
        else:
            raise GenerationError(f"token-classification pipeline: expected a text, got {sentence!r}")
        if stride is not None:
            params.update(return_overflowing_tokens=True, padding=True, stride=stride)
        # transformers truncates to model_max_length where one is set
        limit = getattr(tok, "max_length", None)
        enc = tok(text, return_tensors="pt", truncation=limit is not None, max_length=limit,
                  return_special_tokens_mask=True, return_offsets_mapping=True, **params)  # fmt: skip
        keep = [k for k in enc if k != "overflow_to_sample_mapping"]
        n = len(enc["input_ids"])
        return [
            {**{k: enc[k][i : i + 1] for k in keep}, "sentence": sentence, "is_last": i == n - 1,
             "word_ids": enc.word_ids(i) if split else None, "word_to_chars_map": word_chars}
            for i in range(n)
        ]  # fmt: skip

    def _run(self, chunks: list[dict], size: int) -> list[dict]:
        """The logits of each window, the windows run `size` at a time (padded as transformers pads them)."""
        model, out = self.model, []
        for i in range(0, len(chunks), size):
            group = chunks[i : i + size]
            tensors = [{k: v for k, v in c.items() if torch.is_tensor(v)} for c in group]
            batch = pad_batch(tensors, self.tokenizer)
            inputs = {k: batch[k].to(model.device) for k in self.tokenizer.model_input_names if k in batch}
            with torch.no_grad():
                logits = model(**inputs, use_cache=False).logits.cpu()
            for j, chunk in enumerate(group):
                row = {k: batch[k][j : j + 1] for k in tensors[j]}
                out.append({**chunk, **row, "logits": logits[j : j + 1]})
        return out

    def _postprocess(self, outputs: list[dict], how: str, ignore) -> list[dict]:
        entities = []
        for out in outputs:
            logits = out["logits"][0].float().numpy()
            shifted = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
            scores = shifted / shifted.sum(axis=-1, keepdims=True)
            pre = self._pre_entities(
                outputs[0]["sentence"], out, scores, how, outputs[0]["word_to_chars_map"]
            )
            entities += [
                e for e in self._aggregate(pre, how)
                if e.get("entity") not in ignore and e.get("entity_group") not in ignore
            ]  # fmt: skip
        return _merge_overlapping(entities) if len(outputs) > 1 else entities

    def _pre_entities(self, sentence: str, out: dict, scores: np.ndarray, how: str, word_chars) -> list[dict]:
        """transformers' gather_pre_entities: per token that is not special, its token string, scores, character
        span and whether it continues the word before it."""
        tok = self.tokenizer
        ids, offsets = out["input_ids"][0].tolist(), out["offset_mapping"][0].tolist()
        special, word_ids = out["special_tokens_mask"][0].tolist(), out["word_ids"]
        backend = getattr(tok, "backend_tokenizer", None)
        word_aware = backend is not None and getattr(backend.model, "continuing_subword_prefix", None)
        pre = []
        for idx, token_scores in enumerate(scores):
            if special[idx]:
                continue
            word = tok.convert_ids_to_tokens(ids[idx])
            start, end = offsets[idx]
            if word_ids is not None and word_chars is not None and word_ids[idx] is not None:
                start, end = start + word_chars[word_ids[idx]][0], end + word_chars[word_ids[idx]][0]
            ref = sentence[start:end]
            # a tokenizer that marks a word's later pieces: a piece is a subword if it has the mark
            if word_aware:
                subword = len(word) != len(ref)
            else:
                if how in WORD_STRATEGIES:
                    warnings.warn(
                        "Tokenizer does not support real words, using fallback heuristic",
                        UserWarning,
                        stacklevel=2,
                    )
                subword = start > 0 and " " not in sentence[start - 1 : start + 1]
            if ids[idx] == tok.unk_token_id:
                word, subword = ref, False
            pre.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": idx,
                        "is_subword": subword})  # fmt: skip
        return pre

    def _label(self, i) -> str:
        names = self.model.config.id2label or {}
        return names.get(int(i), f"LABEL_{int(i)}")

    def _aggregate(self, pre: list[dict], how: str) -> list[dict]:
        if how in ("none", "simple"):
            entities = []
            for p in pre:
                i = p["scores"].argmax()
                entities.append({"entity": self._label(i), "score": p["scores"][i], "index": p["index"],
                                 "word": p["word"], "start": p["start"], "end": p["end"]})  # fmt: skip
        else:
            entities, group = [], None
            for p in pre:
                if group is None:
                    group = [p]
                elif p["is_subword"]:
                    group.append(p)
                else:
                    entities.append(self._word(group, how))
                    group = [p]
            if group is not None:
                entities.append(self._word(group, how))
        return entities if how == "none" else self._group(entities)

    def _word(self, pieces: list[dict], how: str) -> dict:
        """transformers' aggregate_word: one word's tokens as one entity, its label by the first token's scores,
        the most confident token's, or the tokens' average scores."""
        word = self.tokenizer.convert_tokens_to_string([p["word"] for p in pieces])
        if how == "first":
            scores = pieces[0]["scores"]
        elif how == "max":
            scores = max(pieces, key=lambda p: p["scores"].max())["scores"]
        else:
            scores = np.nanmean(np.stack([p["scores"] for p in pieces]), axis=0)
        i = scores.argmax()
        return {"entity": self._label(i), "score": scores[i], "word": word, "start": pieces[0]["start"],
                "end": pieces[-1]["end"]}  # fmt: skip

    def _group(self, entities: list[dict]) -> list[dict]:
        """transformers' group_entities: adjacent entities of one tag joined unless the next begins (B-)."""
        groups, current = [], []
        for e in entities:
            if current:
                bi, tag = get_tag(e["entity"])
                if not (tag == get_tag(current[-1]["entity"])[1] and bi != "B"):
                    groups.append(self._group_of(current))
                    current = []
            current.append(e)
        if current:
            groups.append(self._group_of(current))
        return groups

    def _group_of(self, entities: list[dict]) -> dict:
        return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
                "score": np.mean(np.nanmean([e["score"] for e in entities])),
                "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
                "start": entities[0]["start"], "end": entities[-1]["end"]}  # fmt: skip


def _merge_overlapping(entities: list[dict]) -> list[dict]:
    """transformers' aggregate_overlapping_entities: of the windows' entities that overlap, the longest (then the
    most confident) is kept."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda x: x["start"])
    kept, previous = [], entities[0]
    for e in entities:
        if previous["start"] <= e["start"] < previous["end"]:
            length, previous_length = e["end"] - e["start"], previous["end"] - previous["start"]
            if length > previous_length or (length == previous_length and e["score"] > previous["score"]):
                previous = e
        else:
            kept.append(previous)
            previous = e
    kept.append(previous)
    return kept
