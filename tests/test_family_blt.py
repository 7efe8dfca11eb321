"""BLT (BltForCausalLM) against transformers and peft. Three checkpoints: entropy patching with a threshold that
gives patches of several lengths, GQA in the global transformer and its token_embedding_projection (encoder width *
cross_attn_k != global width); one with patches split at max_patch_length, cross attention after every encoder
layer and only before the first decoder layer, two hash functions, a byte window of 4 (local_attention_window_len)
and cross_attn_k 1; one without the patcher (patch_in_forward false: a patch per byte).

transformers' BLT cannot build its cache (DynamicCache(config=BltConfig) fails), so its checkpoints say
use_cache=false and its generate runs the whole sequence each step; autolm's cache keeps the bytes seen and each
forward runs the whole sequence too. No one-token step and no compiled step exist for BLT (the family says
one_token_step = False): the battery's checks of them become checks that generation takes the general forward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_lora_needs_targets, check_loss_and_gradients

import autolm
from autolm.errors import ConfigError, GenerationError
from autolm.models.blt import BltConfig

TINY = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=48)
LORA = ["q_proj", "v_proj", "down_proj", "patch_embedding_projection"]
ENTROPY = Family(
    "BltConfig",
    dict(use_cache=False, encoder_hash_byte_group_vocab=50, encoder_hash_byte_group_size=[3, 4],
         patching_threshold=5.24, patcher_config=dict(TINY),
         encoder_config=dict(TINY, hidden_size_global=48),
         decoder_config=dict(TINY, num_hidden_layers=2, hidden_size_global=48),
         global_config=dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                            intermediate_size=64)),
    lora_targets=LORA,
)  # fmt: skip
SPLIT = Family(
    "BltConfig",
    dict(use_cache=False, encoder_hash_byte_group_vocab=40, encoder_hash_byte_group_size=[2, 3],
         encoder_hash_byte_group_nb_functions=2, patching_threshold=5.15, max_patch_length=2,
         local_attention_window_len=4, cross_attn_k=1,
         patcher_config=dict(TINY, rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
         encoder_config=dict(TINY, num_hidden_layers=2, cross_attn_all_layers=True, cross_attn_k=1,
                             hidden_size_global=32),
         decoder_config=dict(TINY, num_hidden_layers=2, cross_attn_all_layers=False, cross_attn_k=1,
                             hidden_size_global=32, num_key_value_heads=2),
         global_config=dict(TINY)),
    lora_targets=LORA,
)  # fmt: skip
NO_PATCHER = Family(
    "BltConfig",
    dict(use_cache=False, patch_in_forward=False, encoder_hash_byte_group_vocab=30,
         encoder_hash_byte_group_size=[3], encoder_config=dict(TINY, hidden_size_global=64),
         decoder_config=dict(TINY, hidden_size_global=64), global_config=dict(TINY, hidden_size=64)),
    lora_targets=LORA,
)  # fmt: skip
FAMILIES = {"entropy": ENTROPY, "split": SPLIT, "no_patcher": NO_PATCHER}


def test_patches_vary(tmp_path_factory):
    """The checkpoints' thresholds give patches of several lengths (else the patcher would go untested), split
    at max_patch_length in SPLIT."""
    for fam, most in ((ENTROPY, None), (SPLIT, 2)):
        _, hf = fam.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(fam.checkpoint(tmp_path_factory)[0])
        ids, _ = padded_batch()
        lengths = model.model.patch_lengths(ids)
        c = hf.config
        with torch.no_grad():
            _, theirs, _ = hf.model.patcher(ids, patch_size=c.patch_size, threshold=c.patching_threshold,
                                            max_patch_length=c.max_patch_length)  # fmt: skip
        assert torch.equal(lengths, theirs)
        assert len(set(lengths[lengths > 0].tolist())) > 1
        assert most is None or int(lengths.max()) == most


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    """A left-padded batch (BLT's padding reaches the real bytes' logits: the patcher and the global transformer
    see no padding mask) and, without position_ids, transformers' positions."""
    fam = FAMILIES[name]
    fam.check_logits(tmp_path_factory)
    directory, hf = fam.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip


def test_generate(tmp_path_factory):
    ENTROPY.check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", ["split", "no_patcher"])
def test_generate_greedy(tmp_path_factory, name):
    """Greedy tokens of a left-padded batch equal transformers' (its generate is slow: one short run)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5))
    ours = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
    assert torch.equal(ours, hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6))


def test_bf16(tmp_path_factory):
    ENTROPY.check_bf16(tmp_path_factory)


def test_decoding_takes_the_general_forward(tmp_path_factory):
    """No one-token or compiled step: generation feeds the new token to the forward, which runs the whole
    sequence from the cache's bytes; token by token it gives the whole sequence's logits."""
    from test_decode_steps import greedy_steps

    from autolm import step

    directory, _ = ENTROPY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert not step.one_token_model(model) and not step.compilable(model)
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    tokens, logits = greedy_steps(model, ids, 8, "auto")
    with torch.no_grad():
        whole = model(torch.cat([ids, torch.tensor([tokens])], dim=1)).logits[0, 7:]
    torch.testing.assert_close(logits, whole, atol=1e-5, rtol=1e-5)
    cache = model.make_cache(1, 8)
    model(ids, past_key_values=cache)
    assert cache.length == 7 and torch.equal(cache.state(0)[0], ids)


def test_lora(tmp_path_factory, tmp_path):
    ENTROPY.check_lora(tmp_path_factory, tmp_path)


def test_lora_needs_targets(tmp_path_factory):
    check_lora_needs_targets(*NO_PATCHER.checkpoint(tmp_path_factory))


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    """On the checkpoint without a patcher: a quantized model runs in bfloat16, where the tiny patcher's entropies
    (random weights: all near log(260)) cross the threshold elsewhere, and other patches are no quantization
    error (transformers' bfloat16 model patches so too: test_bf16)."""
    NO_PATCHER.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    ENTROPY.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json (sub-configs included) round-trips unchanged."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_training_loss_and_gradients(tmp_path_factory):
    """labels: transformers' loss and gradients (the patcher frozen in both)."""
    directory, hf = SPLIT.checkpoint(tmp_path_factory)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    check_loss_and_gradients(directory, hf, ids)


def test_default_config_and_errors():
    """BltConfig() holds transformers' defaults, its sub-configs' too; bad values raise ConfigError naming the
    field; inputs_embeds is refused (the patcher reads the bytes)."""
    import transformers

    ours, theirs = BltConfig(), transformers.BltConfig()
    for key, value in ours.to_dict().items():
        if key.endswith("_config"):
            sub = getattr(theirs, key)
            for k, v in value.items():
                assert getattr(sub, k) == v, (key, k)
        elif key != "model_type":
            assert getattr(theirs, key) == value, key
    assert set(json.loads(theirs.to_json_string())) >= set(ours.to_dict())
    for change, key in ((dict(cross_attn_k=0), "cross_attn_k"), (dict(patch_size=0), "patch_size"),
                        (dict(encoder_hash_byte_group_size=[0]), "encoder_hash_byte_group_size"),
                        (dict(decoder_config=dict(hidden_size=512)), r"decoder_config.hidden_size"),
                        (dict(global_config=dict(num_attention_heads=3)), r"global_config.num_attention_heads"),
                        (dict(encoder_config=dict(cross_attn_k=3)), r"encoder_config.cross_attn_k"),
                        (dict(encoder_config=dict(hidden_act="gelu")), r"encoder_config.hidden_act"),
                        (dict(patching_threshold="high"), "patching_threshold"),
                        (dict(patch_in_forward=1), "patch_in_forward")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            BltConfig(**change)


def test_inputs_embeds_refused(tmp_path_factory):
    model = autolm.AutoModelForCausalLM.from_pretrained(NO_PATCHER.checkpoint(tmp_path_factory)[0])
    with pytest.raises(GenerationError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 32))


def test_positions_given(tmp_path_factory):
    """Explicit position_ids (shifted) reach the byte layers' RoPE as in transformers."""
    directory, hf = SPLIT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, _ = padded_batch(seed=1)
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1) + 5
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
