"""BERT-style encoders run as decoders (BertLMHeadModel, RobertaForCausalLM, XLM-RoBERTa, CamemBERT,
Data2Vec-Text) against transformers and peft: post-LN layers, the embeddings' LayerNorm over word + position +
token type, RoBERTa's positions counted over the non-pad ids from pad_token_id + 1 under left padding, BERT's
cache slots, given position_ids read as rows, the prediction heads with the decoder's bias, generate, the
one-token step, LoRA (peft's query/value), int8, save round trips in transformers' names, is_decoder=False run
bidirectionally as transformers runs it (generate refused), encoder inputs refused. llama.cpp's BERT is an
encoder embedding model: no GGUF."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import GenerationError

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, is_decoder=True)  # fmt: skip
# BERT: gelu, 2 token types; a variant with relu, an untied head, 3 token types, a larger epsilon, cross-attention
BERT = Family("BertConfig", _SMALL)
BERT_X = Family("BertConfig", dict(_SMALL, hidden_act="relu", tie_word_embeddings=False, type_vocab_size=3,
                                   layer_norm_eps=1e-5, add_cross_attention=True))  # fmt: skip
ROBERTA = Family("RobertaConfig", _SMALL)
FAMILIES = {
    "bert": BERT,
    "bert_x": BERT_X,
    "roberta": ROBERTA,
    "xlm-roberta": Family("XLMRobertaConfig", dict(_SMALL, hidden_act="gelu_new")),
    "camembert": Family("CamembertConfig", _SMALL),
    "data2vec-text": Family("Data2VecTextConfig", dict(_SMALL, tie_word_embeddings=False)),
    # ELECTRA's generator: embeddings narrower than hidden_size (projected), relu layers (the head's GELU stays);
    # and untied, embeddings as wide as the layers (no projection)
    "electra": Family("ElectraConfig", dict(_SMALL, embedding_size=16, hidden_act="relu")),
    "electra_wide": Family("ElectraConfig", dict(_SMALL, embedding_size=32, tie_word_embeddings=False)),
    # ERNIE with its task type embeddings
    "ernie": Family("ErnieConfig", dict(_SMALL, use_task_id=True, task_type_vocab_size=4)),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", ["bert", "bert_x", "roberta", "ernie"])
def test_default_positions_follow_transformers(tmp_path_factory, name):
    """Without position_ids: BERT's are the slots (padding included), RoBERTa's count the non-pad ids from
    pad_token_id + 1 (left padding: pad ids are 0 in padded_batch, the pad id 1 put there for RoBERTa); with a
    cache, the next token's too; inputs_embeds: pad + 1 on; token_type_ids given add their embedding."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    ids[mask == 0] = model.config.pad_token_id
    real = mask.bool()
    types = (torch.arange(ids.shape[1]) % 2).expand_as(ids)
    with torch.no_grad():
        tasks = dict(task_type_ids=(torch.arange(ids.shape[1]) % 3).expand_as(ids)) if name == "ernie" else {}
        for kwargs in (dict(input_ids=ids), dict(input_ids=ids, token_type_ids=types, **tasks)):
            ours = model(attention_mask=mask, **kwargs).logits[real]
            torch.testing.assert_close(
                ours, hf(attention_mask=mask, **kwargs).logits[real], atol=1e-4, rtol=1e-4
            )
        emb = hf.get_input_embeddings()(ids[1:, -9:])
        ours = model(inputs_embeds=emb).logits
        torch.testing.assert_close(ours, hf(inputs_embeds=emb).logits, atol=1e-4, rtol=1e-4)
        a, b = model(ids, attention_mask=mask, use_cache=True), hf(ids, attention_mask=mask, use_cache=True)
        nxt, mask2 = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        ours = model(nxt, attention_mask=mask2, past_key_values=a.past_key_values).logits
        theirs = hf(nxt, attention_mask=mask2, past_key_values=b.past_key_values).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_generate_greedy_and_beam(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", ["bert_x", "roberta", "electra"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    ROBERTA.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_lora_default_targets_both_ways(tmp_path_factory, tmp_path, name):
    """peft's defaults for the types (query, value): an adapter peft made gives peft's logits here (the padding
    mask's positions given to both), and autolm's loads in peft with the same logits, in transformers' names."""
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path, slots=True, adapted=("query", "value"))


def test_int8(tmp_path_factory):
    BERT.check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", ["bert_x", "roberta", "electra", "electra_wide", "ernie"])
def test_save_round_trip(tmp_path_factory, tmp_path, name):
    """Saved files load in transformers with equal logits and back here bit-identical; state_dict() holds
    transformers' names (and the head's bias as the file's `bias`)."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ours, theirs = set(model.state_dict()), set(hf.state_dict())
    assert ours <= theirs and theirs - ours <= {"cls.predictions.decoder.bias", "lm_head.decoder.bias",
                                                "cls.predictions.decoder.weight", "lm_head.decoder.weight"}  # fmt: skip


@pytest.mark.parametrize("cls", ["BertConfig", "RobertaConfig", "XLMRobertaConfig", "CamembertConfig",
                                 "Data2VecTextConfig", "ElectraConfig", "ErnieConfig"])  # fmt: skip
def test_config_defaults_and_round_trip(tmp_path_factory, tmp_path, cls):
    """Defaults equal transformers'; config.json round-trips (layer_norm_eps by its name)."""
    import autolm.models.bert as family

    check_config_defaults(getattr(family, cls))
    directory, _ = FAMILIES["bert_x"].checkpoint(tmp_path_factory)
    config = autolm.AutoConfig.from_pretrained(directory)
    config.save_pretrained(tmp_path)
    assert autolm.AutoConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert config.layer_norm_eps == 1e-5 and config.add_cross_attention


def test_refusals(tmp_path_factory):
    """encoder_hidden_states / encoder_attention_mask are refused by name (a cross-attention checkpoint loads;
    its cross-attention never runs); a position past the table is a clear error."""
    directory, _ = BERT_X.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert "model.layers.0.crossattention.self.query.weight" in dict(model.named_parameters())
    ids, _ = padded_batch()
    for key in ("encoder_hidden_states", "encoder_attention_mask"):
        with pytest.raises(GenerationError, match=key):
            model(ids, **{key: torch.zeros(3, 4, 32)})
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        model(ids, position_ids=torch.full_like(ids, 64))


@pytest.mark.parametrize("config_cls", ["BertConfig", "RobertaConfig"])
def test_not_a_decoder_runs_as_transformers(tmp_path_factory, caplog, config_cls):
    """is_decoder=False: transformers warns and runs the layers bidirectionally with no cache; so does autolm's
    forward (same logits on a left-padded batch, with and without position_ids); generate and a given cache are
    refused naming is_decoder."""
    directory, hf = Family(config_cls, dict(_SMALL, is_decoder=False)).checkpoint(tmp_path_factory)
    with caplog.at_level("WARNING", logger="autolm"):
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert "is_decoder=True" in caplog.text
    ids, mask = padded_batch()
    ids[mask == 0] = model.config.pad_token_id
    real = mask.bool()
    with torch.no_grad():
        for kwargs in (dict(), dict(position_ids=positions(mask))):
            out = model(ids, attention_mask=mask, use_cache=True, **kwargs)
            theirs = hf(ids, attention_mask=mask, **kwargs).logits[real]
            torch.testing.assert_close(out.logits[real], theirs, atol=1e-4, rtol=1e-4)
            assert out.past_key_values is None
    with pytest.raises(GenerationError, match="is_decoder"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    cache = autolm.AutoModelForCausalLM.from_pretrained(BERT.checkpoint(tmp_path_factory)[0]).make_cache(
        3, 20
    )
    with pytest.raises(GenerationError, match="is_decoder"):
        model(ids, attention_mask=mask, past_key_values=cache)


@pytest.mark.parametrize("name", ["bert", "bert_x"])
def test_resize_token_embeddings_as_transformers(tmp_path_factory, name):
    """Resized by 5 rows (mean_resizing off): the decoder's bias as transformers resizes it (a tied head's padded with
    zeros, an untied one's likewise without mean_resizing), and the logits over the old vocabulary unchanged."""
    family = FAMILIES[name]
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf.resize_token_embeddings(VOCAB + 5, mean_resizing=False)
    model.resize_token_embeddings(VOCAB + 5, mean_resizing=False)
    torch.testing.assert_close(model.lm_head.bias, hf.get_output_embeddings().bias)
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape[-1] == VOCAB + 5
    torch.testing.assert_close(after[..., :VOCAB], before)
