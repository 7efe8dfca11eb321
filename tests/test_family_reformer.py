"""Reformer (transformers' ReformerModelWithLMHead) against transformers and peft. Checkpoints, hash_seed pinned:
MIXED (local, LSH, local layers; axial positions of a 4 x 8 grid; chunks of 16), LOCAL (two local layers with
chunks of 4, so that prompts and generations span several chunks; a plain position table, GELU, layer_norm_eps
1e-5) and HASHED variants (LSH chunks of 4, so that a forward hashes: one or two hashing rounds, buckets chosen by
transformers or factorized, one or two chunks back).

A forward from the start hashes as transformers' does past lsh_attn_chunk_length (deterministic with hash_seed:
the rotations are the seeded generator's draws); after cached tokens past it (transformers' cached hashing) autolm
refuses by name. transformers' forward crashes on position_ids with an input it pads to a multiple of the chunk
lengths (its _pad_to_mult_of_chunk_length), so those batches are compared without position_ids (positions are
then slots, in both). transformers' generate drops attention_mask: generation is compared on unpadded rows. Every
token takes the general forward (no one-token or compiled step). peft has no default LoRA targets for reformer.
llama.cpp has no Reformer: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family

import autolm
from autolm.errors import ConfigError, GenerationError

SMALL = dict(hidden_size=32, num_attention_heads=2, attention_head_size=8, feed_forward_size=48, is_decoder=True,
             hash_seed=0, hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0)  # fmt: skip
MIXED = Family("ReformerConfig", dict(SMALL, attn_layers=["local", "lsh", "local"], axial_pos_shape=[4, 8],
                                      axial_pos_embds_dim=[16, 16], local_attn_chunk_length=16,
                                      lsh_attn_chunk_length=16, max_position_embeddings=32),
               lora_targets=["query_key", "query", "value"])  # fmt: skip
LOCAL = Family("ReformerConfig", dict(SMALL, attn_layers=["local", "local"], axial_pos_embds=False,
                                      max_position_embeddings=64, local_attn_chunk_length=4, hidden_act="gelu",
                                      layer_norm_eps=1e-5))  # fmt: skip


def _compare(directory, hf, ids, mask, with_positions: bool) -> None:
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    pos = dict(position_ids=positions(mask)) if with_positions else {}
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, output_hidden_states=True, **pos)
        theirs = hf(ids, attention_mask=mask, output_hidden_states=True, **pos)
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-4, rtol=1e-4)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[: len(a), : a.shape[1]][real], atol=1e-4, rtol=1e-4)


def test_logits_mixed(tmp_path_factory):
    """Local and LSH layers, axial positions: a left-padded batch (position_ids counted over the real tokens, as
    the battery passes them) and one of the lsh chunk's full length without position_ids (slots)."""
    MIXED.check_logits(tmp_path_factory)
    directory, hf = MIXED.checkpoint(tmp_path_factory)
    _compare(directory, hf, *padded_batch(seed=1, lengths=(16, 10, 3)), with_positions=False)


def test_logits_local_chunks(tmp_path_factory):
    """Local attention over several chunks: a padded batch of 4 chunks with position_ids; one of 13 tokens that
    transformers pads to 16 (no position_ids); the hidden streams as transformers' hidden_states."""
    directory, hf = LOCAL.checkpoint(tmp_path_factory)
    _compare(directory, hf, *padded_batch(seed=2, lengths=(16, 11, 5)), with_positions=True)
    _compare(directory, hf, *padded_batch(seed=3, lengths=(13, 7, 13)), with_positions=False)


@pytest.mark.parametrize("family,prompt,new", [(MIXED, 9, 7), (LOCAL, 9, 14)])
def test_generate(tmp_path_factory, family, prompt, new):
    """Greedy and beam search on one row give transformers' tokens (its cached steps: LOCAL's cross chunks)."""
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    row = padded_batch(seed=4, lengths=(prompt,))[0]
    for kwargs in (dict(max_new_tokens=new), dict(max_new_tokens=new // 2, num_beams=3)):
        ours = model.generate(row, do_sample=False, **kwargs)
        assert torch.equal(ours, hf.generate(row, do_sample=False, **kwargs)), kwargs


def test_decoding_takes_the_general_forward(tmp_path_factory):
    """No one-token or compiled step: each generated token goes through the general forward, its logits
    transformers' cached forward's."""
    from test_decode_steps import greedy_steps

    from autolm import step

    directory, hf = LOCAL.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert not step.one_token_model(model) and not step.compilable(model)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    tokens, logits = greedy_steps(model, ids, 7, "auto")
    with torch.no_grad():
        out, theirs = hf(ids, use_cache=True), []
        for t in tokens:
            out = hf(torch.tensor([[t]]), past_buckets_states=out.past_buckets_states, use_cache=True)
            theirs.append(out.logits[0, -1])
    torch.testing.assert_close(logits, torch.stack(theirs), atol=1e-4, rtol=1e-4)


def test_loss(tmp_path_factory):
    """transformers' shifted causal loss, -100 ignored; gradients reach the axial positions."""
    directory, hf = MIXED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    ours = model(ids, attention_mask=mask, labels=labels).loss
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.backward()
    assert model.model.embeddings.position_embeddings.weights[0].grad.abs().sum() > 0


def test_lora(tmp_path_factory, tmp_path):
    """An adapter peft made gives peft's logits in autolm, one autolm made gives them in peft, merging changes
    nothing (the battery's check_lora, with position_ids given to both: transformers' default positions are slots,
    not the battery's counts over the real tokens)."""
    MIXED.check_lora(tmp_path_factory, tmp_path, slots=True)


def test_quantized(tmp_path_factory):
    MIXED.check_quantized(tmp_path_factory, "int8")


def test_save(tmp_path_factory, tmp_path):
    """autolm's save loads in transformers with equal logits; transformers' names (axial weights.0 / .1,
    lm_head.decoder and the unread lm_head.bias) in the state dict and the file; config.json round-trips. LOCAL's
    plain position table too (its logits compared without position_ids, which transformers' padding breaks)."""
    MIXED.check_saved_files(tmp_path_factory, tmp_path)
    import transformers

    directory, _ = LOCAL.checkpoint(tmp_path_factory)
    autolm.AutoModelForCausalLM.from_pretrained(directory).save_pretrained(tmp_path / "local")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "local").eval()
    _compare(tmp_path / "local", theirs, *padded_batch(seed=6), with_positions=False)


HASHED = dict(SMALL, attn_layers=["local", "lsh", "local", "lsh"], axial_pos_shape=[4, 8], axial_pos_embds_dim=[16, 16],
              local_attn_chunk_length=4, lsh_attn_chunk_length=4, max_position_embeddings=32)  # fmt: skip


@pytest.mark.parametrize(
    "extra,lengths",
    [
        ({}, (16, 11, 5)),  # num_buckets null: transformers' choice for the length (8)
        ({}, (13, 11, 5)),  # padded to 16 on the right, as transformers pads it
        (dict(num_hashes=2), (16, 11, 5)),  # two hashing rounds, summed by their log-normalisers
        (
            dict(num_buckets=[2, 2], lsh_num_chunks_before=2),
            (14, 14, 14),
        ),  # factorized buckets, two chunks back
    ],
)
def test_lsh_hashing(tmp_path_factory, extra, lengths):
    """Past lsh_attn_chunk_length a forward from the start hashes as transformers' (hash_seed pinned: its rotations
    are the generator's draws after seeding): logits over a left-padded batch equal transformers'."""
    family = Family("ReformerConfig", dict(HASHED, **extra))
    directory, hf = family.checkpoint(tmp_path_factory)
    _compare(directory, hf, *padded_batch(seed=7, lengths=lengths), with_positions=False)


def test_cached_lsh_hashing_is_refused(tmp_path_factory):
    """After cached tokens past lsh_attn_chunk_length (transformers' cached hashing) autolm refuses by name: a
    forward from the start of any length runs, generation stops at the chunk length; no TP plan."""
    directory, _ = MIXED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    model(torch.ones(1, 17, dtype=torch.long))
    model.generate(torch.ones(1, 9, dtype=torch.long), max_new_tokens=8, do_sample=False)  # the 8th reads 16
    with pytest.raises(GenerationError, match="lsh_attn_chunk_length"):
        model.generate(torch.ones(1, 9, dtype=torch.long), max_new_tokens=9, do_sample=False)
    with pytest.raises(ConfigError, match="'reformer' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
    # chunks of 3 and 8: a prompt of 4 is padded to 24 and hashed; transformers' next step reads cached buckets
    family = Family("ReformerConfig", dict(HASHED, local_attn_chunk_length=3, lsh_attn_chunk_length=8))
    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    assert model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, do_sample=False).shape == (
        1,
        5,
    )
    with pytest.raises(GenerationError, match="lsh_attn_chunk_length"):
        model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, do_sample=False)


def test_config_defaults_and_names():
    """Every field autolm writes holds transformers' default (lists for its tuples); config.json's names as
    arguments and attributes; num_hidden_layers follows attn_layers."""
    import transformers

    from autolm.models.reformer import ReformerConfig

    theirs = transformers.ReformerConfig()
    for key, value in ReformerConfig().to_dict().items():
        if key != "model_type":
            want = getattr(theirs, key)
            assert (list(want) if isinstance(want, tuple) else want) == value, key
    ours = ReformerConfig(
        feed_forward_size=96, attention_head_size=16, layer_norm_eps=1e-5, attn_layers=["lsh"]
    )
    assert (ours.intermediate_size, ours.head_dim, ours.rms_norm_eps, ours.num_hidden_layers) == (
        96,
        16,
        1e-5,
        1,
    )
    assert set(ReformerConfig().to_dict()) - {"model_type"} <= set(json.loads(theirs.to_json_string()))


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(attn_layers=["local", "full"]), "attn_layers"),
        (dict(axial_pos_embds_dim=[16, 8]), "axial_pos_embds_dim"),
        (dict(axial_pos_shape=[4]), "axial_pos_shape"),
        (dict(local_attn_chunk_length=0), "local_attn_chunk_length"),
        (dict(hidden_dropout_prob=2), "hidden_dropout_prob"),
        (dict(hidden_act="swiglu"), "hidden_act"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="reformer", hidden_size=32, num_attention_heads=2, attention_head_size=8,
                axial_pos_shape=[4, 8], axial_pos_embds_dim=[16, 16], vocab_size=VOCAB, is_decoder=True)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("key,value", [("is_decoder", False), ("lsh_num_chunks_after", 1)])
def test_model_needs_a_decoder_config(tmp_path_factory, key, value):
    """transformers' ReformerModelWithLMHead asserts is_decoder and no chunks after; autolm names the field."""
    directory, _ = MIXED.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match=key):
        autolm.AutoModelForCausalLM.from_pretrained(directory, **{key: value})
