"""ProphetNet's decoder (transformers' ProphetNetForCausalLM) against transformers and peft. Three checkpoints:
BASE (ngram 2, tied embeddings, cross-attention weights kept, buckets whose log-spaced part the prompts reach),
WIDE (ngram 3, untied head and embeddings, no cross-attention, ReLU, pad_token_id 0 with 4 buckets clamping at a
max distance of 6) and ONE (ngram 1: no logits_ngram).

`logits` are the first predicting stream's, `logits_ngram` the further streams'; both equal transformers' over a
left-padded batch, transformers' scrambled relative bias of the predicting streams included. Every token takes the
general forward (one_token_step False: no one-token or compiled step exists), each step's logits transformers'
cached forward's. transformers' cached step masks no padding: a padded batch's generation is checked up to the
first token (the prompt's forward, masked in both). peft has no default LoRA targets for prophetnet. llama.cpp has
no ProphetNet: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch
from family_checks import Family, check_config_defaults, check_lora_needs_targets

import autolm
from autolm.errors import ConfigError, GenerationError

SMALL = dict(hidden_size=32, num_decoder_layers=2, num_encoder_layers=2, num_decoder_attention_heads=4,
             decoder_ffn_dim=48, max_position_embeddings=40, num_buckets=8, relative_max_distance=12, dropout=0.0)  # fmt: skip
TARGETS = ["query_proj", "value_proj", "relative_pos_embeddings", "intermediate"]
BASE = Family("ProphetNetConfig", SMALL, lora_targets=TARGETS)
WIDE = Family("ProphetNetConfig", dict(SMALL, ngram=3, tie_word_embeddings=False, add_cross_attention=False,
                                       activation_function="relu", num_buckets=4, relative_max_distance=6))  # fmt: skip
ONE = Family("ProphetNetConfig", dict(SMALL, ngram=1))
ALL = {"base": BASE, "wide": WIDE, "one": ONE}


@pytest.mark.parametrize("name", ALL)
def test_logits(tmp_path_factory, name):
    """logits and logits_ngram of a left-padded batch equal transformers' at every real position; hidden_states
    are the main stream's, as transformers'."""
    ALL[name].check_logits(tmp_path_factory)
    directory, hf = ALL[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=2)
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, output_hidden_states=True)
        theirs = hf(ids, attention_mask=mask, output_hidden_states=True)
    if name == "one":
        assert ours.logits_ngram is None and theirs.logits_ngram is None
    else:
        got, want = (o.logits_ngram.transpose(0, 1)[:, real] for o in (ours, theirs))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["base", "wide"])
def test_generate(tmp_path_factory, name):
    """Greedy and beam search on one row give transformers' tokens; a left-padded batch's first token too."""
    directory, hf = ALL[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5))
    row = ids[:1]
    for kwargs in (dict(max_new_tokens=12), dict(max_new_tokens=6, num_beams=3)):
        ours = model.generate(row, do_sample=False, **kwargs)
        assert torch.equal(ours, hf.generate(row, do_sample=False, **kwargs)), kwargs
    ours = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=1)
    assert torch.equal(ours, hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=1))


def test_decoding_takes_the_general_forward(tmp_path_factory):
    """No one-token or compiled step: each generated token goes through the general forward, its logits
    transformers' cached forward's."""
    from test_decode_steps import greedy_steps

    from autolm import step

    directory, hf = BASE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert not step.one_token_model(model) and not step.compilable(model)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    tokens, logits = greedy_steps(model, ids, 6, "auto")
    with torch.no_grad():
        out, theirs = hf(ids, use_cache=True), []
        for t in tokens:
            out = hf(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
            theirs.append(out.logits[0, -1])
    torch.testing.assert_close(logits, torch.stack(theirs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [{}, dict(eps=0.1, disable_ngram_loss=True)])
def test_loss(tmp_path_factory, config):
    """transformers' n-gram loss: every stream against the labels as given (no shift), -100 ignored; label
    smoothing eps; disable_ngram_loss keeps the first stream's alone. Gradients reach the relative bias."""
    directory, hf = WIDE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, **config)
    for key, value in config.items():
        setattr(hf.config, key, value)
    hf.disable_ngram_loss = hf.config.disable_ngram_loss
    ids, mask = padded_batch(seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    ours = model(ids, attention_mask=mask, labels=labels).loss
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, labels=labels).loss
    hf.config.eps, hf.config.disable_ngram_loss = 0.0, False
    hf.disable_ngram_loss = False
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.backward()
    assert model.model.layers[0].self_attn.relative_pos_embeddings.weight.grad.abs().sum() > 0


def test_lora(tmp_path_factory, tmp_path):
    BASE.check_lora(tmp_path_factory, tmp_path)
    check_lora_needs_targets(*BASE.checkpoint(tmp_path_factory))


def test_quantized(tmp_path_factory):
    BASE.check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", ["base", "wide"])
def test_save(tmp_path_factory, tmp_path, name):
    """autolm's save loads in transformers with equal logits; transformers' names (prophetnet.word_embeddings,
    the decoder's copy and the head tied to it, or three tensors untied; cross_attn) in the state dict and the
    file; config.json round-trips."""
    ALL[name].check_saved_files(tmp_path_factory, tmp_path)


def test_config_defaults_and_names():
    """Every field autolm writes holds transformers' default; config.json's names as arguments and attributes."""
    import transformers

    from autolm.models.prophetnet import ProphetNetConfig

    check_config_defaults(ProphetNetConfig)
    ours = ProphetNetConfig(
        num_decoder_layers=3, num_decoder_attention_heads=4, decoder_ffn_dim=96, hidden_size=64
    )
    assert (ours.num_hidden_layers, ours.num_attention_heads, ours.intermediate_size) == (3, 4, 96)
    theirs = json.loads(transformers.ProphetNetConfig().to_json_string())
    assert set(ProphetNetConfig().to_dict()) - {"model_type"} <= set(theirs)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(ngram=0), "ngram"),
        (dict(num_buckets=-1), "num_buckets"),
        (dict(relative_max_distance=2), "relative_max_distance"),
        (dict(eps=1.5), "eps"),
        (dict(pad_token_id=None), "pad_token_id"),
        (dict(activation_function="swiglu"), "activation_function"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="prophetnet", hidden_size=32, num_decoder_attention_heads=4, num_decoder_layers=1,
                vocab_size=VOCAB)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_refusals(tmp_path_factory):
    """Positions past the table, encoder_hidden_states and tensor parallelism are refused by name."""
    directory, _ = BASE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    model(torch.ones(1, 38, dtype=torch.long))  # slot 37: positions 38 and 39 of 40 (pad_token_id 0)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        model(torch.ones(1, 39, dtype=torch.long))
    with pytest.raises(GenerationError, match="encoder_hidden_states"):
        model(torch.ones(1, 3, dtype=torch.long), encoder_hidden_states=torch.zeros(1, 3, 32))
    with pytest.raises(ConfigError, match="'prophetnet' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
