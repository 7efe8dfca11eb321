"""RoCBert run as a decoder (RoCBertForCausalLM) against transformers and peft: BERT's layers under the body
`roc_bert`; the shape and pronunciation embeddings concatenated with the word vectors and mapped back
(concat_input; ids not given: row 0 at every token, as transformers), or averaged after the LayerNorm (one table
disabled), with ids given in forward and without; token types; BERT's positions; generate (those ids refused by
name), the one-token and compiled steps, LoRA (query/value named), int8, save round trips in transformers'
names. llama.cpp has no RoCBert: no GGUF."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import GenerationError

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, is_decoder=True, pronunciation_embed_dim=8, pronunciation_vocab_size=11,
              shape_embed_dim=12, shape_vocab_size=13)  # fmt: skip
ROC_BERT = Family("RoCBertConfig", _SMALL)
# averaged instead (the tables as wide as hidden_size), pronunciation disabled, relu, an untied head
ROC_BERT_AVG = Family("RoCBertConfig", dict(_SMALL, concat_input=False, enable_pronunciation=False,
                                            pronunciation_embed_dim=32, shape_embed_dim=32, hidden_act="relu",
                                            tie_word_embeddings=False))  # fmt: skip
# concatenated with the shape table disabled
ROC_BERT_PRON = Family("RoCBertConfig", dict(_SMALL, enable_shape=False))
FAMILIES = {"roc_bert": ROC_BERT, "roc_bert_avg": ROC_BERT_AVG, "roc_bert_pron": ROC_BERT_PRON}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_generate(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)
    if name != "roc_bert_pron":
        FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_extra_ids_as_transformers(tmp_path_factory, name):
    """Shape and pronunciation ids (either, both), token types, inputs_embeds and a cache: transformers'
    logits."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    g = torch.Generator().manual_seed(3)
    shape, pron = torch.randint(0, 13, ids.shape, generator=g), torch.randint(0, 11, ids.shape, generator=g)
    types = (torch.arange(ids.shape[1]) % 2).expand_as(ids)
    cases = (dict(input_shape_ids=shape), dict(input_pronunciation_ids=pron),
             dict(input_shape_ids=shape, input_pronunciation_ids=pron, token_type_ids=types))  # fmt: skip
    with torch.no_grad():
        for kwargs in cases:
            theirs = hf(ids, attention_mask=mask, **kwargs).logits[real]
            torch.testing.assert_close(model(ids, attention_mask=mask, **kwargs).logits[real], theirs,
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
        emb = hf.get_input_embeddings()(ids[1:, -9:])
        for kwargs in (dict(), dict(input_shape_ids=shape[1:, -9:])):
            torch.testing.assert_close(model(inputs_embeds=emb, **kwargs).logits,
                                       hf(inputs_embeds=emb, **kwargs).logits, atol=1e-4, rtol=1e-4)  # fmt: skip
        a, b = model(ids, attention_mask=mask, use_cache=True), hf(ids, attention_mask=mask, use_cache=True)
        nxt, mask2 = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        kwargs = dict(input_shape_ids=torch.tensor([[1], [2], [3]]))
        ours = model(nxt, attention_mask=mask2, past_key_values=a.past_key_values, **kwargs).logits
        theirs = hf(nxt, attention_mask=mask2, past_key_values=b.past_key_values, **kwargs).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_generate_refuses_extra_ids(tmp_path_factory):
    model = autolm.AutoModelForCausalLM.from_pretrained(ROC_BERT.checkpoint(tmp_path_factory)[0])
    ids, mask = padded_batch()
    for key in ("input_shape_ids", "input_pronunciation_ids"):
        with pytest.raises(GenerationError, match=key):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, **{key: torch.zeros_like(ids)})


def test_one_token_and_compiled_step(tmp_path_factory, home):  # noqa: F811
    ROC_BERT_AVG.check_one_token_step(tmp_path_factory)
    ROC_BERT.check_compiled_step(tmp_path_factory, home)


def test_lora_both_ways(tmp_path_factory, tmp_path):
    ROC_BERT.check_lora(tmp_path_factory, tmp_path, targets=["query", "value"], slots=True)


def test_int8(tmp_path_factory):
    ROC_BERT.check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", ["roc_bert", "roc_bert_avg"])
def test_save_round_trip_and_names(tmp_path_factory, tmp_path, name):
    """Saved files load in transformers with equal logits and back here bit-identical; state_dict() holds
    transformers' names (the tied decoder's weight and bias transformers lists again, as BERT's)."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    ours, theirs = autolm.AutoModelForCausalLM.from_pretrained(directory).state_dict(), hf.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: theirs[k].shape for k in ours}
    assert set(theirs) - set(ours) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def test_config_defaults_and_round_trip(tmp_path_factory, tmp_path):
    from autolm.models.roc_bert import RoCBertConfig

    check_config_defaults(RoCBertConfig)
    config = autolm.AutoConfig.from_pretrained(ROC_BERT_AVG.checkpoint(tmp_path_factory)[0])
    config.save_pretrained(tmp_path)
    assert autolm.AutoConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert not config.concat_input and not config.enable_pronunciation
