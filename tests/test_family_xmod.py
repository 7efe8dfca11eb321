"""X-MOD run as a decoder (XmodForCausalLM) against transformers and peft: XLM-R's body and head with a language
adapter after every layer's feed-forward (post-LN, adapter norm reused, norm before the adapter's residual; and
pre_norm with its own adapter_layer_norm, the residual before the norm, the final encoder.LayerNorm), the
default language by config.default_language / set_default_language, per-row and per-token lang_ids in forward,
RoBERTa's positions, generate, the one-token and compiled steps, LoRA (query/value named), int8, save round trips
in transformers' names; no default language and lang_ids in generate refused by name. llama.cpp has no X-MOD."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, GenerationError

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, is_decoder=True, languages=["en_XX", "de_DE", "fr_XX"],
              default_language="de_DE")  # fmt: skip
XMOD = Family("XmodConfig", _SMALL)
XMOD_PRE = Family("XmodConfig", dict(_SMALL, pre_norm=True, adapter_layer_norm=True, ln_before_adapter=False,
                                     adapter_reduction_factor=4, hidden_act="relu", tie_word_embeddings=False))  # fmt: skip
XMOD_PLAIN = Family("XmodConfig", dict(_SMALL, adapter_reuse_layer_norm=False, default_language="fr_XX"))
FAMILIES = {"xmod": XMOD, "xmod_pre": XMOD_PRE, "xmod_plain": XMOD_PLAIN}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_generate(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)
    if name != "xmod_plain":
        FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", ["xmod", "xmod_pre"])
def test_languages_as_transformers(tmp_path_factory, name):
    """lang_ids per row (B,) and per token (B, T) give transformers' logits; set_default_language switches the
    adapters of both (a language not in config.languages refused by name); RoBERTa's default positions."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    ids[mask == 0] = 1
    real, pos = mask.bool(), positions(mask)
    per_token = (torch.arange(ids.shape[1]) % 3).expand_as(ids)
    with torch.no_grad():
        for langs in (torch.tensor([0, 2, 1]), per_token, None):
            theirs = hf(ids, attention_mask=mask, lang_ids=langs).logits[real]
            ours = model(ids, attention_mask=mask, lang_ids=langs).logits[real]
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        before = model(ids, attention_mask=mask, position_ids=pos).logits[real]
        model.set_default_language("en_XX")
        hf.set_default_language("en_XX")
        try:
            theirs = hf(ids, attention_mask=mask, position_ids=pos).logits[real]
            ours = model(ids, attention_mask=mask, position_ids=pos).logits[real]
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(ours, before, atol=1e-3)
        finally:
            hf.set_default_language("de_DE")
    with pytest.raises(ConfigError, match="xx_YY"):
        model.set_default_language("xx_YY")


def test_refusals(tmp_path_factory):
    """No default language and no lang_ids: transformers raises, autolm names default_language; lang_ids given
    to generate are refused by name."""
    directory, _ = XMOD.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with pytest.raises(GenerationError, match="lang_ids"):
        model.generate(ids, attention_mask=mask, lang_ids=torch.tensor([0, 1, 2]), max_new_tokens=2)
    model.config.default_language = None
    with pytest.raises(GenerationError, match="default_language"):
        model(ids, attention_mask=mask)


def test_one_token_and_compiled_step(tmp_path_factory, home):  # noqa: F811
    XMOD.check_one_token_step(tmp_path_factory)
    XMOD_PRE.check_compiled_step(tmp_path_factory, home)


def test_lora_both_ways(tmp_path_factory, tmp_path):
    XMOD_PRE.check_lora(tmp_path_factory, tmp_path, targets=["query", "value"], slots=True)


def test_int8(tmp_path_factory):
    XMOD.check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", ["xmod", "xmod_pre"])
def test_save_round_trip_and_names(tmp_path_factory, tmp_path, name):
    """Saved files load in transformers with equal logits and back here bit-identical; state_dict() holds
    transformers' names (the tied decoder's weight and bias transformers lists again, as RoBERTa's)."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    ours, theirs = autolm.AutoModelForCausalLM.from_pretrained(directory).state_dict(), hf.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: theirs[k].shape for k in ours}
    assert set(theirs) - set(ours) <= {"lm_head.decoder.weight", "lm_head.decoder.bias"}


def test_config_defaults_and_round_trip(tmp_path_factory, tmp_path):
    from autolm.models.xmod import XmodConfig

    check_config_defaults(XmodConfig)
    config = autolm.AutoConfig.from_pretrained(XMOD_PRE.checkpoint(tmp_path_factory)[0])
    config.save_pretrained(tmp_path)
    assert autolm.AutoConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert config.pre_norm and config.languages == ["en_XX", "de_DE", "fr_XX"]
