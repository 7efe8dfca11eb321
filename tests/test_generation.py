"""generate(): token-identical to transformers for greedy and beam search; sampling processors."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, padded_batch

import autolm
from autolm.errors import GenerationError


@pytest.mark.parametrize("name", ["llama_gqa_llama3_sharded", "qwen2_sliding", "mistral_sliding", "qwen3"])
def test_greedy_equals_transformers_left_padded_batch(checkpoint, name):
    directory, ref = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=7, lengths=(11, 6, 3))
    kw = dict(max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, **kw)
    expected = ref.generate(ids, attention_mask=mask, **kw)
    assert out.shape == (3, 11 + 64)
    assert torch.equal(out, expected)


def test_greedy_stops_at_eos_and_pads_like_transformers(checkpoint):
    directory, ref = checkpoint("qwen2_tied_bias")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=8, lengths=(8, 5, 2))
    # Make a token the greedy path emits an EOS, so rows finish at different steps.
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, 10])
    kw = dict(max_new_tokens=12, eos_token_id=[eos, 999], pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref.generate(ids, attention_mask=mask, do_sample=False, **kw))
    assert (out[0, 11:] == 0).all()


def test_beam_search_equals_transformers(checkpoint):
    directory, ref = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=9, lengths=(9, 5))
    for kw in (
        dict(num_beams=3, max_new_tokens=16, eos_token_id=None),
        dict(num_beams=3, max_new_tokens=16, eos_token_id=5, length_penalty=0.7, num_return_sequences=2),
        dict(num_beams=4, max_new_tokens=10, eos_token_id=[5, 9], early_stopping=True, pad_token_id=0),
    ):
        out = model.generate(ids, attention_mask=mask, **kw)
        expected = ref.generate(ids, attention_mask=mask, do_sample=False, **kw)
        assert torch.equal(out, expected), kw


def test_sampling_is_reproducible_with_a_seed(checkpoint):
    directory, _ = checkpoint("qwen3")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=True, temperature=1.5, top_k=0, max_new_tokens=20, eos_token_id=None)
    a = model.generate(ids, seed=123, **kw)
    b = model.generate(ids, seed=123, **kw)
    c = model.generate(ids, seed=124, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    n = model.generate(ids, seed=1, num_return_sequences=3, **kw)
    assert n.shape == (6, 25)


def test_processors_are_applied_in_generate(checkpoint):
    directory, _ = checkpoint("qwen3")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(1))
    greedy = model.generate(ids, max_new_tokens=1, eos_token_id=None)[0, -1]
    # top_k=1 sampling must always give the greedy token, whatever the seed.
    for seed in range(5):
        assert (
            model.generate(ids, do_sample=True, top_k=1, seed=seed, max_new_tokens=1, eos_token_id=None)[
                0, -1
            ]
            == greedy
        )
    # min_p=1.0 keeps only the most likely token: the same.
    assert (
        model.generate(ids, do_sample=True, top_k=0, min_p=1.0, seed=0, max_new_tokens=1, eos_token_id=None)[
            0, -1
        ]
        == greedy
    )
    # A tiny top_p keeps only the top token too.
    assert (
        model.generate(ids, do_sample=True, top_k=0, top_p=1e-6, seed=0, max_new_tokens=1, eos_token_id=None)[
            0, -1
        ]
        == greedy
    )
    # A huge repetition penalty forbids repeating prompt tokens in greedy decoding.
    out = model.generate(ids, repetition_penalty=1e6, max_new_tokens=8, eos_token_id=None)
    assert not set(out[0, 4:].tolist()) & set(ids[0].tolist())


def test_min_new_tokens_blocks_eos(checkpoint):
    directory, _ = checkpoint("qwen2_tied_bias")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(2))
    first = int(model.generate(ids, max_new_tokens=1, eos_token_id=None)[0, -1])
    assert model.generate(ids, max_new_tokens=5, eos_token_id=first).shape[1] == 5
    assert model.generate(ids, max_new_tokens=5, eos_token_id=first, min_new_tokens=3).shape[1] >= 7


def test_transformers_settings_autolm_lacks_are_taken_off_or_refused(checkpoint):
    """transformers' generate() settings: off values and settings that only change how it computes (low_memory,
    max_cache_len, ...) are taken, as there; a feature autolm does not run is refused by name, as is a name
    transformers does not know."""
    directory, _ = checkpoint("qwen2_tied_bias")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.tensor([[5, 9, 11]])
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    same = model.generate(ids, max_new_tokens=4, do_sample=False, force_words_ids=None, low_memory=True,
                          max_cache_len=64, disable_compile=True, encoder_repetition_penalty=1.0)  # fmt: skip
    assert torch.equal(same, want)
    for kwargs, name in (({"encoder_repetition_penalty": 1.3}, "encoder_repetition_penalty"),
                         ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha"), ({"lowmemory": True}, "unknown")):  # fmt: skip
        with pytest.raises(GenerationError, match=name):
            model.generate(ids, max_new_tokens=2, **kwargs)


def test_bad_arguments_are_clear():
    cfg = autolm.GenerationConfig()
    with pytest.raises(GenerationError, match="unknown arguments: foo"):
        cfg.updated(foo=1)
    with pytest.raises(GenerationError, match="temperature"):
        cfg.updated(temperature=0)
    with pytest.raises(GenerationError, match="top_p"):
        cfg.updated(top_p=1.5)


@pytest.mark.parametrize("name", ["llama_gqa_llama3_sharded", "qwen2_sliding", "mistral_sliding", "qwen3"])
def test_decode_step_equals_forward(checkpoint, name):
    """The static-shape decode step (the one forward over the cache's whole capacity under a mask, what
    compile_decode compiles; run eagerly here) gives the plain forward's logits."""
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    stepper = autolm.AutoModelForCausalLM.from_pretrained(directory)
    stepper.decode_step = stepper.step  # what compile_decode installs, uncompiled
    ids, mask = padded_batch(seed=3, lengths=(9, 5, 2))
    B, P = ids.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [model.make_cache(B, 16), stepper.make_cache(B, 16)]  # the plain one grows past 16 on the way
    assert caches[1].capacity == 256 and caches[1].static
    with torch.no_grad():
        for m, cache in zip((model, stepper), caches):
            m(ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        tokens = torch.randint(3, VOCAB, (B, 12), generator=torch.Generator().manual_seed(0))
        pos = positions[:, -1:]
        for t in range(tokens.shape[1]):
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            pos = pos + 1
            want = model(
                tokens[:, t : t + 1], attention_mask=mask, position_ids=pos, past_key_values=caches[0]
            ).logits
            got = stepper(
                tokens[:, t : t + 1], attention_mask=mask, position_ids=pos, past_key_values=caches[1]
            ).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert caches[1].length == P + tokens.shape[1]


@pytest.mark.parametrize("name", ["llama_gqa_llama3_sharded", "mistral_sliding"])
def test_compiled_decode_gives_the_eager_tokens(checkpoint, name):
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=5, lengths=(10, 4))
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, **kw)
    beams = model.generate(ids, attention_mask=mask, num_beams=3, **kw)
    autolm.compile_decode(model)
    assert torch.equal(model.generate(ids, attention_mask=mask, **kw), want)
    # A single row takes the fused matrix-vector path of every Linear.
    assert torch.equal(model.generate(ids[:1], **kw), want[:1])
    assert torch.equal(model.generate(ids, attention_mask=mask, num_beams=3, **kw), beams)
    # With a LoRA adapter (a PeftModel compiles its base model, LoRA layers inside).
    peft_model = autolm.get_peft_model(
        autolm.AutoModelForCausalLM.from_pretrained(directory),
        autolm.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]),
    )
    for p in peft_model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter changes the tokens
    want = peft_model.generate(ids, attention_mask=mask, **kw)
    assert autolm.compile_decode(peft_model) is peft_model
    assert torch.equal(peft_model.generate(ids, attention_mask=mask, **kw), want)


def test_compile_decode_refuses_a_model_spread_over_devices(checkpoint, tmp_path):
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(
        directory, device_map={"model.layers.1": "disk", "": "cpu"}, offload_folder=str(tmp_path)
    )
    with pytest.raises(GenerationError, match="one device.*cpu, disk"):
        autolm.compile_decode(model)
