"""Speculative decoding (issue #33): generate(assistant_model=...) and generate(prompt_lookup_num_tokens=...)
give plain greedy decoding's tokens exactly and, when sampling, the model's own distribution (checked against
the exact distribution of short continuations with a chi-square test under a fixed seed); batches, logits
processors, stopping criteria, streaming, the draft's fast decode step, transformers' schedules; the real
SmolLM2 (its int4 GGUF drafting for its fp32 self) and the CLI's --draft-model / --prompt-lookup."""

from __future__ import annotations

import collections
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, padded_batch

import autolm
import autolm.generation.speculative as speculative
from autolm.errors import GenerationError
from autolm.generation.candidates import roc_threshold

GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def target(checkpoint, tmp_path_factory):
    """A tiny Qwen2 (random weights, 160 tokens) with room for 512 positions."""
    directory, _ = checkpoint("qwen2_tied_bias")
    roomy = tmp_path_factory.mktemp("roomy") / "qwen2"
    shutil.copytree(directory, roomy)
    cfg = json.loads((roomy / "config.json").read_text())
    cfg["max_position_embeddings"] = 512
    (roomy / "config.json").write_text(json.dumps(cfg))
    return autolm.AutoModelForCausalLM.from_pretrained(roomy)


def noisy(model, scale: float, seed: int = 0):
    """A copy of the model with noise on every weight: a draft that agrees with it on some tokens, not all."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return out


@pytest.fixture(scope="module")
def draft(target):
    return noisy(target, 0.1)


def prompt(seed: int = 0, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


# ---- greedy: the tokens of plain greedy decoding ----------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_assistant_tokens=4, assistant_confidence_threshold=0.0),
        dict(
            num_assistant_tokens=2,
            num_assistant_tokens_schedule="heuristic",
            assistant_confidence_threshold=0.0,
        ),
        dict(),  # transformers' defaults: 20 tokens, constant, stop below 0.4 confidence
    ],
)
def test_greedy_with_a_draft_model_is_plain_greedy(target, draft, rounds, settings):
    ids = prompt()
    plain = target.generate(ids, max_new_tokens=60, **GREEDY)
    out = target.generate(ids, max_new_tokens=60, assistant_model=draft, **GREEDY, **settings)
    assert torch.equal(out, plain)
    assert len(rounds) > 5
    if settings:  # candidates were both accepted in full and rejected, so the caches were rolled back
        assert any(n == k for n, k in rounds) and any(n < k for n, k in rounds)


def test_greedy_with_a_draft_of_another_family_is_plain_greedy(target, checkpoint, rounds):
    other = autolm.AutoModelForCausalLM.from_pretrained(checkpoint("llama_gqa_llama3_sharded")[0])
    ids = prompt(1)
    plain = target.generate(ids, max_new_tokens=40, **GREEDY)
    out = target.generate(
        ids, max_new_tokens=40, assistant_model=other, assistant_confidence_threshold=0.0, **GREEDY
    )
    assert torch.equal(out, plain) and rounds


@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_greedy_prompt_lookup_is_plain_greedy(target, rounds, ngram):
    ids = prompt()
    plain = target.generate(ids, max_new_tokens=120, **GREEDY)
    out = target.generate(
        ids, max_new_tokens=120, prompt_lookup_num_tokens=6, max_matching_ngram_size=ngram, **GREEDY
    )
    assert torch.equal(out, plain)
    assert any(n < k for n, k in rounds)
    if ngram > 1:  # this model falls into a loop, which the lookup copies whole (one token matches too early)
        assert any(n == k == 6 for n, k in rounds)


@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_rounds_stop_short_of_the_longrope_switch_and_tokens_stay_plain_greedy(checkpoint, monkeypatch, kind):
    """LongRoPE (switch at 9 tokens here): a round never verifies across the switch, the one-token step that
    crosses it recomputes the sequence as plain decoding does, and speculation goes on after it."""
    directory, _ = checkpoint("phi3_longrope")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    switch = model.config.rope_parameters["original_max_position_embeddings"] + 1
    verified = []  # (cached length, candidates) of each verifying forward
    verify = speculative._verify
    monkeypatch.setattr(
        speculative,
        "_verify",
        lambda run, c, hidden: verified.append((run.cache.length, c.shape[1])) or verify(run, c, hidden),
    )
    ids = torch.tensor([[5, 9, 5, 9, 5]])
    plain = model.generate(ids, max_new_tokens=30, **GREEDY)
    extra = dict(assistant_model=noisy(model, 0.02)) if kind == "draft" else dict(prompt_lookup_num_tokens=4)
    got = model.generate(ids, max_new_tokens=30, **extra, **GREEDY)
    assert torch.equal(got, plain)
    assert not any(cached < switch <= cached + k + 1 for cached, k in verified), verified
    assert any(cached >= switch for cached, _ in verified)  # speculation goes on past the switch
    assert kind == "lookup" or any(cached < switch for cached, _ in verified)  # and ran before it


@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_left_padded_batch_with_rows_ending_at_eos_is_plain_greedy(target, draft, rounds, kind):
    ids, mask = padded_batch(seed=3, lengths=(12, 7, 3))
    free = target.generate(ids, attention_mask=mask, max_new_tokens=60, **GREEDY)
    eos = int(free[1, 12 + 30])  # row 1 ends there, the others where this token first comes
    kw = dict(max_new_tokens=60, do_sample=False, eos_token_id=eos, pad_token_id=0)
    plain = target.generate(ids, attention_mask=mask, **kw)
    extra = (
        dict(assistant_model=draft, num_assistant_tokens=3, assistant_confidence_threshold=0.0)
        if kind == "draft"
        else dict(prompt_lookup_num_tokens=4)
    )
    out = target.generate(ids, attention_mask=mask, **kw, **extra)
    assert torch.equal(out, plain)
    assert (plain[1, 12 + 31 :] == 0).all() and rounds
    if kind == "draft":
        assert any(n > 0 for n, _ in rounds)


def test_equals_transformers_assisted_and_prompt_lookup_decoding(checkpoint):
    directory, ref = checkpoint("qwen2_tied_bias")
    other_dir, hf_draft = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ours = autolm.AutoModelForCausalLM.from_pretrained(other_dir)
    ids = prompt(2)
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = ref.generate(ids, assistant_model=hf_draft, **kw)
    assert torch.equal(model.generate(ids, assistant_model=ours, **kw), theirs)
    theirs = ref.generate(ids, prompt_lookup_num_tokens=3, **kw)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **kw), theirs)


def test_scores_logits_and_cache_come_per_token_as_in_plain_decoding(target, draft):
    ids = prompt(4)
    kw = dict(
        max_new_tokens=24, return_dict_in_generate=True, output_scores=True, output_logits=True, **GREEDY
    )
    plain = target.generate(ids, **kw)
    for extra in (
        dict(assistant_model=draft, assistant_confidence_threshold=0.0),
        dict(prompt_lookup_num_tokens=3),
    ):
        out = target.generate(ids, **kw, **extra)
        assert torch.equal(out.sequences, plain.sequences)
        assert len(out.scores) == len(out.logits) == 24
        for mine, theirs in zip(out.scores + out.logits, plain.scores + plain.logits):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
        # the cache holds the sequence minus its newest token, as after plain decoding
        assert out.past_key_values.get_seq_length() == plain.past_key_values.get_seq_length() == 12 + 23


class _Recorder(autolm.LogitsProcessor):
    """A caller's processor: halves one token's score and records the lengths of the rows it saw."""

    def __init__(self):
        self.lengths = []

    def __call__(self, input_ids, scores):
        self.lengths.append(input_ids.shape[1])
        return scores - 3.0 * (torch.arange(scores.shape[-1]) == 7).float()


@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_logits_processors_are_one_list_for_draft_and_model(target, draft, monkeypatch, kind):
    import autolm.generation.decode as decode

    built = []
    real = decode.logits_processors
    monkeypatch.setattr(decode, "logits_processors", lambda *a, **k: built.append(1) or real(*a, **k))
    ids = prompt(5)
    extra = (
        dict(assistant_model=draft, assistant_confidence_threshold=0.0)
        if kind == "draft"
        else dict(prompt_lookup_num_tokens=4)
    )
    kw = dict(
        max_new_tokens=40,
        repetition_penalty=1.3,
        no_repeat_ngram_size=3,
        min_new_tokens=10,
        bad_words_ids=[[5, 6]],
        **GREEDY,
    )
    kw["eos_token_id"] = 2
    plain_recorder, recorder = _Recorder(), _Recorder()
    plain = target.generate(ids, logits_processor=[plain_recorder], **kw)
    built.clear()
    out = target.generate(ids, logits_processor=[recorder], **kw, **extra)
    assert torch.equal(out, plain)
    assert built == [1]  # built once for the whole generation, the draft included
    # the model scored every position with its own prefix; the draft (if any) ran the same processors
    assert set(plain_recorder.lengths) <= set(recorder.lengths)
    if kind == "draft":
        assert len(recorder.lengths) > len(plain_recorder.lengths)


# ---- stopping criteria and streaming ----------------------------------------------------------------------


class _Letters:
    """A tokenizer whose every token is one letter: enough for StopStringCriteria."""

    def decode(self, ids, **_):
        return "".join(chr(97 + int(i) % 26) for i in ids)


class _StopAt(autolm.StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_stopping_criteria_stop_where_plain_decoding_stops(target, draft, kind):
    ids = prompt()
    free = target.generate(ids, max_new_tokens=100, **GREEDY)[0, 12:]
    extra = (
        dict(assistant_model=noisy(target, 0.02), num_assistant_tokens=8, assistant_confidence_threshold=0.0)
        if kind == "draft"
        else dict(prompt_lookup_num_tokens=8)
    )
    letters = _Letters().decode(free.tolist())
    stop = letters[70:73]  # a stop string that ends inside a round of accepted candidates
    cases = [
        dict(eos_token_id=int(free[75]), pad_token_id=0),
        dict(stop_strings=[stop], tokenizer=_Letters(), eos_token_id=None),
        dict(stopping_criteria=[_StopAt(int(free[80]))], eos_token_id=None),
        dict(max_length=12 + 77, eos_token_id=None),
    ]
    for case in cases:
        case = case if "max_length" in case else dict(case, max_new_tokens=100)
        plain = target.generate(ids, do_sample=False, **case)
        out = target.generate(ids, do_sample=False, **case, **extra)
        assert torch.equal(out, plain), case
        assert out.shape[1] < 12 + 100, case


class _Collect:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


def test_streamers_get_every_token_in_order(target, draft):
    ids = prompt(6)
    plain, streamed = _Collect(), _Collect()
    target.generate(ids, max_new_tokens=30, streamer=plain, **GREEDY)
    target.generate(
        ids,
        max_new_tokens=30,
        streamer=streamed,
        assistant_model=draft,
        assistant_confidence_threshold=0.0,
        **GREEDY,
    )
    assert streamed.calls == plain.calls and streamed.calls[-1] == "end" and len(plain.calls) == 32
    lookup = _Collect()
    target.generate(ids, max_new_tokens=30, streamer=lookup, prompt_lookup_num_tokens=5, **GREEDY)
    assert lookup.calls == plain.calls


def test_the_draft_decodes_through_the_one_token_step(target, draft, monkeypatch):
    import autolm.step as step_module

    models = collections.Counter()
    real = step_module.OneTokenStep.__call__

    def counted(self, *args):
        models[id(self.model)] += 1
        return real(self, *args)

    monkeypatch.setattr(step_module.OneTokenStep, "__call__", counted)
    target.generate(prompt(), max_new_tokens=30, assistant_model=draft, num_assistant_tokens=4,
                    assistant_confidence_threshold=0.0, **GREEDY)  # fmt: skip
    assert models[id(draft)] > 20


# ---- sampling: the model's own distribution -----------------------------------------------------------------

WARP = dict(do_sample=True, temperature=0.8, top_k=4, eos_token_id=None, pad_token_id=0)


def exact_distribution(model, ids: torch.Tensor, depth: int, top_k: int = 4) -> dict[tuple, float]:
    """The probability of every continuation of `depth` tokens under WARP (temperature, then top-k), each
    prefix run through the model without a cache."""
    warp = autolm.LogitsProcessorList([autolm.TemperatureLogitsWarper(0.8), autolm.TopKLogitsWarper(top_k)])
    probs = {(): 1.0}
    for _ in range(depth):
        prefixes = list(probs)
        rows = torch.tensor([ids[0].tolist() + list(s) for s in prefixes])
        with torch.no_grad():
            p = warp(rows, model(rows).logits[:, -1].float()).softmax(-1)
        probs = {
            s + (t,): probs[s] * float(p[i, t])
            for i, s in enumerate(prefixes)
            for t in p[i].nonzero().flatten().tolist()
        }
    return probs


def one_row_at_a_time(model, ids: torch.Tensor, n: int, depth: int, **kw) -> torch.Tensor:
    """n continuations (n, depth), each from its own generate() call, all drawing from one generator."""
    g = torch.Generator().manual_seed(0)
    return torch.cat([
        model.generate(ids, max_new_tokens=depth, generator=g, **dict(WARP, top_k=3), **kw)[:, ids.shape[1] :]
        for _ in range(n)
    ])  # fmt: skip


def chi_square_p(samples: torch.Tensor, probs: dict[tuple, float]) -> float:
    """p-value of the samples (N, depth) under `probs` (cells expected fewer than 5 times pooled)."""
    counts = collections.Counter(tuple(r) for r in samples.tolist())
    if not set(counts) <= set(probs):
        return 0.0  # a continuation the model cannot produce
    n = samples.shape[0]
    cells, pooled_o, pooled_e = [], 0.0, 0.0
    for seq, p in probs.items():
        if n * p >= 5:
            cells.append((counts[seq], n * p))
        else:
            pooled_o, pooled_e = pooled_o + counts[seq], pooled_e + n * p
    if pooled_e > 0:
        cells.append((pooled_o, pooled_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.fixture(scope="module")
def rough_draft(target):
    """A draft whose distributions are a total variation of about 0.25 from the model's at each position:
    its candidates are often accepted and often rejected."""
    return noisy(target, 0.02, seed=1)


def test_speculative_sampling_keeps_the_models_distribution_in_a_batch(target, rough_draft, rounds):
    """4000 rows in one batch: each round keeps the fewest candidates any row accepted (here none), so rows that
    accepted more keep their own accepted candidate at the cut and the others draw from the residual."""
    ids = prompt(7, length=8)
    depth, n = 4, 4000
    exact = exact_distribution(target, ids, depth)
    assert total_variation(exact, exact_distribution(rough_draft, ids, depth)) > 0.2
    kw = dict(max_new_tokens=depth, num_return_sequences=n, seed=0, **WARP)
    out = target.generate(ids, assistant_model=rough_draft, num_assistant_tokens=3, assistant_confidence_threshold=0.0,
                          **kw)  # fmt: skip
    assert chi_square_p(out[:, 8:], exact) > 1e-3
    assert rounds
    # the test can tell: the draft's own samples fail it
    assert chi_square_p(rough_draft.generate(ids, **kw)[:, 8:], exact) < 1e-6


def test_speculative_sampling_keeps_the_models_distribution_one_row_at_a_time(target, rough_draft, rounds):
    """Batch 1, where no other row cuts a round short: every outcome of algorithm 1 is reached (acceptance,
    the residual after an accepted candidate, the model's own token after all were accepted)."""
    ids = prompt(8, length=8)
    exact = exact_distribution(target, ids, 4, top_k=3)
    samples = one_row_at_a_time(target, ids, 600, 4, assistant_model=rough_draft, num_assistant_tokens=2,
                                assistant_confidence_threshold=0.0)  # fmt: skip
    assert chi_square_p(samples, exact) > 1e-3
    assert {(0, 2), (1, 2), (2, 2)} <= set(rounds)


def test_sampling_with_prompt_lookup_keeps_the_models_distribution(target, rounds):
    """The prompt has its last token earlier, followed by likely tokens, so candidates are often drawn."""
    core = prompt(9, length=6)[0].tolist()
    likely = target.generate(torch.tensor([core]), max_new_tokens=4, **GREEDY)[0, 6:].tolist()
    ids = torch.tensor([likely + core])
    exact = exact_distribution(target, ids, 4, top_k=3)
    samples = one_row_at_a_time(target, ids, 600, 4, prompt_lookup_num_tokens=2, max_matching_ngram_size=1)
    assert chi_square_p(samples, exact) > 1e-3
    assert {n for n, _ in rounds} >= {0, 1}


# ---- how many tokens the draft proposes ---------------------------------------------------------------------


@pytest.fixture
def proposals(monkeypatch):
    """How many candidates each round proposed."""
    from autolm.generation import candidates

    seen = []
    real = candidates.Draft.propose

    def spy(self, run, limit):
        found = real(self, run, limit)
        seen.append(found.tokens.shape[1])
        return found

    monkeypatch.setattr(candidates.Draft, "propose", spy)
    return seen


def test_schedules_adapt_the_draft_length_as_transformers_does(target, draft, rounds, proposals):
    ids = prompt(10)
    kw = dict(max_new_tokens=80, assistant_model=draft, assistant_confidence_threshold=0.0, **GREEDY)
    draft.generation_config = None
    target.generate(ids, num_assistant_tokens=3, **kw)  # constant: 3 every round (fewer at the very end)
    assert set(proposals[:-2]) == {3} and draft.generation_config is None
    for schedule in ("heuristic", "heuristic_transient"):
        rounds.clear(), proposals.clear()
        target.generate(ids, num_assistant_tokens=3, num_assistant_tokens_schedule=schedule, **kw)
        num = 3
        # 2 more after a round that accepted all, else 1 fewer (the last rounds are capped by max_new_tokens)
        for (n, k), proposed in zip(rounds[:-3], proposals[1:]):
            num = num + 2 if n == k else max(1, num - 1)
            assert proposed == num
        assert {n == k for n, k in rounds} == {True, False}
    # heuristic keeps the length it reached in the draft's generation config, as transformers does
    rounds.clear()
    target.generate(ids, num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic", **kw)
    kept = 3
    for n, k in rounds:
        kept = kept + 2 if n == k else max(1, kept - 1)
    assert draft.generation_config.num_assistant_tokens == kept
    proposals.clear()
    target.generate(
        ids, num_assistant_tokens_schedule="constant", **kw
    )  # the draft's config when generate() says nothing
    assert proposals[0] == kept
    draft.generation_config = None


def test_a_draft_stops_at_a_token_it_is_unsure_of(target, draft, proposals):
    ids = prompt(11)
    target.generate(ids, max_new_tokens=30, assistant_model=draft, num_assistant_tokens=6,
                    assistant_confidence_threshold=0.0, **GREEDY)  # fmt: skip
    assert max(proposals) == 6
    proposals.clear()
    # random tiny models are never 99% sure of a token: drafts stop after their first, until six drafted
    # tokens, accepted and rejected, move the threshold to where acceptance starts
    target.generate(ids, max_new_tokens=30, assistant_model=draft, num_assistant_tokens=6,
                    assistant_confidence_threshold=0.99, **GREEDY)  # fmt: skip
    assert proposals[:5] == [1] * 5 and max(proposals) > 1


def test_confidence_threshold_moves_to_the_least_costly_roc_point():
    # separable: the lowest confidence of an accepted token separates them
    assert roc_threshold([0.9, 0.8, 0.3, 0.2, 0.6, 0.1], [1, 1, 0, 0, 1, 0]) == 0.6
    # not separable: at 0.5, fpr 1/3 + 3 * fnr 0 = 1/3; at 0.7, fpr 0 + 3 * 1/3 = 1; at 0.9, 0 + 3 * 2/3
    assert roc_threshold([0.9, 0.7, 0.5, 0.6, 0.2, 0.1], [1, 1, 1, 0, 0, 0]) == 0.5
    # accepted tokens were the unsure ones: at 0.1 the cost is fpr 1 + 0, below the 3 of stopping always (+inf)
    assert roc_threshold([0.9, 0.8, 0.7, 0.1, 0.2, 0.3], [0, 0, 0, 1, 1, 1]) == 0.1


# ---- mistakes -----------------------------------------------------------------------------------------------


def test_mistakes_are_generation_errors_naming_the_argument(target, draft, checkpoint):
    ids = prompt()
    with pytest.raises(GenerationError, match="assistant_model and prompt_lookup_num_tokens"):
        target.generate(ids, assistant_model=draft, prompt_lookup_num_tokens=3)
    with pytest.raises(GenerationError, match="prompt_lookup_num_tokens.*beam search"):
        target.generate(ids, prompt_lookup_num_tokens=3, num_beams=2)
    with pytest.raises(GenerationError, match="assistant_model.*beam search"):
        target.generate(ids, assistant_model=draft, num_beams=2)
    _, hf_model = checkpoint("qwen2_tied_bias")
    with pytest.raises(GenerationError, match="assistant_model must be an autolm model"):
        target.generate(ids, assistant_model=hf_model)
    smaller = copy.deepcopy(draft)
    smaller.resize_token_embeddings(150)
    with pytest.raises(GenerationError, match="vocabulary of 150 tokens and the model 160"):
        target.generate(ids, assistant_model=smaller)
    for bad, match in [
        (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be an integer >= 1"),
        (dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=0), "max_matching_ngram_size must be"),
        (dict(assistant_model=draft, num_assistant_tokens=0), "num_assistant_tokens must be"),
        (
            dict(assistant_model=draft, num_assistant_tokens_schedule="fast"),
            "num_assistant_tokens_schedule must be",
        ),
        (
            dict(assistant_model=draft, assistant_confidence_threshold=1.5),
            r"assistant_confidence_threshold must be in \[0, 1\]",
        ),
    ]:
        with pytest.raises(GenerationError, match=match):
            target.generate(ids, **bad)


# ---- the real SmolLM2 ---------------------------------------------------------------------------------------

PASSAGE = (
    "The old lighthouse stood on the northern cliff for two hundred years. Every night its keeper climbed the "
    "spiral stairs, trimmed the wick and watched the ships pass safely into the harbour below."
)


@pytest.fixture(scope="module")
def smol_pair(smol_dir, smol_gguf):
    """SmolLM2 in fp32 and, as its draft, the same model loaded from its GGUF as int4."""
    model = autolm.AutoModelForCausalLM.from_pretrained(smol_dir)
    draft = autolm.AutoModelForCausalLM.from_pretrained(
        smol_gguf[0], gguf_file=smol_gguf[1], quantization="int4"
    )
    return model, draft, autolm.AutoTokenizer.from_pretrained(smol_dir)


def chat(tok, text: str) -> torch.Tensor:
    msgs = [{"role": "user", "content": text}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")["input_ids"]


def test_smollm2_with_its_int4_self_as_draft_is_plain_greedy(smol_pair, rounds):
    model, draft, tok = smol_pair
    ids = chat(tok, "What is the capital of France? Answer in two sentences.")
    plain = model.generate(ids, max_new_tokens=48, do_sample=False)
    out = model.generate(ids, max_new_tokens=48, do_sample=False, assistant_model=draft)
    assert torch.equal(out, plain)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
    assert sum(n for n, _ in rounds) >= 0.6 * sum(k for _, k in rounds)  # the int4 copy mostly agrees


def test_smollm2_prompt_lookup_on_a_copy_task_is_plain_greedy(smol_pair, rounds):
    model, _, tok = smol_pair
    ids = chat(tok, f"Rewrite this passage, changing 'northern' to 'southern' and nothing else:\n\n{PASSAGE}")
    plain = model.generate(ids, max_new_tokens=64, do_sample=False)
    out = model.generate(ids, max_new_tokens=64, do_sample=False, prompt_lookup_num_tokens=10)
    assert torch.equal(out, plain)
    assert "ships pass safely into the harbour" in tok.decode(
        out[0, ids.shape[1] :]
    )  # a copy (135M: no edit)
    assert sum(n + 1 for n, _ in rounds) >= 24  # most of the reply came from verified copies


def test_smollm2_streams_and_stops_as_plain_decoding(smol_pair):
    model, draft, tok = smol_pair
    prompt_ids = chat(tok, f"Repeat this passage word for word:\n\n{PASSAGE}")[0].tolist()
    kw = dict(max_new_tokens=60, stop_strings=["harbour"])
    plain = list(autolm.stream_generate(model, tok, prompt_ids, **kw))
    for extra in (dict(prompt_lookup_num_tokens=8), dict(assistant_model=draft)):
        pieces = list(autolm.stream_generate(model, tok, prompt_ids, **kw, **extra))
        assert [p.text for p in pieces] == [p.text for p in plain]
        assert [p.finish_reason for p in pieces] == [p.finish_reason for p in plain]
    assert "harbour" in "".join(p.text for p in plain) and plain[-1].finish_reason == "stop"


def test_cli_draft_model_and_prompt_lookup_print_the_plain_reply(smol_dir, smol_gguf, tmp_path):
    def run(*flags):
        env = dict(os.environ, AUTOLM_HOME=str(tmp_path))
        cmd = [
            sys.executable,
            "-m",
            "autolm.cli",
            "generate",
            smol_dir,
            "What is the capital of France?",
            "--chat",
        ]
        cmd += ["--max-new-tokens", "32", *flags]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    plain = run()
    assert plain.returncode == 0, plain.stderr
    for flags in (["--prompt-lookup", "6"], ["--draft-model", os.path.join(*smol_gguf)]):
        fast = run(*flags)
        assert fast.returncode == 0, fast.stderr
        assert fast.stdout == plain.stdout and "Paris" in fast.stdout
    both = run("--prompt-lookup", "6", "--draft-model", os.path.join(*smol_gguf))
    assert both.returncode == 1 and both.stderr.strip().endswith("give one of them")
    missing = run("--draft-model", str(tmp_path / "nope"))
    assert (
        missing.returncode == 1
        and "--draft-model" in missing.stderr
        and "no such directory" in missing.stderr
    )
    assert len(missing.stderr.strip().splitlines()) == 1


def test_the_bench_row_reports_identical_tokens_and_tokens_per_forward(smol_pair):
    from autolm.bench.speculative import _row

    model, _, tok = smol_pair
    row = _row("fp32, prompt lookup", model, tok, "copy/edit", 24, 1, prompt_lookup_num_tokens=10)
    assert row["identical"] and row["new_tokens"] == 24
    assert row["tokens_per_forward"] > 2 and row["plain_tps"] > 0 and row["speculative_tps"] > 0
