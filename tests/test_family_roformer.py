"""RoFormer run as a decoder (RoFormerForCausalLM) against transformers and peft: BERT's post-LN layers with the
sinusoidal pairwise RoPE read from the checkpoint's table at the cache's slots (left padding counted, given
position_ids ignored, as transformers), rotary_value, embedding_size narrower than hidden_size (projected), the
head's decoder bias, generate, the one-token and compiled steps, LoRA (query/value named), int8, save round trips
in transformers' names. llama.cpp has no RoFormer: no GGUF."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import GenerationError

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, is_decoder=True)  # fmt: skip
# plain; and rotary_value with narrower embeddings (projected), relu, an untied head, 3 token types
ROFORMER = Family("RoFormerConfig", _SMALL, lora_targets=["query", "value"])
ROFORMER_X = Family("RoFormerConfig", dict(_SMALL, rotary_value=True, embedding_size=16, hidden_act="relu",
                                           tie_word_embeddings=False, type_vocab_size=3),
                    lora_targets=["query", "value"])  # fmt: skip
FAMILIES = {"roformer": ROFORMER, "roformer_x": ROFORMER_X}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_generate(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)
    FAMILIES[name].check_generate(tmp_path_factory)


def test_positions_are_slots_as_transformers(tmp_path_factory):
    """Without position_ids, with token_type_ids, through a cache and from inputs_embeds: transformers' logits;
    given position_ids change nothing (transformers takes none); past the table: GenerationError."""
    directory, hf = ROFORMER_X.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    types = (torch.arange(ids.shape[1]) % 3).expand_as(ids)
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids), dict(input_ids=ids, token_type_ids=types)):
            theirs = hf(attention_mask=mask, **kwargs).logits[real]
            torch.testing.assert_close(model(attention_mask=mask, **kwargs).logits[real], theirs,
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
        shifted = model(ids, attention_mask=mask, position_ids=torch.zeros_like(ids)).logits[real]
        torch.testing.assert_close(shifted, hf(ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4)
        emb = hf.get_input_embeddings()(ids[1:, -9:])
        torch.testing.assert_close(model(inputs_embeds=emb).logits, hf(inputs_embeds=emb).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
        a, b = model(ids, attention_mask=mask, use_cache=True), hf(ids, attention_mask=mask, use_cache=True)
        nxt, mask2 = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        ours = model(nxt, attention_mask=mask2, past_key_values=a.past_key_values).logits
        theirs = hf(nxt, attention_mask=mask2, past_key_values=b.past_key_values).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        with pytest.raises(GenerationError, match="max_position_embeddings"):
            model(torch.ones(1, 65, dtype=torch.long))


def test_one_token_and_compiled_step(tmp_path_factory, home):  # noqa: F811
    ROFORMER_X.check_one_token_step(tmp_path_factory)
    ROFORMER_X.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_both_ways(tmp_path_factory, tmp_path, name):
    """peft has no default targets for roformer: query and value named, both ways, merged."""
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_int8_bf16_and_disk_offload(tmp_path_factory, tmp_path):
    """int8 close to fp32; bf16 (the table's rows in bf16, as transformers reads them) no further from fp32
    than transformers' bf16; half the model on disk (the sinusoidal table a buffer of the body) as in memory."""
    ROFORMER.check_quantized(tmp_path_factory, "int8")
    ROFORMER_X.check_bf16(tmp_path_factory)
    ROFORMER_X.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_round_trip_and_names(tmp_path_factory, tmp_path, name):
    """Saved files load in transformers with equal logits and back here bit-identical; state_dict() holds
    transformers' names and shapes (the sinusoidal table included), config.json saved back as written."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ours, theirs = model.state_dict(), hf.state_dict()
    assert "roformer.encoder.embed_positions.weight" in ours  # the table, as the file has it
    assert {k: v.shape for k, v in ours.items()} == {k: theirs[k].shape for k in ours}
    assert set(theirs) - set(ours) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    model.config.save_pretrained(tmp_path / "config")
    written = json.loads((tmp_path / "config" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    assert {k: v for k, v in written.items() if k != "transformers_version"} == {
        k: v for k, v in original.items() if k != "transformers_version"
    }


def test_config_defaults(tmp_path_factory):
    """Defaults equal transformers' (embedding_size resolved to hidden_size as transformers resolves it)."""
    from autolm.models.roformer import RoFormerConfig

    check_config_defaults(RoFormerConfig)
    assert RoFormerConfig(hidden_size=64, num_attention_heads=4).embedding_size == 64
