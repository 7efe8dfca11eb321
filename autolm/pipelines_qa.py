"""`pipeline("question-answering")`: transformers' extractive QuestionAnsweringPipeline (transformers 4's; 5 dropped
the task) on a QA model (`AutoModelForQuestionAnswering`) and autolm's tokenizer: the question and the context
encoded as a pair, a context too long for max_seq_len split into windows overlapping by doc_stride tokens, each
window's start and end logits softmaxed over the context's tokens, the best spans (start <= end, at most
max_answer_len tokens) scored by p(start) * p(end), mapped back to the context's characters (whole words with
align_to_words); the same answer from several windows adds its scores."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import GenerationError
from .pipelines_spans import check_keys


def decode_spans(start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int, undesired: np.ndarray):
    """transformers' decode_spans: the topk spans by p(start) * p(end) with start <= end < start + max_answer_len,
    of those, the ones whose ends are both allowed (undesired: 1 where a token may be in the answer)."""
    start, end = (x[None] if x.ndim == 1 else x for x in (start, end))
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    flat = candidates.flatten()
    if topk == 1:
        order = [np.argmax(flat)]
    elif len(flat) <= topk:
        order = np.argsort(-flat)
    else:
        idx = np.argpartition(-flat, topk)[0:topk]
        order = idx[np.argsort(-flat[idx])]
    starts, ends = np.unravel_index(order, candidates.shape)[1:]
    allowed = undesired.nonzero()
    keep = np.isin(starts, allowed) & np.isin(ends, allowed)
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[0, starts, ends]


def select_starts_ends(start, end, p_mask, attention_mask, min_null_score=1000000, top_k=1,
                       handle_impossible_answer=False, max_answer_len=15):  # fmt: skip
    """transformers' select_starts_ends: the logits of tokens that cannot be in the answer (p_mask, padding) set to
    -10000, softmaxed; the null answer's score (first token's start * end) kept where asked; the spans."""
    undesired = np.abs(np.array(p_mask) - 1)
    if attention_mask is not None:
        undesired = undesired & attention_mask
    masked = undesired == 0.0
    start = np.where(masked, -10000.0, start)
    end = np.where(masked, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0
    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired)
    return starts, ends, scores, min_null_score


def _examples(args: tuple, kwargs: dict) -> list[dict]:
    """transformers' QuestionAnsweringArgumentHandler: {"question", "context"} dicts from (question, context),
    a dict or a list of them, or question= and context= (strings or lists)."""
    if args:
        if len(args) == 2 and all(isinstance(a, str) for a in args):
            items = [{"question": args[0], "context": args[1]}]
        else:
            items = args[0] if len(args) == 1 else list(args)
    elif "question" in kwargs and "context" in kwargs:
        q, c = kwargs["question"], kwargs["context"]
        if isinstance(q, list) and isinstance(c, list) and len(q) != len(c):
            raise GenerationError(f"question and context: {len(q)} questions for {len(c)} contexts")
        if isinstance(q, list):
            items = [{"question": x, "context": c[i] if isinstance(c, list) else c} for i, x in enumerate(q)]
        elif isinstance(q, str) and isinstance(c, str):
            items = [{"question": q, "context": c}]
        else:
            raise GenerationError("question and context: expected strings or lists of strings")
    else:
        raise GenerationError("question-answering pipeline: pass question= and context= (or {'question', "
                              "'context'} dicts)")  # fmt: skip
    items = [items] if isinstance(items, dict) else list(items)
    for item in items:
        if not isinstance(item, dict):
            raise GenerationError(f"question-answering pipeline: expected a {{'question', 'context'}} dict, "
                                  f"got {item!r}")  # fmt: skip
        for key in ("question", "context"):
            if key not in item:
                raise GenerationError(f"question-answering pipeline: an input has no {key!r}")
            if not isinstance(item[key], str) or not item[key]:
                raise GenerationError(f"{key}: expected a non-empty string, got {item[key]!r}")
    return items


class QuestionAnsweringPipeline:
    """Calls return, per question, {"score", "start", "end", "answer"} (start and end: the answer's characters in
    the context), or a list of the top_k best; for several questions, a list of those. Each window runs alone
    (batch_size is taken and runs the same windows). Arguments given to `pipeline()` are every call's defaults."""

    task = "question-answering"
    call_args = ("top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len",
                 "handle_impossible_answer", "align_to_words", "padding", "batch_size", "question", "context")  # fmt: skip

    def __init__(self, model, tokenizer, batch_size: int = 1, **defaults: Any):
        check_keys("question-answering pipeline", defaults, self.call_args)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.defaults = defaults

    def __call__(self, *args: Any, **kwargs: Any):
        check_keys("question-answering pipeline", kwargs, self.call_args)
        examples = _examples(args, kwargs)
        opts = {**self.defaults, **kwargs}
        top_k, max_answer_len = opts.get("top_k", 1), opts.get("max_answer_len", 15)
        if top_k < 1:
            raise GenerationError(f"top_k parameter should be >= 1 (got {top_k})")
        if max_answer_len < 1:
            raise GenerationError(f"max_answer_len parameter should be >= 1 (got {max_answer_len})")
        out = []
        for example in examples:
            windows = self._windows(example, opts.get("padding", "do_not_pad"), opts.get("doc_stride"),
                                    opts.get("max_seq_len"))  # fmt: skip
            out.append(self._answers(example, windows, top_k, bool(opts.get("handle_impossible_answer", False)),
                                     max_answer_len, opts.get("align_to_words", True)))  # fmt: skip
        return out[0] if len(out) == 1 else out

    @property
    def _question_first(self) -> bool:
        return self.tokenizer.padding_side == "right"

    def _windows(self, example: dict, padding, doc_stride: int | None, max_seq_len: int | None) -> list[dict]:
        """The pair encoded in windows of max_seq_len tokens (default min(model_max_length, 384)) overlapping by
        doc_stride (default min(max_seq_len // 2, 128)): each window's ids, mask, p_mask (1 where the token is
        not the context's) and its tokenizers.Encoding."""
        tok = self.tokenizer
        max_seq_len = min(tok.model_max_length, 384) if max_seq_len is None else max_seq_len
        doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
        if doc_stride > max_seq_len:
            raise GenerationError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})")
        first = self._question_first
        q, c = example["question"], example["context"]
        enc = tok(text=q if first else c, text_pair=c if first else q, padding=padding,
                  truncation="only_second" if first else "only_first", max_length=max_seq_len, stride=doc_stride,
                  return_token_type_ids=True, return_overflowing_tokens=True, return_offsets_mapping=True,
                  return_special_tokens_mask=True)  # fmt: skip
        windows = []
        for i, ids in enumerate(enc["input_ids"]):
            p_mask = [s != 1 if first else 0 for s in enc.sequence_ids(i)]
            # a CLS token stays allowed (some models answer "impossible" there)
            if tok.cls_token_id is not None:
                p_mask = [0 if t == tok.cls_token_id else m for t, m in zip(ids, p_mask)]
            inputs = {k: torch.tensor([enc[k][i]]) for k in tok.model_input_names if k in enc}
            windows.append({"inputs": inputs, "p_mask": p_mask, "encoding": enc[i]})
        return windows

    def _logits(self, window: dict) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        with torch.no_grad():
            out = model(**{k: v.to(model.device) for k, v in window["inputs"].items()}, use_cache=False)
        return out.start_logits.float().cpu(), out.end_logits.float().cpu()

    def _answers(self, example, windows, top_k, impossible, max_answer_len, align_to_words):
        """transformers' postprocess: each window's best spans (top_k * 2 + 10 of them with align_to_words, as
        some merge) as character spans of the context, the same answer's scores added, the top_k best."""
        min_null_score, answers, tok = 1000000, [], self.tokenizer
        for window in windows:
            start, end = self._logits(window)
            mask = window["inputs"].get("attention_mask")
            starts, ends, scores, min_null_score = select_starts_ends(
                start.numpy(), end.numpy(), window["p_mask"], None if mask is None else mask.numpy(),
                min_null_score, top_k * 2 + 10 if align_to_words else top_k, impossible, max_answer_len,
            )  # fmt: skip
            shift = 0
            if tok.padding_side == "left" and tok.pad_token_id is not None:  # the encoding was not padded
                shift = int((window["inputs"]["input_ids"] == tok.pad_token_id).sum())
            for s, e, score in zip(starts, ends, scores):
                a, b = _char_span(window["encoding"], s - shift, e - shift, 1 if self._question_first else 0,
                                  align_to_words)  # fmt: skip
                text = example["context"][a:b]
                same = next((x for x in answers if x["answer"].lower() == text.lower()), None)
                if same is not None:
                    same["score"] += score.item()
                else:
                    answers.append({"score": score.item(), "start": a, "end": b, "answer": text})
        if impossible:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers


def _char_span(enc, s: int, e: int, sequence_index: int, align_to_words: bool) -> tuple[int, int]:
    """transformers' get_indices: the characters of the words holding tokens s and e (or of the tokens alone where
    asked, or where the tokenizer has no words for them)."""
    s, e = int(s), int(e)
    if align_to_words:
        try:
            first, last = enc.token_to_word(s), enc.token_to_word(e)
            return (enc.word_to_chars(first, sequence_index=sequence_index)[0],
                    enc.word_to_chars(last, sequence_index=sequence_index)[1])  # fmt: skip
        except Exception:  # as transformers: some tokenizers have no words for these tokens
            pass
    return enc.offsets[s][0], enc.offsets[e][1]
