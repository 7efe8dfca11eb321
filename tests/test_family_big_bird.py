"""BigBird run as a decoder (BigBirdForCausalLM) against transformers and peft: BERT's layers under the body
`bert`, full causal attention (transformers' "original_full", which it switches to for every forward no longer
than (5 + 2 * num_random_blocks) * block_size, decoding steps included), query/key/value without biases
(use_bias), rescaled embeddings, BERT's positions, generate, the one-token step, LoRA (query/value named), int8,
save round trips in transformers' names; a forward long enough for transformers' block-sparse attention (not
causal: pinned here) refused naming attention_type. llama.cpp has no BigBird: no GGUF."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, padded_batch
from family_checks import Family, check_config_defaults

import autolm
from autolm.errors import GenerationError

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, is_decoder=True, block_size=2, num_random_blocks=1)  # fmt: skip
# the default block_sparse (every forward here short enough for full attention); original_full, no q/k/v
# biases, rescaled embeddings, relu, an untied head
BIG_BIRD = Family("BigBirdConfig", _SMALL)
BIG_BIRD_X = Family("BigBirdConfig", dict(_SMALL, attention_type="original_full", use_bias=False,
                                          rescale_embeddings=True, hidden_act="relu", tie_word_embeddings=False))  # fmt: skip
FAMILIES = {"big_bird": BIG_BIRD, "big_bird_x": BIG_BIRD_X}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_generate(tmp_path_factory, name):
    """(padded_batch's 12 tokens and the generations are within the 14 of full attention for block_sparse.)"""
    FAMILIES[name].check_logits(tmp_path_factory)
    FAMILIES[name].check_generate(tmp_path_factory)


def test_inputs_as_transformers(tmp_path_factory):
    """Default positions, token_type_ids, inputs_embeds (rescaled too) and a cache: transformers' logits; past
    14 tokens (original_full) as well."""
    directory, hf = BIG_BIRD_X.checkpoint(tmp_path_factory)
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
        for kwargs in (dict(), dict(token_type_ids=types[1:, -9:])):
            torch.testing.assert_close(model(inputs_embeds=emb, **kwargs).logits,
                                       hf(inputs_embeds=emb, **kwargs).logits, atol=1e-4, rtol=1e-4)  # fmt: skip
        a, b = model(ids, attention_mask=mask, use_cache=True), hf(ids, attention_mask=mask, use_cache=True)
        nxt, mask2 = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        ours = model(nxt, attention_mask=mask2, past_key_values=a.past_key_values).logits
        theirs = hf(nxt, attention_mask=mask2, past_key_values=b.past_key_values).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        long = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model(long).logits, hf(long).logits, atol=1e-4, rtol=1e-4)


def test_block_sparse_refused(tmp_path_factory):
    """transformers' block_sparse model over more than 14 tokens attends to later tokens (the first token's
    logits change with the last token): autolm refuses such a forward by name; 14 tokens run."""
    import transformers

    directory, _ = BIG_BIRD.checkpoint(tmp_path_factory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        directory
    ).eval()  # a fresh one: still block_sparse
    long = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    other = long.clone()
    other[0, -1] = (other[0, -1] + 1) % VOCAB
    with torch.no_grad():
        assert not torch.allclose(hf(long).logits[0, 0], hf(other).logits[0, 0])
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(GenerationError, match="attention_type"):
        model(long)
    with pytest.raises(GenerationError, match="attention_type"):
        model.generate(long, max_new_tokens=2)
    assert model(long[:, :14]).logits.shape == (1, 14, VOCAB)


def test_one_token_step(tmp_path_factory):
    BIG_BIRD_X.check_one_token_step(tmp_path_factory)


def test_lora_both_ways(tmp_path_factory, tmp_path):
    BIG_BIRD_X.check_lora(tmp_path_factory, tmp_path, targets=["query", "value"], slots=True)


def test_int8_and_disk_offload(tmp_path_factory, tmp_path):
    """int8 close to fp32; half the model on disk (the pooler a placement block of its own) as in memory."""
    BIG_BIRD.check_quantized(tmp_path_factory, "int8")
    BIG_BIRD.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_round_trip_and_names(tmp_path_factory, tmp_path, name):
    """Saved files load in transformers with equal logits and back here bit-identical; state_dict() holds
    transformers' names, the pooler transformers' BigBirdForCausalLM keeps included (the tied decoder's weight and
    bias transformers lists again, as BERT's)."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    ours, theirs = autolm.AutoModelForCausalLM.from_pretrained(directory).state_dict(), hf.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: theirs[k].shape for k in ours}
    assert "bert.pooler.weight" in ours
    assert set(theirs) - set(ours) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def test_config_defaults_and_round_trip(tmp_path_factory, tmp_path):
    from autolm.models.big_bird import BigBirdConfig

    check_config_defaults(BigBirdConfig)
    config = autolm.AutoConfig.from_pretrained(BIG_BIRD_X.checkpoint(tmp_path_factory)[0])
    config.save_pretrained(tmp_path)
    assert autolm.AutoConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert config.attention_type == "original_full" and not config.use_bias and config.rescale_embeddings
