"""CPM-Ant (CpmAntForCausalLM) against transformers and peft. Two checkpoints: BASE (heads * dim_head = hidden,
position buckets whose log-spaced half the prompts reach) and QUIRKS (dim_head apart from hidden / heads, a
longer prompt of a fourth prompt type, 8 buckets with a max_distance of 6 that the positions pass, so the top
bucket clamps; 3 segment types, one layer, dropout_p and eps set).

CPM-Ant's attention is bidirectional within a forward and its prompt's keys are kept as the cache's states: no
one-token step and no compiled step exist for it (the family says one_token_step = False; see
autolm/models/cpmant.py); the battery's checks of them become checks that generation takes the general forward,
token by token as transformers' cached forward computes it. peft has no default LoRA targets for cpmant.
llama.cpp has no CPM-Ant: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch
from family_checks import Family, check_config_defaults, check_lora_needs_targets

import autolm
from autolm.errors import ConfigError, GenerationError
from autolm.models.cpmant import CpmAntConfig

BASE = Family(
    "CpmAntConfig",
    dict(hidden_size=32, num_attention_heads=4, dim_head=8, dim_ff=48, num_hidden_layers=2,
         position_bias_num_buckets=32, position_bias_max_distance=64, prompt_types=3, prompt_length=3,
         segment_types=4),
    lora_targets=["project_q", "project_v", "w_0", "w_out"],
)  # fmt: skip
QUIRKS = Family(
    "CpmAntConfig",
    dict(hidden_size=32, num_attention_heads=2, dim_head=12, dim_ff=40, num_hidden_layers=1,
         position_bias_num_buckets=8, position_bias_max_distance=6, prompt_types=4, prompt_length=5,
         segment_types=3, dropout_p=0.1, eps=1e-5),
    lora_targets=["project_k", "attention_out", "w_1"],
)  # fmt: skip
FAMILIES = {"base": BASE, "quirks": QUIRKS}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    """A left-padded batch with its attention_mask, and without one (transformers' padding: the ids 0), give
    transformers' logits; hidden states and attention probabilities too (the prompt's dropped, as
    transformers')."""
    fam = FAMILIES[name]
    fam.check_logits(tmp_path_factory)
    fam.check_hidden_states(tmp_path_factory)
    directory, hf = fam.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=3)
    real = mask.bool()
    with torch.no_grad():
        ours, theirs = model(ids, output_attentions=True), hf(ids, output_attentions=True)
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-4, rtol=1e-4)
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


def test_generate(tmp_path_factory):
    """Greedy (a padded batch, one row) and beam search give transformers' tokens; QUIRKS' greedy too."""
    BASE.check_generate(tmp_path_factory)
    directory, hf = QUIRKS.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5), seed=2)
    ours = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    assert torch.equal(ours, hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12))


@pytest.mark.parametrize("name", FAMILIES)
def test_pieces_through_the_cache(tmp_path_factory, name):
    """A left-padded batch in two pieces through the cache (the first piece bidirectional on its own with the
    prompt, the second seeing it and itself both ways) gives transformers' cached forward's logits; the cache
    keeps the prompt's keys as each layer's state and the text's in its slots."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=6)
    real = mask.bool()
    P, n = model.config.prompt_length, 10
    with torch.no_grad():
        first = model(ids[:, :n], attention_mask=mask[:, :n], use_cache=True)
        second = model(ids[:, n:], attention_mask=mask, past_key_values=first.past_key_values)
        h1 = hf(ids[:, :n], use_cache=True)
        h2 = hf(ids, past_key_values=h1.past_key_values, use_cache=True)
        whole = model(ids, attention_mask=mask).logits
    ours, theirs = torch.cat([first.logits, second.logits], 1), torch.cat([h1.logits, h2.logits], 1)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[real], whole[real], atol=1e-3)  # not one bidirectional forward
    cache = second.past_key_values
    assert cache.length == ids.shape[1] and cache.state(0)[0].shape[2] == P
    theirs_keys = h2.past_key_values.layers[0].keys  # (B, nh, P + T, hd), the prompt's first
    torch.testing.assert_close(cache.state(0)[0], theirs_keys[:, :, :P], atol=1e-5, rtol=1e-5)
    ours_keys = cache.layers[0].keys.transpose(1, 2)[real]
    torch.testing.assert_close(ours_keys, theirs_keys[:, :, P:].transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


def test_decoding_takes_the_general_forward(tmp_path_factory):
    """No one-token or compiled step: each generated token goes through the general forward; the logits it
    gives each token are transformers' cached forward's over the sequence so far."""
    from test_decode_steps import greedy_steps

    from autolm import step

    directory, hf = BASE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert not step.one_token_model(model) and not step.compilable(model)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    tokens, logits = greedy_steps(model, ids, 8, "auto")
    with torch.no_grad():
        out, seq, theirs = hf(ids, use_cache=True), ids, []
        for t in tokens:
            seq = torch.cat([seq, torch.tensor([[t]])], 1)
            out = hf(seq, past_key_values=out.past_key_values, use_cache=True)
            theirs.append(out.logits[0, -1])
    torch.testing.assert_close(logits, torch.stack(theirs), atol=1e-4, rtol=1e-4)


def test_bf16(tmp_path_factory):
    BASE.check_bf16(tmp_path_factory)


def test_loss(tmp_path_factory):
    """transformers' loss: each position's logits against its label as given (no shift), -100 ignored."""
    directory, hf = BASE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    ours = model(ids, attention_mask=mask, labels=labels).loss
    with torch.no_grad():
        theirs = hf(ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.backward()
    assert model.model.position_bias.relative_attention_bias.grad.abs().sum() > 0


def test_lora(tmp_path_factory, tmp_path):
    BASE.check_lora(tmp_path_factory, tmp_path)


def test_lora_needs_targets(tmp_path_factory):
    check_lora_needs_targets(*QUIRKS.checkpoint(tmp_path_factory))


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    BASE.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' tensor names (lm_head.weight its own: transformers' checkpoints keep it though
    tie_word_embeddings is true) and config.json's keys and values."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert "lm_head.weight" in saved
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["tie_word_embeddings"] is True


def test_names_and_config(tmp_path_factory, tmp_path):
    model, _ = QUIRKS.check_names_and_config(tmp_path_factory, tmp_path)
    assert (model.config.dim_head, model.config.dim_ff, model.config.eps) == (12, 40, 1e-5)


def test_config_defaults():
    check_config_defaults(CpmAntConfig)


@pytest.mark.parametrize(
    "field, value",
    [("prompt_types", 2), ("segment_types", 2), ("position_bias_num_buckets", 2), ("prompt_length", 0),
     ("dropout_p", 1.5), ("position_bias_max_distance", 1), ("dim_head", 0), ("init_std", "x")],
)  # fmt: skip
def test_config_errors(tmp_path, field, value):
    """A value transformers' model could not run with (or a wrong type) is a ConfigError naming the field."""
    d = CpmAntConfig(
        hidden_size=32, num_attention_heads=4, dim_head=8, position_bias_num_buckets=32
    ).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**d, field: value}))
    with pytest.raises(ConfigError, match=field):
        CpmAntConfig.from_pretrained(tmp_path)


def test_refusals(tmp_path_factory):
    """inputs_embeds (the segments read the ids) and resizing the vocabulary (the prompt's rows follow it)."""
    model = autolm.AutoModelForCausalLM.from_pretrained(BASE.checkpoint(tmp_path_factory)[0])
    with pytest.raises(GenerationError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 32))
    with pytest.raises(ConfigError, match="resize_token_embeddings"):
        model.resize_token_embeddings(200)
    ids = torch.tensor([[5, 9, 5, 9, 5]])
    for extra in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=model)):
        with pytest.raises(GenerationError, match="both ways"):  # tokens verified together see each other
            model.generate(ids, max_new_tokens=4, do_sample=False, **extra)


def test_served_prompts_are_read_alone(tmp_path_factory, tmp_path):
    """The serving engine reads each prompt alone, whole and afresh (its tokens attend each other both ways),
    and decodes the rows together: requests of three lengths submitted together twice, with prefix caching on, a
    3-token prefill chunk and prompt lookup offered, each get transformers' greedy tokens for the prompt alone."""
    from conftest import write_char_tokenizer
    from test_prefix_cache import run

    from autolm.serve.engine import Engine
    from autolm.serve.speculation import Speculation

    directory, hf = BASE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    write_char_tokenizer(str(tmp_path))
    ids, mask = padded_batch()
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)] * 2
    engine = Engine(model, autolm.AutoTokenizer.from_pretrained(tmp_path), prefix_cache=1 << 20, prefill_chunk=3,
                    speculation=Speculation(prompt_lookup=3))  # fmt: skip
    try:
        got = run(engine, prompts)
    finally:
        engine.stop()
    for prompt, finished in zip(prompts, got):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                           output_scores=True, return_dict_in_generate=True)  # fmt: skip
        assert finished.all_token_ids == want.sequences[0, len(prompt) :].tolist()
        # the scores, not just the argmax
        for (token, logprob, *_), scores in zip(finished.logprobs, want.scores):
            assert abs(logprob - float(scores[0].log_softmax(-1)[token])) < 1e-4


def test_disk_offload(tmp_path_factory, tmp_path):
    BASE.check_disk_offload(tmp_path_factory, tmp_path)
