"""XLNet (XLNetLMHeadModel) against transformers and peft: bidirectional ("bi") and causal ("uni", same_length,
clamp_len) relative attention, padding masks, token types (segment scores), perm_mask / target_mapping (the query
stream), mems in and out (mem_len, reuse_len), bi_data, generate as transformers' (the dummy token, mems less their
last two states; the whole sequence where use_mems_eval is false), LoRA (peft has no default targets:
layer_1/layer_2), int8, save round trips in transformers' names, config defaults, refusals. transformers' "uni"
model fails with a mask over more than one row: those rows are compared one at a time. llama.cpp has no XLNet: no
GGUF; no KV cache, so no one-token or compiled step to check."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults, check_lora_needs_targets

import autolm
from autolm.errors import ConfigError, GenerationError

_SMALL = dict(d_model=32, n_layer=2, n_head=4, d_inner=64)
BI = Family("XLNetConfig", _SMALL)
FAMILIES = {
    "bi": BI,
    # causal, the past limited to the same length, clamped distances, ReLU, a short memory
    "uni": Family(
        "XLNetConfig",
        dict(_SMALL, attn_type="uni", same_length=True, clamp_len=5, ff_activation="relu", mem_len=4),
    ),
    # forward and backward encodings over the batch's halves, untied, no mems in eval, reuse_len
    "bi_data": Family(
        "XLNetConfig", dict(_SMALL, bi_data=True, tie_word_embeddings=False, use_mems_eval=False, reuse_len=3)
    ),
}


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _inputs(T: int, B: int) -> list[dict]:
    """The forward's input variants: a padding mask, none, token types, a permutation mask with two targets."""
    perm = (torch.rand(B, T, T, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    target = torch.zeros(B, 2, T)
    target[:, 0, -1] = target[:, 1, 3] = 1
    types = (torch.arange(T) > 6).long().expand(B, -1)
    return [dict(), dict(token_type_ids=types), dict(perm_mask=perm, target_mapping=target)]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_mems(tmp_path_factory, name):
    """Logits and mems equal transformers' for each input variant over a left-padded batch (four rows: bi_data's
    halves), and a continuation over those mems too; "uni" rows one at a time (transformers fails on more)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(13, 9, 4, 7))
    rows = [slice(i, i + 1) for i in range(4)] if name == "uni" else [slice(None)]
    with torch.no_grad():
        for kwargs in _inputs(ids.shape[1], 4):
            kwargs["attention_mask"] = mask
            ours = model(ids, **kwargs)
            for r in rows:
                theirs = hf(ids[r], **{k: v[r] for k, v in kwargs.items()})
                _close(ours.logits[r], theirs.logits)
                assert (ours.mems is None) == (theirs.mems is None)
                if theirs.mems is None:
                    continue
                for a, b in zip(ours.mems, theirs.mems):
                    _close(a[:, r], b)
                nxt = dict(token_type_ids=torch.ones(len(ids[r]), 5, dtype=torch.long))
                mems = tuple(m[:, r] for m in ours.mems)
                _close(
                    model(ids[r, :5], mems=mems, **nxt).logits, hf(ids[r, :5], mems=theirs.mems, **nxt).logits
                )


def test_inputs_embeds_input_mask_and_hidden_states(tmp_path_factory):
    """inputs_embeds, input_mask (attention_mask's negation) and output_hidden_states as transformers'."""
    directory, hf = BI.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        emb = hf.get_input_embeddings()(ids)
        _close(
            model(inputs_embeds=emb, input_mask=1 - mask).logits,
            hf(inputs_embeds=emb, input_mask=1 - mask).logits,
        )
        ours, theirs = model(ids, output_hidden_states=True), hf(ids, output_hidden_states=True)
        assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
        for a, b in zip(ours.hidden_states, theirs.hidden_states):
            _close(a, b)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_as_transformers(tmp_path_factory, name):
    """Greedy tokens and every step's logits equal transformers' (a left-padded batch, whose attention_mask
    transformers' XLNet drops; "uni": one row)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5, 7, 9))
    if name == "uni":
        ids, mask = ids[:1], mask[:1]
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)  # fmt: skip
    ours, theirs = model.generate(ids, **kwargs), hf.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    _close(torch.stack(ours.logits), torch.stack(theirs.logits))
    assert not torch.allclose(ours.logits[0], ours.logits[-1])  # each step sees the sequence grown


def test_lora_both_ways(tmp_path_factory, tmp_path):
    """peft has no default targets for xlnet (refused in both); with layer_1/layer_2 an adapter peft made gives
    peft's logits here and autolm's loads in peft with the same logits."""
    import peft

    directory, hf = BI.checkpoint(tmp_path_factory)
    check_lora_needs_targets(directory, hf)
    ids, mask = padded_batch(seed=5)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["layer_1", "layer_2"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(0))
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask).logits
    pm.unload()
    ours = autolm.PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory),
                                            str(tmp_path / "peft"))  # fmt: skip
    with torch.no_grad():
        _close(ours(ids, attention_mask=mask).logits, expected)
        ours.save_pretrained(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
        again = back(input_ids=ids, attention_mask=mask).logits
        back.unload()
        _close(again, expected)


def test_int8(tmp_path_factory):
    BI.check_quantized(tmp_path_factory, "int8")


def test_save_round_trip(tmp_path_factory, tmp_path):
    """Saved files load in transformers with equal logits and back here bit-identical; state_dict() holds exactly
    transformers' names; an untied bi_data model's files too (an even batch: bi_data splits it in halves; an odd
    one is refused by name, where transformers fails)."""
    BI.check_save(tmp_path_factory, tmp_path)
    directory, hf = FAMILIES["bi_data"].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert set(model.state_dict()) == set(hf.state_dict())
    model.save_pretrained(tmp_path / "untied")
    theirs = FAMILIES["bi_data"].hf_auto().from_pretrained(tmp_path / "untied")
    ids, mask = padded_batch(lengths=(13, 9, 4, 7))
    with torch.no_grad():
        _close(model(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits)
        with pytest.raises(GenerationError, match="bi_data"):
            model(ids[:3])


def test_config_defaults_and_round_trip(tmp_path_factory, tmp_path):
    """Defaults equal transformers' (max_position_embeddings not written: XLNet has no limit); config.json
    round-trips in its own names."""
    from autolm.models.xlnet import XLNetConfig

    check_config_defaults(XLNetConfig)
    assert XLNetConfig(d_model=64, n_head=4).d_head == 16 and XLNetConfig(n_token=7).vocab_size == 7
    directory, _ = FAMILIES["uni"].checkpoint(tmp_path_factory)
    config = autolm.AutoConfig.from_pretrained(directory)
    config.save_pretrained(tmp_path)
    assert autolm.AutoConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert config.attn_type == "uni" and config.ff_activation == "relu" and config.mem_len == 4
    assert "max_position_embeddings" not in config.to_dict() and config.to_dict()["d_inner"] == 64


def test_refusals(tmp_path_factory):
    """A bad attn_type or d_head is a ConfigError naming it; past_key_values, output_attentions, beam search and
    speculative decoding are refused by name; position_ids are ignored, as transformers ignores them."""
    from autolm.models.xlnet import XLNetConfig

    with pytest.raises(ConfigError, match="attn_type"):
        XLNetConfig(attn_type="both")
    with pytest.raises(ConfigError, match="d_head"):
        XLNetConfig(d_head=7)
    directory, hf = BI.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, _ = padded_batch()
    with torch.no_grad():
        for key, value in (("past_key_values", object()), ("output_attentions", True)):
            with pytest.raises(GenerationError, match=key):
                model(ids, **{key: value})
        _close(model(ids, position_ids=ids).logits, hf(ids).logits)
    for key, value in (("num_beams", 2), ("prompt_lookup_num_tokens", 2)):
        with pytest.raises(GenerationError, match=key):
            model.generate(ids, max_new_tokens=2, **{key: value})
