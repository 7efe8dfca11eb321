"""Unlimited-OCR's reference sliding window (transformers' "reference_sliding_attention") against transformers,
generating well past a window of 4: every token sees the prompt (the cache's first forward) and itself with the 3
tokens before it. Tokens of greedy and seeded sampled generation, logits of forwards continuing a cache, and the
refusals (serving engine, speculative decoding, the one-token step).

transformers' left-padded batches are not the reference past the window: its mask reads the prompt's padding
shifted by the window's offset (masking_utils.padding_mask_function over kv_idx = kv_offset + slot), so a padded
row starts attending its padding once it has generated `sliding_window` tokens. autolm keeps the padding masked:
each row of a left-padded batch generates what transformers generates for that row alone."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, randomize
from test_family_deepseek_ocr2 import TEXT, UNLIMITED_VISION

import autolm
from autolm.nn import OneToken, ReferenceWindow

WINDOW, NEW = 4, 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers

    config = transformers.UnlimitedOcrConfig(
        text_config=dict(TEXT, sliding_window=WINDOW), vision_config=UNLIMITED_VISION
    )
    torch.manual_seed(0)
    hf = transformers.UnlimitedOcrForConditionalGeneration(config).eval()
    randomize(hf)
    directory = tmp_path_factory.mktemp("unlimited_ocr_w4")
    hf.save_pretrained(directory)
    return autolm.AutoModelForCausalLM.from_pretrained(directory), hf


def test_tokens_past_the_window(models):
    """20 new tokens (sampled under one seed, greedy, beam search) from a 9-token prompt are transformers'; with plain
    causal attention, without the prompt, or with a window one wider they are not."""
    model, hf = models
    prompt = padded_batch()[0][:1, -9:]
    ones = torch.ones_like(prompt)
    assert model.config.layer_window(0) == WINDOW and isinstance(
        model.config.layer_window(0), ReferenceWindow
    )
    for how in (dict(do_sample=True, top_k=0), dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, **how)
        torch.manual_seed(3)
        theirs = hf.generate(prompt, attention_mask=ones, **kw)
        torch.manual_seed(3)
        ours = model.generate(prompt, attention_mask=ones, **kw)
        assert ours.shape == (1, 9 + NEW)
        assert torch.equal(ours, theirs), (how, ours, theirs)


def test_left_padded_batch(models):
    """Each row of a left-padded batch generates (greedy, 20 tokens) what transformers generates for its prompt
    alone; the unpadded row is also transformers' batched one."""
    model, hf = models
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    ours = model.generate(ids, attention_mask=mask, **kw)
    for row in range(len(ids)):
        prompt = ids[row : row + 1, ~mask[row].eq(0)]
        alone = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
        assert torch.equal(ours[row, -NEW:], alone[0, -NEW:]), row
    theirs = hf.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(ours[0], theirs[0])


def test_forwards_continuing_a_cache(models):
    """A prompt's forward, then forwards of 7, 1 and 6 tokens continuing its cache (past the window, several tokens
    at once) give transformers' logits; cache.length 0 starts a new prompt."""
    from transformers import DynamicCache

    model, hf = models
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randint(3, TEXT["vocab_size"], (2, n), generator=g) for n in (6, 7, 1, 6)]
    theirs_cache = DynamicCache(config=hf.config.text_config)
    ours_cache = None
    for chunk in chunks:
        with torch.no_grad():
            theirs = hf(input_ids=chunk, past_key_values=theirs_cache, use_cache=True)
            ours = model(input_ids=chunk, past_key_values=ours_cache, use_cache=True)
        theirs_cache, ours_cache = theirs.past_key_values, ours.past_key_values
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)
    assert ours_cache.prefill == 6
    ours_cache.length = 0
    assert ours_cache.prefill is None
    with torch.no_grad():
        again = model(input_ids=chunks[1], past_key_values=ours_cache).logits
        fresh = hf(input_ids=chunks[1]).logits
    torch.testing.assert_close(again, fresh, atol=1e-4, rtol=1e-4)
    assert ours_cache.prefill == 7


def test_refusals(models):
    """The serving engine, speculative decoding and the one-token step refuse the reference window, naming it."""
    from autolm.serve.engine import Engine

    model, _ = models
    prompt = padded_batch()[0][:1, -9:]
    with pytest.raises(autolm.GenerationError, match="unlimited_ocr_text cannot be served"):
        Engine(model, None, thread=False)
    with pytest.raises(
        autolm.GenerationError, match="prompt_lookup_num_tokens cannot be used with unlimited_ocr"
    ):
        model.generate(prompt, max_new_tokens=4, prompt_lookup_num_tokens=2)
    with pytest.raises(NotImplementedError, match="reference sliding window"):
        OneToken({}, [], [], seen=3)._span(ReferenceWindow(WINDOW), None)
