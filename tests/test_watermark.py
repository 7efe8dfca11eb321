"""generate(watermarking_config=...) and WatermarkDetector: token-identical to transformers (green-list and SynthID
watermarks, greedy, sampling and beams), the detector's outputs equal, and config errors that name the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import VOCAB, padded_batch

import autolm
from autolm.errors import GenerationError

NAME = "llama_gqa_llama3_sharded"


@pytest.fixture(scope="module")
def models(checkpoint):
    directory, ref = checkpoint(NAME)
    return autolm.AutoModelForCausalLM.from_pretrained(directory), ref


def _both(model, ref, ids, mask, seed, **kw):
    """autolm's and transformers' generate() from the same global seed."""
    torch.manual_seed(seed)
    ours = model.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(seed)
    theirs = ref.generate(ids, attention_mask=mask, **kw)
    return ours, theirs


def _configs(kind: str, **fields):
    ours = getattr(autolm, kind)(**fields)
    return ours, getattr(transformers, kind)(**fields)


GREEN_LIST = [
    (dict(), False),
    (dict(seeding_scheme="selfhash", context_width=1), True),
    (dict(seeding_scheme="selfhash", context_width=3, greenlist_ratio=0.4, bias=3.0), False),
    (dict(seeding_scheme="lefthash", context_width=2, hashing_key=7, bias=1.5), True),
]


@pytest.mark.parametrize("fields, sample", GREEN_LIST)
def test_green_list_generate_equals_transformers(models, fields, sample):
    model, ref = models
    ids, mask = padded_batch(seed=3, lengths=(7, 4))
    ours_cfg, hf_cfg = _configs("WatermarkingConfig", **fields)
    kw = dict(max_new_tokens=12, do_sample=sample, eos_token_id=None, pad_token_id=0)
    out, _ = _both(model, ref, ids, mask, 11, watermarking_config=ours_cfg, **kw)
    _, expected = _both(model, ref, ids, mask, 11, watermarking_config=hf_cfg, **kw)
    plain, _ = _both(model, ref, ids, mask, 11, **kw)
    assert torch.equal(out, expected)
    assert not torch.equal(out, plain)  # the watermark changed the tokens: a processor that did nothing fails


def test_green_list_as_dict_and_generation_config_field(models, tmp_path):
    model, ref = models
    ids, mask = padded_batch(seed=4, lengths=(6, 6))
    fields = dict(greenlist_ratio=0.5, bias=4.0, hashing_key=99, seeding_scheme="lefthash", context_width=1)
    kw = dict(max_new_tokens=10, do_sample=True, eos_token_id=None, pad_token_id=0)
    out, expected = _both(model, ref, ids, mask, 5, watermarking_config=dict(fields), **kw)  # a dict, in both
    assert torch.equal(out, expected)
    assert not torch.equal(out, _both(model, ref, ids, mask, 5, **kw)[0])
    cfg = autolm.GenerationConfig(watermarking_config=dict(fields), **kw)
    assert isinstance(cfg.watermarking_config, autolm.WatermarkingConfig)
    cfg.save_pretrained(tmp_path)
    loaded = autolm.GenerationConfig.from_pretrained(tmp_path)
    assert loaded.watermarking_config == autolm.WatermarkingConfig(**fields)
    for given in (loaded, transformers.GenerationConfig.from_pretrained(tmp_path)):
        torch.manual_seed(5)
        assert torch.equal(model.generate(ids, attention_mask=mask, generation_config=given), expected)


def test_green_list_with_beams_equals_transformers(models):
    model, ref = models
    ids, mask = padded_batch(seed=6, lengths=(8, 5))
    ours_cfg, hf_cfg = _configs("WatermarkingConfig", bias=3.0)
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, eos_token_id=None, pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, watermarking_config=ours_cfg, **kw)
    assert torch.equal(out, ref.generate(ids, attention_mask=mask, watermarking_config=hf_cfg, **kw))
    assert not torch.equal(out, model.generate(ids, attention_mask=mask, **kw))


def test_green_list_with_prompt_lookup_keeps_the_greedy_tokens(models):
    """Speculative decoding runs the (stateless) green-list processor on each verified position: greedy tokens are
    plain watermarked greedy decoding's."""
    model, _ = models
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    cfg = autolm.WatermarkingConfig(seeding_scheme="selfhash", context_width=2)
    kw = dict(max_new_tokens=12, eos_token_id=None, watermarking_config=cfg)
    plain = model.generate(ids, **kw)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **kw), plain)
    assert not torch.equal(plain, model.generate(ids, max_new_tokens=12, eos_token_id=None))


SYNTHID = [
    (dict(ngram_len=2, keys=[654, 400, 836]), True),
    (dict(ngram_len=3, keys=[11, 22, 33, 44, 55], context_history_size=8, sampling_table_seed=3), False),
    (dict(ngram_len=4, keys=[5, 7], skip_first_ngram_calls=True, sampling_table_size=2**10), True),
]


@pytest.mark.parametrize("fields, sample", SYNTHID)
def test_synthid_generate_equals_transformers(models, fields, sample):
    model, ref = models
    ids, mask = padded_batch(seed=8, lengths=(6, 3))
    ours_cfg, hf_cfg = _configs("SynthIDTextWatermarkingConfig", **fields)
    kw = dict(max_new_tokens=12, do_sample=sample, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
              output_scores=True)  # fmt: skip
    out, _ = _both(model, ref, ids, mask, 21, watermarking_config=ours_cfg, **kw)
    _, expected = _both(model, ref, ids, mask, 21, watermarking_config=hf_cfg, **kw)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores))
    plain, _ = _both(model, ref, ids, mask, 21, **kw)
    assert not torch.equal(torch.stack(out.scores), torch.stack(plain.scores))
    # the g-values the Bayesian detector reads
    ours_p, hf_p = ours_cfg.construct_processor(VOCAB, "cpu"), hf_cfg.construct_processor(VOCAB, "cpu")
    assert torch.equal(ours_p.compute_g_values(out.sequences), hf_p.compute_g_values(out.sequences))


def _detectors(model, ref, fields, **kw):
    ours_cfg, hf_cfg = _configs("WatermarkingConfig", **fields)
    ours = autolm.WatermarkDetector(model.config, "cpu", ours_cfg, **kw)
    return ours, transformers.WatermarkDetector(ref.config, "cpu", hf_cfg, **kw), ours_cfg


@pytest.mark.parametrize(
    "fields, ignore_repeated",
    [
        (dict(), False),
        (dict(seeding_scheme="selfhash", context_width=2), True),
        (dict(context_width=3), True),
    ],
)
def test_detector_equals_transformers(models, fields, ignore_repeated):
    model, ref = models
    ids, mask = padded_batch(seed=9, lengths=(5, 5))
    ours, theirs, cfg = _detectors(model, ref, fields, ignore_repeated_ngrams=ignore_repeated)
    kw = dict(max_new_tokens=24, do_sample=True, eos_token_id=None, pad_token_id=0)
    marked = _both(model, ref, ids, mask, 2, watermarking_config=cfg, **kw)[0][:, 5:]
    plain = _both(model, ref, ids, mask, 2, **kw)[0][:, 5:]
    with_bos = torch.cat([torch.ones(2, 1, dtype=torch.long), plain], 1)  # a leading BOS is dropped
    results = []
    for text in (marked, plain, with_bos):
        a, b = ours(text, return_dict=True), theirs(text, return_dict=True)
        for key in ("num_tokens_scored", "num_green_tokens", "green_fraction", "prediction"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
        for key in ("z_score", "p_value", "confidence"):
            torch.testing.assert_close(torch.as_tensor(getattr(a, key)), torch.as_tensor(getattr(b, key)))
        np.testing.assert_array_equal(ours(text, z_threshold=1.0), theirs(text, z_threshold=1.0))
        results.append(a.z_score)
    assert (results[0] > results[1]).all()  # the watermark is what the detector sees


def _generate_error(model, **kw):
    with pytest.raises(GenerationError) as e:
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, **kw)
    return str(e.value)


@pytest.mark.parametrize(
    "kind, fields, field",
    [
        ("WatermarkingConfig", dict(seeding_scheme="middlehash"), "seeding_scheme"),
        ("WatermarkingConfig", dict(greenlist_ratio=1.5), "greenlist_ratio"),
        ("WatermarkingConfig", dict(context_width=0), "context_width"),
        (
            "SynthIDTextWatermarkingConfig",
            dict(ngram_len=2, keys=[1], sampling_table_size=2**25),
            "sampling_table_size",
        ),
    ],
)
def test_config_errors_name_the_field(models, kind, fields, field):
    model, _ = models
    ours, theirs = _configs(kind, **fields)
    assert f"watermarking_config.{field}" in _generate_error(model, watermarking_config=ours)
    with pytest.raises(ValueError, match=field):  # transformers refuses it too
        theirs.validate()
    with pytest.raises(GenerationError, match=f"watermarking_config.{field}"):
        autolm.GenerationConfig(watermarking_config=ours).validate()


def test_autolm_only_errors(models):
    model, _ = models
    synthid = autolm.SynthIDTextWatermarkingConfig(ngram_len=2, keys=[])
    assert "watermarking_config.keys" in _generate_error(model, watermarking_config=synthid)
    assert "watermarking_config" in _generate_error(model, watermarking_config=3)
    assert "speculative" in _generate_error(
        model, watermarking_config=autolm.SynthIDTextWatermarkingConfig(2, [1]), prompt_lookup_num_tokens=2
    )
    with pytest.raises(GenerationError, match="SynthID"):
        autolm.WatermarkDetector(model.config, "cpu", autolm.SynthIDTextWatermarkingConfig(2, [1]))
