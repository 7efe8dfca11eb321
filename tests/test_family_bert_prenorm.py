"""BERT's relatives run as decoders against transformers and peft: the pre-LN RoBERTa-PreLayerNorm, XLM-RoBERTa-XL
and Megatron-BERT (each norm where transformers puts it, the final LayerNorm, the embeddings' LayerNorm only where
the type has one, RoBERTa's positions counted over the non-pad ids or BERT's cache slots) and BertGeneration
(no token types, its bare lm_head decoder): logits on a left-padded batch, default positions, generate, the
one-token and compiled steps, LoRA (peft has no default targets for these types: query/value named), int8, save
round trips in transformers' names, config defaults, refusals. llama.cpp has none of these as decoders: no GGUF."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults, check_lora_needs_targets
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import GenerationError

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, is_decoder=True)  # fmt: skip
_QV = ["query", "value"]
FAMILIES = {
    "roberta-prelayernorm": Family("RobertaPreLayerNormConfig", _SMALL),
    # untied, relu, cross-attention weights (never run), a larger epsilon
    "roberta-prelayernorm_x": Family(
        "RobertaPreLayerNormConfig",
        dict(
            _SMALL,
            tie_word_embeddings=False,
            hidden_act="relu",
            add_cross_attention=True,
            layer_norm_eps=1e-5,
        ),
    ),
    "xlm-roberta-xl": Family("XLMRobertaXLConfig", dict(_SMALL, type_vocab_size=2)),
    "xlm-roberta-xl_x": Family(
        "XLMRobertaXLConfig", dict(_SMALL, tie_word_embeddings=False, add_cross_attention=True)
    ),
    "megatron-bert": Family("MegatronBertConfig", _SMALL),
    "megatron-bert_x": Family(
        "MegatronBertConfig",
        dict(_SMALL, tie_word_embeddings=False, hidden_act="relu", add_cross_attention=True),
    ),
    "bert-generation": Family("BertGenerationConfig", _SMALL),
    "bert-generation_x": Family(
        "BertGenerationConfig", dict(_SMALL, tie_word_embeddings=False, add_cross_attention=True)
    ),
}
TYPES = ["roberta-prelayernorm", "xlm-roberta-xl", "megatron-bert", "bert-generation"]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", TYPES)
def test_default_positions_and_cache_follow_transformers(tmp_path_factory, name):
    """Without position_ids (RoBERTa's counted over the non-pad ids, BERT's the slots), with token_type_ids where
    the type has them, inputs_embeds, and a next token over the cache: transformers' logits."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    ids[mask == 0] = model.config.pad_token_id
    real = mask.bool()
    calls = [dict(input_ids=ids)]
    if name != "bert-generation":
        calls.append(dict(input_ids=ids, token_type_ids=(torch.arange(ids.shape[1]) % 2).expand_as(ids)))
    with torch.no_grad():
        for kwargs in calls:
            ours = model(attention_mask=mask, **kwargs).logits[real]
            torch.testing.assert_close(
                ours, hf(attention_mask=mask, **kwargs).logits[real], atol=1e-4, rtol=1e-4
            )
        emb = hf.get_input_embeddings()(ids[1:, -9:])
        torch.testing.assert_close(model(inputs_embeds=emb).logits, hf(inputs_embeds=emb).logits, atol=1e-4,
                                   rtol=1e-4)  # fmt: skip
        a, b = model(ids, attention_mask=mask, use_cache=True), hf(ids, attention_mask=mask, use_cache=True)
        nxt, mask2 = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        ours = model(nxt, attention_mask=mask2, past_key_values=a.past_key_values).logits
        theirs = hf(nxt, attention_mask=mask2, past_key_values=b.past_key_values).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TYPES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", ["roberta-prelayernorm_x", "megatron-bert", "bert-generation_x"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    FAMILIES["xlm-roberta-xl"].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", ["xlm-roberta-xl", "bert-generation"])
def test_lora_query_value_both_ways(tmp_path_factory, tmp_path, name):
    """peft has no default targets for these types (a LoraConfig naming none is refused by both, naming the
    type); with query/value named, peft's adapter gives peft's logits here (the padding mask's positions given to
    both: the defaults differ from them under padding, as in transformers) and autolm's loads in peft alike."""
    check_lora_needs_targets(*FAMILIES[name].checkpoint(tmp_path_factory))
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path, targets=_QV, slots=True)


@pytest.mark.parametrize("name", ["megatron-bert_x", "bert-generation"])
def test_disk_offload(tmp_path_factory, tmp_path, name):
    """Placement blocks: the final norm with the pre-LN body, BertGeneration's head-less decoder."""
    FAMILIES[name].check_disk_offload(tmp_path_factory, tmp_path)


def test_int8(tmp_path_factory):
    FAMILIES["megatron-bert"].check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", [n for n in FAMILIES if n.endswith("_x")] + ["roberta-prelayernorm"])
def test_save_round_trip_in_transformers_names(tmp_path_factory, tmp_path, name):
    """Saved files load in transformers with equal logits and back here bit-identical; state_dict() holds
    transformers' names (the final norm's and the cross-attention's included)."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ours, theirs = set(model.state_dict()), set(hf.state_dict())
    assert ours <= theirs and theirs - ours <= {"cls.predictions.decoder.bias", "lm_head.decoder.bias",
                                                "cls.predictions.decoder.weight", "lm_head.decoder.weight"}  # fmt: skip


@pytest.mark.parametrize("cls", ["RobertaPreLayerNormConfig", "XLMRobertaXLConfig", "MegatronBertConfig",
                                 "BertGenerationConfig"])  # fmt: skip
def test_config_defaults_and_round_trip(tmp_path_factory, tmp_path, cls):
    """Defaults equal transformers' (BertGeneration's without type_vocab_size); config.json round-trips."""
    import autolm.models.bert_prenorm as family

    check_config_defaults(getattr(family, cls))
    name = next(n for n, f in FAMILIES.items() if f.config_cls == cls and n.endswith("_x"))
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    config = autolm.AutoConfig.from_pretrained(directory)
    config.save_pretrained(tmp_path)
    assert autolm.AutoConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert config.add_cross_attention and ("type_vocab_size" in config.to_dict()) == (
        cls != "BertGenerationConfig"
    )


def test_refusals(tmp_path_factory):
    """BertGeneration takes no token_type_ids (transformers' forward has none): refused by name; encoder inputs
    refused; a pre-LN model without is_decoder refuses generate naming is_decoder."""
    model = autolm.AutoModelForCausalLM.from_pretrained(
        FAMILIES["bert-generation"].checkpoint(tmp_path_factory)[0]
    )
    ids, mask = padded_batch()
    with pytest.raises(GenerationError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(GenerationError, match="encoder_hidden_states"):
        model(ids, encoder_hidden_states=torch.zeros(3, 4, 32))
    directory, hf = Family("MegatronBertConfig", dict(_SMALL, is_decoder=False)).checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    real = mask.bool()
    with torch.no_grad():  # bidirectional, as transformers runs an encoder
        theirs = hf(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(GenerationError, match="is_decoder"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
