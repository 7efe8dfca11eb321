"""VaultGemma against transformers and peft: Gemma 2's layer with only the norms before attention and before the MLP,
on a checkpoint with every quirk switched on (attention and final soft-capping, query_pre_attn_scalar != head_dim,
windows shorter than the prompts, the default alternating layer types, GQA, a tied head) and a variant with its own
layer_types, no soft-capping, MHA, an untied head and another RoPE base. The standard battery, transformers'
names and config keys, user-given inputs_embeds, the CLI (VaultGemma 1B is a pretrained model). llama.cpp has no
VaultGemma architecture: GGUF out is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import padded_batch, positions, write_char_tokenizer
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.vaultgemma import VaultGemmaConfig

_SIZES = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=24, max_position_embeddings=64,
              sliding_window=4)  # fmt: skip
VAULT = Family(
    "VaultGemmaConfig",
    dict(_SIZES, num_hidden_layers=3, num_key_value_heads=2, query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
         final_logit_softcapping=10.0),
    lora_targets=["q_proj", "v_proj", "down_proj"],  # peft has no default for vaultgemma
)  # fmt: skip
LAYERS = Family(
    "VaultGemmaConfig",
    dict(_SIZES, num_hidden_layers=3, num_key_value_heads=4, query_pre_attn_scalar=24,
         layer_types=["full_attention", "sliding_attention", "sliding_attention"], attn_logit_softcapping=None,
         final_logit_softcapping=None, tie_word_embeddings=False,
         rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
)  # fmt: skip
FAMILIES = {"vaultgemma": VAULT, "layer_types": LAYERS}
families = pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))


@families
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


@families
def test_generate(family, tmp_path_factory):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    VAULT.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    VAULT.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    VAULT.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    VAULT.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft
    import transformers

    from autolm.errors import AdapterError

    directory, _ = VAULT.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), peft.LoraConfig())
    with pytest.raises(AdapterError, match="vaultgemma"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    VAULT.check_quantized(tmp_path_factory, bits)


@families
def test_save(family, tmp_path_factory, tmp_path):
    """transformers loads what autolm saves; the checkpoint's tensor names and config.json's keys and values."""
    model, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    assert not any("post_attention_layernorm" in n or "post_feedforward_layernorm" in n for n in saved)
    assert "model.layers.0.pre_feedforward_layernorm.weight" in saved
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (family is VAULT)


def test_disk_offload(tmp_path_factory, tmp_path):
    VAULT.check_disk_offload(tmp_path_factory, tmp_path)


@families
def test_names_config_and_tp_plan_are_transformers(family, tmp_path_factory, tmp_path):
    """transformers' parameter names and shapes, config.json written back as read (no use_bidirectional_attention,
    which VaultGemmaConfig lacks), transformers' tensor-parallel plan."""
    model, hf = family.check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert model.config.layer_types == hf.config.layer_types


def test_inputs_embeds_are_taken_as_given(tmp_path_factory):
    """transformers scales token embeddings inside its embedding module: embeddings a user passes are not scaled
    again (and ids give the same logits as their scaled embeddings)."""
    directory, hf = VAULT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    embeds = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(1))
    real = mask.bool()
    with torch.no_grad():
        ours = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)).logits
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
        scaled = model.model.embed_tokens(ids) * 64**0.5
        torch.testing.assert_close(model(inputs_embeds=scaled, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits)  # fmt: skip


def test_bidirectional_key_is_kept_not_acted_on(tmp_path_factory, tmp_path):
    """A config.json with use_bidirectional_attention true: transformers' VaultGemma is causal whatever it says, and
    so is autolm's (Gemma 2's config refuses it); the key is written back as read."""
    import shutil

    import transformers

    directory = tmp_path / "bidirectional"
    shutil.copytree(VAULT.checkpoint(tmp_path_factory)[0], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "use_bidirectional_attention": True}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert model.config.to_dict()["use_bidirectional_attention"] is True


def test_gguf_out_is_refused(tmp_path_factory, tmp_path):
    """llama.cpp has no VaultGemma architecture: save_gguf is a ConfigError naming the model type, and writes
    nothing."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(VAULT.checkpoint(tmp_path_factory)[0])
    (tmp_path / "tok").mkdir()
    write_char_tokenizer(str(tmp_path / "tok"))
    tok = autolm.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    with pytest.raises(ConfigError, match="'vaultgemma' has no llama.cpp architecture"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert not (tmp_path / "out.gguf").exists()


def test_cli(tmp_path_factory, tmp_path):
    check_cli_without_template(VAULT, tmp_path_factory, tmp_path, "VaultGemmaForCausalLM (vaultgemma)")


def test_config_defaults_and_errors():
    """VaultGemmaConfig() holds transformers' defaults (Gemma 2's: alternating layers, soft-caps 50 / 30,
    query_pre_attn_scalar 256); hidden_activation is the activation; bad values raise ConfigError naming the key."""
    check_config_defaults(VaultGemmaConfig)
    ours = VaultGemmaConfig(num_hidden_layers=4, hidden_activation="gelu")
    assert ours.layer_types == ["sliding_attention", "full_attention"] * 2 and ours.hidden_act == "gelu"
    assert "use_bidirectional_attention" not in VaultGemmaConfig().to_dict()
    for kwargs, key in (
        (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
        (dict(attn_logit_softcapping=-1.0), "attn_logit_softcapping"),
        (dict(final_logit_softcapping="30"), "final_logit_softcapping"),
        (dict(hidden_activation="swish2"), "hidden_act"),
    ):
        with pytest.raises(ConfigError, match=key):
            VaultGemmaConfig(**kwargs)
