"""XLM (XLMWithLMHeadModel) against transformers and peft: causal (a triangular mask over every slot, padding
included) and bidirectional layers, the padding's hidden states zeroed, positions as slots, language embeddings,
token_type_ids looked up in the word embeddings, the pad-count `lengths` without attention_mask, generate as
transformers' (the mask token appended, the whole sequence recomputed), LoRA (peft has no default targets for
the type: q_lin/v_lin), int8, save round trips in transformers' names, config defaults, refusals. llama.cpp has no
XLM: no GGUF; generation recomputes the sequence, so there is no one-token or compiled step to check."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults, check_lora_needs_targets

import autolm
from autolm.errors import ConfigError, GenerationError

_SMALL = dict(emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=64, mask_token_id=5)
CAUSAL = Family("XLMConfig", dict(_SMALL, causal=True, n_langs=3, lang_id=1), lora_targets=["q_lin", "v_lin"])
_RELU = dict(_SMALL, causal=True, gelu_activation=False, tie_word_embeddings=False, layer_norm_eps=1e-5, n_langs=2,
             use_lang_emb=False)  # fmt: skip
FAMILIES = {
    "causal": CAUSAL,
    # bidirectional, sinusoidal positions (stored in the file), one language (no language embeddings)
    "bidirectional": Family("XLMConfig", dict(_SMALL, sinusoidal_embeddings=True)),
    # causal, ReLU, an untied head, a larger epsilon, languages without their embeddings
    "relu_untied": Family("XLMConfig", _RELU),
}


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_default_inputs_follow_transformers(tmp_path_factory, name):
    """Without position_ids (the slots), without attention_mask (each row's first "non-pad count" slots, however
    the pads lie), with `lengths`, with langs and token_type_ids, with inputs_embeds: transformers' logits at
    every slot (the padding's too)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    langs = (torch.arange(ids.shape[1]) % 2).expand_as(ids)
    with torch.no_grad():
        for kwargs in (dict(attention_mask=mask), dict(), dict(lengths=torch.tensor([13, 10, 6])),
                       dict(attention_mask=mask, langs=langs, token_type_ids=ids.flip(1))):  # fmt: skip
            _close(model(ids, **kwargs).logits, hf(ids, **kwargs).logits)
        emb = hf.get_input_embeddings()(ids)
        _close(model(inputs_embeds=emb).logits, hf(inputs_embeds=emb).logits)


def test_hidden_states(tmp_path_factory):
    CAUSAL.check_hidden_states(tmp_path_factory)


@pytest.mark.parametrize("name", ["causal", "relu_untied"])
def test_kv_cache_continues_the_forward(tmp_path_factory, name):
    """causal=True: a prompt's forward with a cache, then the next tokens on it, give the logits transformers
    computes over the whole sequence (left padding, its mask given)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    nxt = torch.tensor([[5, 9], [6, 10], [7, 11]])
    full, full_mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        assert out.past_key_values.get_seq_length() == ids.shape[1]
        ours = model(nxt, attention_mask=full_mask, past_key_values=out.past_key_values).logits
        _close(ours, hf(full, attention_mask=full_mask).logits[:, -2:])


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_as_transformers(tmp_path_factory, name):
    """Greedy tokens equal transformers' (a left-padded batch, whose attention_mask transformers' XLM drops,
    and unpadded rows), each step's logits too."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False),
                       hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))  # fmt: skip
    rows = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ours, theirs = model.generate(rows, **kwargs), hf.generate(rows, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert not torch.allclose(ours.logits[0], ours.logits[1])  # each step sees the sequence grown
    _close(torch.stack(ours.logits), torch.stack(theirs.logits))


def test_generate_refusals(tmp_path_factory):
    """Beam search, speculative decoding and a given cache are refused by name."""
    model = autolm.AutoModelForCausalLM.from_pretrained(CAUSAL.checkpoint(tmp_path_factory)[0])
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    for key, value in (("num_beams", 2), ("prompt_lookup_num_tokens", 2), ("past_key_values", object())):
        with pytest.raises(GenerationError, match=key):
            model.generate(ids, max_new_tokens=2, **{key: value})
    assert not model.precompile_decode()


def test_lora_both_ways(tmp_path_factory, tmp_path):
    """peft has no default targets for xlm (refused by name in both); with q_lin/v_lin an adapter peft made
    gives peft's logits here and autolm's loads in peft with the same logits (transformers' names)."""
    check_lora_needs_targets(*CAUSAL.checkpoint(tmp_path_factory))
    CAUSAL.check_lora(tmp_path_factory, tmp_path, slots=True)


def test_int8(tmp_path_factory):
    CAUSAL.check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", ["causal", "relu_untied"])
def test_save_round_trip(tmp_path_factory, tmp_path, name):
    """Saved files load in transformers with equal logits and back here bit-identical; state_dict() holds
    exactly transformers' names."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert set(model.state_dict()) == set(hf.state_dict())


def test_config_defaults_and_round_trip(tmp_path_factory, tmp_path):
    """Defaults equal transformers'; config.json round-trips in its own names (emb_dim, n_layers, ...)."""
    from autolm.models.xlm import XLMConfig

    check_config_defaults(XLMConfig)
    assert XLMConfig(emb_dim=64).hidden_size == 64 and XLMConfig().intermediate_size == 4 * 2048
    directory, _ = FAMILIES["relu_untied"].checkpoint(tmp_path_factory)
    config = autolm.AutoConfig.from_pretrained(directory)
    config.save_pretrained(tmp_path)
    assert autolm.AutoConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert config.layer_norm_eps == 1e-5 and config.emb_dim == 32 and config.hidden_act == "relu"
    assert "hidden_act" not in config.to_dict() and config.to_dict()["n_layers"] == 2


def test_refusals(tmp_path_factory):
    """asm (adaptive softmax) and is_encoder=false are ConfigErrors naming the field; a cache for a
    bidirectional model, transformers' `cache` argument and a position past the table are refused."""
    from autolm.models.xlm import XLMConfig

    for field in ("asm", "is_encoder"):
        with pytest.raises(ConfigError, match=field):
            XLMConfig(**{field: field == "asm"})
    bidi = autolm.AutoModelForCausalLM.from_pretrained(
        FAMILIES["bidirectional"].checkpoint(tmp_path_factory)[0]
    )
    causal = autolm.AutoModelForCausalLM.from_pretrained(CAUSAL.checkpoint(tmp_path_factory)[0])
    ids, mask = padded_batch()
    with torch.no_grad():
        assert bidi(ids, attention_mask=mask, use_cache=True).past_key_values is None
        cache = causal(ids, attention_mask=mask, use_cache=True).past_key_values
        with pytest.raises(GenerationError, match="causal"):
            bidi(ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(GenerationError, match="cache"):
            causal(ids, cache={})
        with pytest.raises(GenerationError, match="max_position_embeddings"):
            causal(ids, position_ids=torch.full_like(ids, 64))
