"""Logits processors, stopping criteria, generate()'s transformers arguments and GenerationConfig: each test
runs the same user code on transformers and on autolm (only the import swapped) and compares the results."""

from __future__ import annotations

import copy
import inspect
import json
import time

import pytest
import torch
from conftest import VOCAB, padded_batch

import autolm

NAME = "qwen2_tied_bias"
IDS, MASK = padded_batch(seed=3, lengths=(8, 5, 3))


def _libs():
    import transformers

    return [transformers, autolm]


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    """Equal where infinite, close elsewhere (tol: 1e-6 for the same scores in, 1e-4 through a model)."""
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a.isnan(), b.isnan())
    finite = torch.isfinite(a)
    torch.testing.assert_close(a[finite], b[finite], atol=tol, rtol=tol)


def _pair(checkpoint):
    import transformers

    directory, _ = checkpoint(NAME)
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    return ref, autolm.AutoModelForCausalLM.from_pretrained(directory)


# ---- each processor, warper and criterion on its own ----------------------------------------------------

EOS = [2, 7]
PROCESSORS = [
    ("RepetitionPenaltyLogitsProcessor", (1.7,), {}),
    ("RepetitionPenaltyLogitsProcessor", (0.6,), {"prompt_ignore_length": torch.tensor([3, 0, 5])}),
    ("RepetitionPenaltyLogitsProcessor", (1.3,), {"prompt_ignore_length": 4}),
    ("NoRepeatNGramLogitsProcessor", (2,), {}),
    ("NoRepeatNGramLogitsProcessor", (3,), {}),
    ("SequenceBiasLogitsProcessor", ({(5,): 2.5, (9, 11): -1.0, (3, 4, 12): 4.0},), {}),
    ("SequenceBiasLogitsProcessor", ([[[5], 2.5], [[9, 11], -1.0]],), {}),
    ("NoBadWordsLogitsProcessor", ([[5], [2], [9, 11]], EOS), {}),
    ("MinLengthLogitsProcessor", (12, EOS), {}),
    ("MinNewTokensLengthLogitsProcessor", (6, 3, EOS), {}),
    ("PrefixConstrainedLogitsProcessor", (lambda b, row: [int(row[-1]) % 7, 3 + b], 1), {}),
    ("ForcedBOSTokenLogitsProcessor", (4,), {}),
    ("ForcedEOSTokenLogitsProcessor", (9, EOS), {}),
    ("InfNanRemoveLogitsProcessor", (), {}),
    ("ExponentialDecayLengthPenalty", ((2, 1.4), EOS, 5), {}),
    ("SuppressTokensLogitsProcessor", ([1, 5, 8],), {}),
    ("SuppressTokensAtBeginLogitsProcessor", ([1, 5, 8], 8), {}),
    ("TemperatureLogitsWarper", (0.7,), {}),
    ("TopKLogitsWarper", (5,), {"min_tokens_to_keep": 7}),
    ("TopPLogitsWarper", (0.6,), {"min_tokens_to_keep": 2}),
    ("MinPLogitsWarper", (0.2,), {}),
    ("TopHLogitsWarper", (0.5,), {}),
    ("TypicalLogitsWarper", (0.7,), {}),
    ("EpsilonLogitsWarper", (0.01,), {"min_tokens_to_keep": 3}),
    ("EtaLogitsWarper", (0.05,), {}),
    ("LogitNormalization", (), {}),
]


@pytest.mark.parametrize("name, args, kwargs", PROCESSORS, ids=[p[0] for p in PROCESSORS])
def test_each_processor_equals_transformers(name, args, kwargs):
    g = torch.Generator().manual_seed(len(name))
    ids = torch.randint(0, VOCAB, (3, 8), generator=g)
    ids[:, -4:] = ids[:, 1:5]  # repeated n-grams, so the n-gram and bias rules have something to match
    scores = torch.randn(3, VOCAB, generator=g) * 3
    scores[1, 10] = float("nan") if name == "InfNanRemoveLogitsProcessor" else scores[1, 10]
    scores[2, 11] = -float("inf")
    ref, got = (getattr(lib, name)(*args, **kwargs)(ids, scores.clone()) for lib in _libs())
    _same(got, ref)
    lists = [lib.LogitsProcessorList([getattr(lib, name)(*args, **kwargs)]) for lib in _libs()]
    _same(lists[1](ids, scores.clone()), lists[0](ids, scores.clone()))


def test_exported_names_have_transformers_constructor_signatures():
    import transformers

    names = [p[0] for p in PROCESSORS] + [
        "LogitsProcessorList",
        "MaxLengthCriteria",
        "MaxTimeCriteria",
        "EosTokenCriteria",
        "StopStringCriteria",
        "StoppingCriteriaList",
    ]
    for name in names:
        theirs = inspect.signature(getattr(transformers, name).__init__).parameters
        ours = inspect.signature(getattr(autolm, name).__init__).parameters
        assert list(ours) == list(theirs), name
    assert issubclass(autolm.TopKLogitsWarper, autolm.LogitsProcessor)
    assert issubclass(autolm.MaxTimeCriteria, autolm.StoppingCriteria)


def test_stopping_criteria_equal_transformers(tmp_path):
    import transformers
    from conftest import write_char_tokenizer

    write_char_tokenizer(str(tmp_path))
    tokenizers = [
        transformers.AutoTokenizer.from_pretrained(tmp_path),
        autolm.AutoTokenizer.from_pretrained(tmp_path),
    ]
    text = ["Say stop now", "st then op", "xx sto", "pst and p"]
    ids = torch.tensor([[ord(c) - 29 for c in t.ljust(12)] for t in text])
    ids[1, -2:] = torch.tensor([ord("s") - 29, ord("t") - 29])
    results = []
    for lib, tok in zip(_libs(), tokenizers):
        past, future = time.time() - 100, time.time() + 100
        criteria = lib.StoppingCriteriaList(
            [lib.MaxLengthCriteria(max_length=20), lib.MaxTimeCriteria(5.0, initial_timestamp=future)]
        )
        results.append(
            [
                lib.StopStringCriteria(tok, ["p", "now", "st"])(ids, None),
                lib.StopStringCriteria(tokenizer=tok, stop_strings="stop")(ids, None),
                lib.StopStringCriteria(tok, ["", "zz"])(ids, None),  # an empty stop string stops at once
                lib.EosTokenCriteria(eos_token_id=[ord("w") - 29, 5])(ids, None),
                lib.MaxLengthCriteria(max_length=12)(ids, None),
                lib.MaxTimeCriteria(5.0, initial_timestamp=past)(ids, None),
                criteria(ids, None),
                criteria.max_length,
            ]
        )
    for a, b in zip(*results):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), (a, b)


# ---- generate() with transformers' arguments -------------------------------------------------------------

NEGATIVE, NEGATIVE_MASK = padded_batch(seed=5, lengths=(4, 2, 3))
GENERATE = [
    dict(sequence_bias={(5,): 3.0, (7, 9): -2.0}),
    dict(bad_words_ids=[[5], [7, 9], [2]]),
    dict(suppress_tokens=[5, 6], begin_suppress_tokens=[10, 11]),
    dict(renormalize_logits=True, repetition_penalty=1.5),
    dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=[5, 9]),
    dict(no_repeat_ngram_size=2, min_length=12, eos_token_id=[5, 9]),
    dict(forced_eos_token_id=4),
    dict(do_sample=True, typical_p=0.8),
    dict(do_sample=True, epsilon_cutoff=0.02, temperature=0.7),
    dict(do_sample=True, eta_cutoff=0.02, top_k=10, top_p=0.9, min_p=0.01),
    dict(do_sample=True, num_return_sequences=2, repetition_penalty=1.2),
    dict(num_beams=3, num_return_sequences=2, eos_token_id=5, length_penalty=0.7, sequence_bias={(9,): 2.0}),
    dict(num_beams=3, do_sample=True, top_k=5, eos_token_id=[5, 9], early_stopping=True),
    # classifier-free guidance: from each row's last token, from a (padded) negative prompt, without a cache
    dict(guidance_scale=1.5, repetition_penalty=1.3),
    dict(guidance_scale=3.0, do_sample=True, top_k=10),
    dict(guidance_scale=2.0, negative_prompt_ids=NEGATIVE, negative_prompt_attention_mask=NEGATIVE_MASK),
    dict(guidance_scale=0.5, use_cache=False),
    dict(num_beams=3, guidance_scale=1.5, eos_token_id=5),
]


@pytest.mark.parametrize("kw", GENERATE, ids=[",".join(k) for k in GENERATE])
def test_generate_arguments_equal_transformers(checkpoint, kw):
    """Tokens equal and scores close, sampled rows included (the same seed draws the same tokens)."""
    outs = []
    for model in _pair(checkpoint):
        torch.manual_seed(0)
        outs.append(
            model.generate(
                IDS,
                attention_mask=MASK,
                max_new_tokens=8,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_scores=True,
                output_logits=True,
                **kw,
            )
        )
    ref, got = outs
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.scores) == len(ref.scores) and len(got.logits) == len(ref.logits)
    for a, b in zip(got.scores + got.logits, ref.scores + ref.logits):
        _same(a, b, 1e-4)
    if kw.get("num_beams"):
        torch.testing.assert_close(got.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.beam_indices, ref.beam_indices)
    assert (got.past_key_values is None) == (ref.past_key_values is None) == (kw.get("use_cache") is False)


def test_prefix_fn_max_time_and_transition_scores_equal_transformers(checkpoint):
    def allowed(batch_id, row):
        return [int(row[-1]) % 50 + 3, 4, 5 + batch_id]

    results = []
    for model in _pair(checkpoint):
        out = model.generate(IDS, attention_mask=MASK, max_new_tokens=6, prefix_allowed_tokens_fn=allowed)
        # max_time far below one forward pass: both stop after the first token.
        short = model.generate(IDS, attention_mask=MASK, max_new_tokens=6, max_time=1e-9, eos_token_id=None)
        beams = model.generate(
            IDS, attention_mask=MASK, max_new_tokens=5, num_beams=3, num_return_sequences=3, eos_token_id=5,
            return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
        greedy = model.generate(IDS, max_new_tokens=5, return_dict_in_generate=True, output_scores=True)
        results.append(
            [
                out,
                short.shape[1],
                model.compute_transition_scores(beams.sequences, beams.scores, beams.beam_indices),
                model.compute_transition_scores(greedy.sequences, greedy.scores, normalize_logits=True),
            ]
        )
    ref, got = results
    assert torch.equal(got[0], ref[0]) and got[1] == ref[1] == IDS.shape[1] + 1
    torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3], ref[3], atol=1e-5, rtol=1e-5)


def test_past_key_values_continue_and_reuse_a_prefix_cache(checkpoint):
    prefix = torch.tensor([[1, 17, 33, 5, 99]])
    full = torch.tensor([[1, 17, 33, 5, 99, 42, 7, 8]])
    results = []
    for model in _pair(checkpoint):
        with torch.no_grad():
            prompt_cache = model(prefix, use_cache=True).past_key_values
        reused = model.generate(full, past_key_values=copy.deepcopy(prompt_cache), max_new_tokens=6)
        first = model.generate(prefix, max_new_tokens=4, return_dict_in_generate=True)
        follow_up = torch.cat([first.sequences, torch.tensor([[11, 12]])], 1)
        more = model.generate(follow_up, past_key_values=first.past_key_values, max_new_tokens=5)
        results.append([reused, model.generate(full, max_new_tokens=6), more])
    ref, got = results
    assert torch.equal(got[0], ref[0]) and torch.equal(got[0], got[1])
    assert torch.equal(got[2], ref[2])


def test_custom_processors_run_before_the_sampling_warpers(checkpoint):
    """transformers merges the caller's processors before temperature/top-k; a caller's processor of a
    built-in type replaces the built-in one."""

    def user_code(lib, model):
        class Halve(lib.LogitsProcessor):
            def __call__(self, input_ids, scores):
                return scores / 2

        torch.manual_seed(1)
        return model.generate(
            IDS,
            attention_mask=MASK,
            max_new_tokens=6,
            do_sample=True,
            top_k=3,
            temperature=0.5,
            repetition_penalty=1.1,
            logits_processor=lib.LogitsProcessorList([Halve(), lib.RepetitionPenaltyLogitsProcessor(3.0)]),
            return_dict_in_generate=True,
            output_scores=True,
        )

    ref, got = (user_code(lib, model) for lib, model in zip(_libs(), _pair(checkpoint)))
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        _same(a, b, 1e-4)


def test_logit_bias_and_presence_frequency_penalties_in_generate(checkpoint):
    """autolm's extensions: logit_bias is transformers' single-token sequence_bias; presence/frequency
    penalties (vLLM's rule over the generated tokens) equal a reference processor given to transformers."""
    import transformers

    class Reference(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            for row, ids in enumerate(input_ids[:, IDS.shape[1] :].tolist()):
                for token in set(ids):
                    scores[row, token] -= 0.4 * ids.count(token) + 0.9
            return scores

    ref_model, model = _pair(checkpoint)
    kw = dict(attention_mask=MASK, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    biased = model.generate(IDS, logit_bias={5: 4.0, "9": -1.5}, **kw)
    assert torch.equal(biased, ref_model.generate(IDS, sequence_bias={(5,): 4.0, (9,): -1.5}, **kw))
    penalised = model.generate(IDS, presence_penalty=0.9, frequency_penalty=0.4, **kw)
    assert torch.equal(penalised, ref_model.generate(IDS, logits_processor=[Reference()], **kw))
    assert not torch.equal(penalised, model.generate(IDS, **kw))


def test_greedy_with_no_processor_is_an_empty_list():
    cfg = autolm.GenerationConfig(max_new_tokens=4).with_defaults()
    assert len(autolm.generation.logits_processors(cfg, 5)) == 0
    sampled = autolm.generation.logits_processors(cfg.updated(do_sample=True), 5)
    assert [type(p).__name__ for p in sampled] == ["TopKLogitsWarper"]  # transformers' default top_k=50


def test_bad_generate_arguments_raise_value_errors_as_transformers(checkpoint):
    for model in _pair(checkpoint):
        with pytest.raises(ValueError, match="num_return_sequences"):
            model.generate(IDS, num_return_sequences=2)
        with pytest.raises(ValueError, match="max_length"):
            model.generate(IDS, max_length=5)
    _, model = _pair(checkpoint)
    with pytest.raises(autolm.GenerationError, match="sequence_bias"):
        model.generate(IDS, sequence_bias={(VOCAB + 5,): 1.0}, max_new_tokens=2)
    with pytest.raises(autolm.GenerationError, match="penalty_alpha"):
        model.generate(IDS, generation_config=_their_config(penalty_alpha=0.6, top_k=4))
    with pytest.raises(autolm.GenerationError, match="guidance_scale.*speculative"):
        model.generate(IDS, guidance_scale=2.0, prompt_lookup_num_tokens=3)


def _their_config(**kw):
    import transformers

    return transformers.GenerationConfig(**kw)


# ---- GenerationConfig -------------------------------------------------------------------------------------


def test_generation_config_defaults_serialisation_and_update_equal_transformers(tmp_path):
    import transformers

    theirs, ours = transformers.GenerationConfig(), autolm.GenerationConfig()
    for name in ours.names() - {"logit_bias", "presence_penalty", "frequency_penalty"}:
        assert getattr(ours, name) == getattr(theirs, name) is None, name

    def user_code(lib, folder):
        cfg = lib.GenerationConfig(max_new_tokens=7, do_sample=True, top_k=4, eos_token_id=[2, 5])
        unused = cfg.update(temperature=0.8, no_such_setting=3)
        cfg.save_pretrained(folder)
        back = lib.GenerationConfig.from_pretrained(folder)
        strip = lambda d: {k: v for k, v in d.items() if k != "transformers_version"}  # noqa: E731
        return unused, strip(back.to_diff_dict()), strip(json.loads(cfg.to_json_string())), back.top_k

    ref = user_code(transformers, tmp_path / "t")
    got = user_code(autolm, tmp_path / "a")
    assert got == ref
    # Each reads the other's file.
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "a").temperature == 0.8
    assert autolm.GenerationConfig.from_pretrained(tmp_path / "t").eos_token_id == [2, 5]


def test_a_generation_config_fills_its_unset_fields_from_the_model(checkpoint, tmp_path):
    """transformers: generate(generation_config=...) takes what that config leaves unset from the model's
    own generation config (here an EOS token and a repetition penalty), not from bare defaults."""
    directory, _ = checkpoint(NAME)
    results = []
    for lib in _libs():
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        model.generation_config.repetition_penalty = 1.4
        model.generation_config.eos_token_id = 9
        cfg = lib.GenerationConfig(max_new_tokens=12)  # each library's own
        results.append(model.generate(IDS, attention_mask=MASK, generation_config=cfg, pad_token_id=0))
    assert torch.equal(results[0], results[1])


def test_saved_generation_config_holds_what_transformers_writes(checkpoint, tmp_path):
    import transformers

    directory, _ = checkpoint(NAME)
    written = []
    for lib in _libs():
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        model.generation_config.update(do_sample=True, top_k=7)
        model.save_pretrained(tmp_path / lib.__name__)
        with open(tmp_path / lib.__name__ / "generation_config.json") as f:
            written.append({k: v for k, v in json.load(f).items() if k != "transformers_version"})
    assert written[1] == written[0]
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "autolm").top_k == 7


def test_dynamic_cache_is_autolms_cache(checkpoint):
    """transformers' name for the cache a forward returns and generate() continues from."""
    _, model = _pair(checkpoint)
    with torch.no_grad():
        cache = model(IDS[:1, :4], use_cache=True).past_key_values
    assert isinstance(cache, autolm.DynamicCache) and "DynamicCache" in dir(autolm)
    out = model.generate(IDS[:1], past_key_values=cache, max_new_tokens=3, return_dict_in_generate=True)
    assert out.past_key_values is cache and cache.get_seq_length() == IDS.shape[1] + 2
