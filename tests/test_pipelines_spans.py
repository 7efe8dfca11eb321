"""pipeline("token-classification" / "ner"), "question-answering" and "zero-shot-classification" with only the
import changed, on tiny Llama and Qwen2 checkpoints transformers wrote, beside two real fast tokenizers: SmolLM2's
byte-level BPE (no word marks: words found by transformers' fallback heuristic) and a WordPiece-style BPE trained
here ("##" marks a word's later pieces; [CLS]/[SEP] special tokens). Labels, words, character spans and answers
equal transformers'; scores agree to float32 rounding. transformers 5 dropped the question-answering pipeline, so
its reference is transformers 4's post-processing as transformers 5 still ships it (select_starts_ends, with
transformers' tokenizer and model), the window and answer glue of transformers 4.57's pipeline restated below."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import autolm
from autolm.errors import GenerationError

TEXTS = [
    "My name is Wolfgang and I live in Berlin",
    "Hugging Face Inc. is a company based in New York City",
    "The quick brown fox jumps over the lazy dog",
    "Sarah lives in London with her unbelievable cat",
]
LONG = " ".join(TEXTS)
NER = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
NLI = ["contradiction", "neutral", "entailment"]


def _smol_tokenizer(directory: str, smol_gguf) -> int:
    """SmolLM2's tokenizer (its GGUF's, as tokenizer.json) with model_max_length 24, so long texts get windows."""
    from autolm.tokenizer.core import Tokenizer

    tok = Tokenizer.from_gguf(os.path.join(*smol_gguf))
    tok.model_max_length = 24
    tok.save_pretrained(directory)
    return len(tok)


def _wordpiece_tokenizer(directory: str) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                  continuing_subword_prefix="##", show_progress=False)  # fmt: skip
    tok.train_from_iterator(TEXTS * 3, trainer)
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])  # fmt: skip
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
              "model_max_length": 24}  # fmt: skip
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smol_gguf):
    """folder(head, family, tokenizer) -> a directory with transformers' tiny model (its weights drawn by
    transformers, initializer_range 0.3 so that labels differ clearly) and the tokenizer's files."""
    import transformers

    made: dict[tuple, str] = {}

    def get(head: str, family: str, tokenizer: str) -> str:
        key = (head, family, tokenizer)
        if key not in made:
            d = str(tmp_path_factory.mktemp(f"{head}-{family}-{tokenizer}"))
            vocab = _smol_tokenizer(d, smol_gguf) if tokenizer == "smol" else _wordpiece_tokenizer(d)
            path = os.path.join(d, "tokenizer_config.json")
            with open(path) as f:  # not the family's own tokenizer class: the tokenizer.json as it is
                config = {**json.load(f), "tokenizer_class": "PreTrainedTokenizerFast"}
            with open(path, "w") as f:
                json.dump(config, f)
            labels = NLI if head == "SequenceClassification" else NER
            cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
            cfg = cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, pad_token_id=0,
                      id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)})  # fmt: skip
            torch.manual_seed(0)
            getattr(transformers, f"AutoModelFor{head}").from_config(cfg).save_pretrained(d)
            made[key] = d
        return made[key]

    return get


def _same(want, got) -> None:
    """Equal results but for the scores, which agree to float32 rounding."""

    def strip(r):
        if isinstance(r, list):
            return [strip(x) for x in r]
        return {k: v for k, v in r.items() if k not in ("score", "scores")}

    def scores(r):
        if isinstance(r, list):
            return [s for x in r for s in scores(x)]
        return [float(s) for s in r["scores"]] if "scores" in r else [float(r["score"])]

    assert strip(got) == strip(want)
    torch.testing.assert_close(torch.tensor(scores(got)), torch.tensor(scores(want)), atol=2e-5, rtol=1e-4)


TOKEN_CASES = [
    ((TEXTS[0],), {}),
    ((TEXTS,), {"batch_size": 2, "ignore_labels": []}),  # padded batches, as transformers batches them
    ((TEXTS[:2],), {"aggregation_strategy": "simple", "ignore_labels": []}),
    ((TEXTS[1:3],), {"aggregation_strategy": "first", "ignore_labels": ["B-LOC"]}),
    ((TEXTS[1:],), {"aggregation_strategy": "average", "batch_size": 3}),
    ((TEXTS[:3],), {"aggregation_strategy": "max", "ignore_labels": ["I-PER"]}),
    ((LONG,), {"stride": 6, "aggregation_strategy": "simple", "ignore_labels": []}),  # windows of 24 tokens
    ((LONG,), {"stride": 4, "aggregation_strategy": "max"}),
    ((TEXTS[0].split(),), {"is_split_into_words": True, "ignore_labels": []}),
    (([TEXTS[0].split(), TEXTS[1].split()],), {"is_split_into_words": True, "aggregation_strategy": "first"}),
]


@pytest.mark.parametrize("family,tokenizer", [("qwen2", "smol"), ("llama", "wordpiece")])
def test_token_classification_as_transformers(folder, family, tokenizer):
    """Per token (entity, score, index, word, start, end) or per entity group, for one text, a batch, windows of a
    long text and pre-split words, each aggregation_strategy, ignore_labels; arguments given to pipeline() act
    as every call's."""
    import transformers

    d = folder("TokenClassification", family, tokenizer)
    pipes = [lib.pipeline("ner" if lib is autolm else "token-classification", model=d)
             for lib in (transformers, autolm)]  # fmt: skip
    assert (
        type(pipes[1].model).__name__ == f"{'Qwen2' if family == 'qwen2' else 'Llama'}ForTokenClassification"
    )
    for args, kwargs in TOKEN_CASES:
        want, got = (pipe(*args, **kwargs) for pipe in pipes)
        assert want, (args, kwargs)
        _same(want, got)
    made = [lib.pipeline("token-classification", model=d, aggregation_strategy="first", ignore_labels=["I-PER"])
            for lib in (transformers, autolm)]  # fmt: skip
    _same(made[0](TEXTS), made[1](TEXTS))


def _qa_reference(model, tok, question, context, top_k=1, doc_stride=None, max_answer_len=15, max_seq_len=None,
                  handle_impossible_answer=False, align_to_words=True):  # fmt: skip
    """transformers 4.57's QuestionAnsweringPipeline for one question on a fast tokenizer: its preprocess and
    postprocess restated over transformers' tokenizer, model and select_starts_ends."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    max_seq_len = min(tok.model_max_length, 384) if max_seq_len is None else max_seq_len
    doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
    first = tok.padding_side == "right"
    enc = tok(text=question if first else context, text_pair=context if first else question,
              truncation="only_second" if first else "only_first", max_length=max_seq_len, stride=doc_stride,
              return_token_type_ids=True, return_overflowing_tokens=True, return_offsets_mapping=True)  # fmt: skip
    null, answers = 1000000, []
    for i, ids in enumerate(enc["input_ids"]):
        p_mask = [
            0 if t == tok.cls_token_id else (s != 1 if first else 0) for t, s in zip(ids, enc.sequence_ids(i))
        ]
        mask = np.array([enc["attention_mask"][i]])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor(mask), use_cache=False)
        starts, ends, scores, null = select_starts_ends(out.start_logits, out.end_logits, p_mask, mask, null,
                                                        top_k * 2 + 10 if align_to_words else top_k,
                                                        handle_impossible_answer, max_answer_len)  # fmt: skip
        e = enc[i]
        for s, t, score in zip(starts, ends, scores):
            a, b = e.offsets[s][0], e.offsets[t][1]
            if align_to_words:
                try:
                    a = e.word_to_chars(e.token_to_word(s), sequence_index=1 if first else 0)[0]
                    b = e.word_to_chars(e.token_to_word(t), sequence_index=1 if first else 0)[1]
                except Exception:
                    a, b = e.offsets[s][0], e.offsets[t][1]
            same = [x for x in answers if x["answer"].lower() == context[a:b].lower()]
            if same:
                same[0]["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": a, "end": b, "answer": context[a:b]})
    if handle_impossible_answer:
        answers.append({"score": null, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


QA_CASES = [
    {"question": "Where do I live?", "context": TEXTS[0]},
    {"question": "Who?", "context": LONG, "top_k": 3},  # windows of 24 tokens, 12 overlapping
    {"question": "Where?", "context": LONG, "max_seq_len": 20, "doc_stride": 5},
    {
        "question": "Where?",
        "context": LONG,
        "max_seq_len": 24,
        "doc_stride": 8,
        "top_k": 4,
        "max_answer_len": 3,
    },
    {"question": "Where?", "context": TEXTS[1], "handle_impossible_answer": True, "top_k": 2},
    {"question": "Where?", "context": TEXTS[2], "align_to_words": False, "top_k": 5},
    {"question": "What?", "context": TEXTS[3], "max_answer_len": 1, "top_k": 2},
]


@pytest.mark.parametrize("family,tokenizer", [("qwen2", "smol"), ("llama", "wordpiece")])
def test_question_answering_as_transformers_4(folder, family, tokenizer):
    """{answer, score, start, end} (or the top_k best) for a question over a context, long contexts in windows
    (max_seq_len, doc_stride), max_answer_len, handle_impossible_answer, align_to_words; the call forms transformers'
    pipeline took (question=/context=, a dict, a list of them, two strings); a left-padding tokenizer puts the
    context first, as transformers did."""
    import transformers

    d = folder("QuestionAnswering", family, tokenizer)
    ref, tok = (
        transformers.AutoModelForQuestionAnswering.from_pretrained(d),
        transformers.AutoTokenizer.from_pretrained(d),
    )
    pipe = autolm.pipeline("question-answering", model=d)
    assert type(pipe.model).__name__ == type(ref).__name__
    for side in ("right", "left"):
        tok.padding_side = pipe.tokenizer.padding_side = side
        for case in QA_CASES:
            _same(_qa_reference(ref, tok, **case), pipe(**case))
    tok.padding_side = pipe.tokenizer.padding_side = "right"
    want = [_qa_reference(ref, tok, "Who?", t, top_k=2) for t in TEXTS[:2]]
    _same(want, pipe([{"question": "Who?", "context": t} for t in TEXTS[:2]], top_k=2))
    _same(want, pipe(question=["Who?", "Who?"], context=TEXTS[:2], top_k=2))
    _same(want[0], pipe("Who?", TEXTS[0], top_k=2))
    made = autolm.pipeline("question-answering", model=d, top_k=2, max_answer_len=2)
    _same(
        _qa_reference(ref, tok, "Who?", TEXTS[1], top_k=2, max_answer_len=2),
        made(question="Who?", context=TEXTS[1]),
    )


@pytest.mark.parametrize("family,tokenizer", [("qwen2", "smol"), ("llama", "wordpiece")])
def test_zero_shot_classification_as_transformers(folder, family, tokenizer):
    """The candidate labels ranked by an NLI classifier's entailment logit (softmaxed over the labels, or against
    contradiction per label with multi_label or one label), hypothesis_template, a long text truncated."""
    import transformers

    d = folder("SequenceClassification", family, tokenizer)
    pipes = [lib.pipeline("zero-shot-classification", model=d) for lib in (transformers, autolm)]
    for args, kwargs in (
        ((TEXTS[0], ["travel", "cooking", "sports"]), {}),
        ((TEXTS[:2],), {"candidate_labels": "travel, cooking"}),
        ((TEXTS[1],), {"candidate_labels": ["a", "b", "c"], "multi_label": True}),
        ((TEXTS[2], ["animals"]), {}),
        ((TEXTS[3],), {"candidate_labels": ["x", "y"], "hypothesis_template": "It is about {}"}),
        ((LONG,), {"candidate_labels": ["x", "y"]}),
    ):
        _same(*(pipe(*args, **kwargs) for pipe in pipes))


def test_bad_arguments_are_named(folder):
    ner = autolm.pipeline("ner", model=folder("TokenClassification", "llama", "smol"))
    qa = autolm.pipeline("question-answering", model=folder("QuestionAnswering", "qwen2", "smol"))
    nli = autolm.pipeline("zero-shot-classification", model=folder("SequenceClassification", "llama", "smol"))
    for call, match in (
        (lambda: ner("a b", aggregation_strategy="best"), "aggregation_strategy"),
        (lambda: ner("a b", stride=4), "stride"),
        (lambda: ner("a b", stride=24, aggregation_strategy="simple"), "stride"),
        (lambda: ner("a b", ignore_labels="O"), "ignore_labels"),
        (lambda: ner("a b", offsets=[(0, 1)]), "offsets"),
        (lambda: autolm.pipeline("ner", model=ner.model, tokenizer=ner.tokenizer, topk=2), "topk"),
        (lambda: qa(question="a", context="b c", top_k=0), "top_k"),
        (lambda: qa(question="a", context="b c", max_answer_len=0), "max_answer_len"),
        (lambda: qa(question="a", context="b c", doc_stride=30, max_seq_len=20), "doc_stride"),
        (lambda: qa(question="a", context=""), "context"),
        (lambda: qa({"question": "a"}), "context"),
        (lambda: nli("a b", candidate_labels=[]), "candidate_labels"),
        (lambda: nli("a b", ["x"], hypothesis_template="no slot"), "hypothesis_template"),
    ):
        with pytest.raises(GenerationError, match=match):
            call()
