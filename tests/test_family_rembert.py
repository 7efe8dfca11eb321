"""RemBERT run as a decoder (RemBertForCausalLM) against transformers and peft: BERT's post-LN layers with the
embeddings input_embedding_size wide (projected by embedding_hidden_mapping_in, always there, even at
hidden_size) and the head output_embedding_size wide (dense -> activation -> LayerNorm -> biased decoder, never
tied), BERT's positions (the cache's slots; given ones as rows), generate, the one-token step, LoRA (query/value
named), int8, save round trips in transformers' names. llama.cpp has no RemBERT: no GGUF."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults

import autolm

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, is_decoder=True)  # fmt: skip
# narrower input embeddings and a wider head; and both as wide as hidden_size, relu, 3 token types
REMBERT = Family("RemBertConfig", dict(_SMALL, input_embedding_size=16, output_embedding_size=48),
                 lora_targets=["query", "value"])  # fmt: skip
REMBERT_X = Family("RemBertConfig", dict(_SMALL, input_embedding_size=32, output_embedding_size=32,
                                         hidden_act="relu", type_vocab_size=3),
                   lora_targets=["query", "value"])  # fmt: skip
# tie_word_embeddings true (the widths equal): transformers' RemBertForCausalLM still ties nothing
REMBERT_TIED = Family("RemBertConfig", dict(_SMALL, input_embedding_size=32, output_embedding_size=32,
                                            tie_word_embeddings=True))  # fmt: skip
FAMILIES = {"rembert": REMBERT, "rembert_x": REMBERT_X, "rembert_tied": REMBERT_TIED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_generate(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)
    FAMILIES[name].check_generate(tmp_path_factory)


def test_default_positions_and_types_as_transformers(tmp_path_factory):
    """Without position_ids (the slots, padding counted), with token_type_ids, from inputs_embeds (the input
    width) and through a cache: transformers' logits."""
    directory, hf = REMBERT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    types = (torch.arange(ids.shape[1]) % 2).expand_as(ids)
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids), dict(input_ids=ids, token_type_ids=types)):
            theirs = hf(attention_mask=mask, **kwargs).logits[real]
            torch.testing.assert_close(model(attention_mask=mask, **kwargs).logits[real], theirs,
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
        emb = hf.get_input_embeddings()(ids[1:, -9:])
        assert emb.shape[-1] == 16
        torch.testing.assert_close(model(inputs_embeds=emb).logits, hf(inputs_embeds=emb).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
        a, b = model(ids, attention_mask=mask, use_cache=True), hf(ids, attention_mask=mask, use_cache=True)
        nxt, mask2 = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        ours = model(nxt, attention_mask=mask2, past_key_values=a.past_key_values).logits
        theirs = hf(nxt, attention_mask=mask2, past_key_values=b.past_key_values).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_one_token_step(tmp_path_factory):
    REMBERT.check_one_token_step(tmp_path_factory)


def test_lora_both_ways(tmp_path_factory, tmp_path):
    """peft has no default targets for the type: query and value named; the padding mask's positions given to
    both (the type's own default positions are the cache's slots)."""
    REMBERT.check_lora(tmp_path_factory, tmp_path, targets=["query", "value"], slots=True)


def test_int8(tmp_path_factory):
    REMBERT.check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", FAMILIES)
def test_save_round_trip_and_names(tmp_path_factory, tmp_path, name):
    """Saved files load in transformers with equal logits and back here bit-identical; state_dict() holds
    transformers' names and shapes exactly (nothing tied, tie_word_embeddings true or not); config.json saved
    back as written."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path / "config")


def test_config_defaults():
    from autolm.models.rembert import RemBertConfig

    check_config_defaults(RemBertConfig)
