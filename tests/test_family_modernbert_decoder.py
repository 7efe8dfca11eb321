"""ModernBERT's decoder (modernbert-decoder, the Ettin decoders) against transformers and peft: the embeddings'
LayerNorm, the first layer without an attention norm, q/k/v and `Wo`, the gated `Wi` MLP, global and sliding
layers (a window shorter than the prompts) with their own RoPE bases, the final norm, the prediction head and the
vocabulary projection `decoder` with its bias, tied to the embeddings. A second checkpoint with every bias (norms,
attention, MLP, the head's dense), another activation in the head, an untied `decoder` without bias, global every
second layer. The standard battery, transformers' names in state_dict() and load_state_dict(), config.json's older
RoPE keys (global_rope_theta, local_rope_theta), config defaults and errors naming the field. llama.cpp has no
ModernBERT decoder (its modern-bert is the encoder): no GGUF."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from family_checks import Family, check_config_defaults, same_logits
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import AdapterError, ConfigError
from autolm.lora.config import default_targets
from autolm.models.modernbert_decoder import ModernBertDecoderConfig

SIZES = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, max_position_embeddings=64,
             cls_token_id=1, sep_token_id=2)  # fmt: skip
# Ettin's shape: global every third layer from the first, no biases but the decoder's, a tied decoder
ETTIN = Family(
    "ModernBertDecoderConfig",
    dict(SIZES, num_hidden_layers=4, local_attention=8, global_rope_theta=1000.0, local_rope_theta=100.0),
    lora_targets=["q_proj", "v_proj", "Wi", "Wo"],  # peft has no default for modernbert-decoder
)
BIASED = Family(
    "ModernBertDecoderConfig",
    dict(SIZES, num_hidden_layers=3, local_attention=6, global_attn_every_n_layers=2, norm_bias=True,
         attention_bias=True, mlp_bias=True, classifier_bias=True, decoder_bias=False, tie_word_embeddings=False,
         classifier_activation="silu", hidden_activation="gelu_pytorch_tanh", norm_eps=1e-6),
)  # fmt: skip
FAMILIES = {"ettin": ETTIN, "biased": BIASED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    ETTIN.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    ETTIN.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    ETTIN.check_compiled_step(tmp_path_factory, home)


def test_hidden_states(tmp_path_factory):
    """Each layer's input (the first: the normed embeddings), then the final norm's output, as transformers'."""
    ETTIN.check_hidden_states(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    ETTIN.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    ETTIN.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    BIASED.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json round-trips with transformers' keys only; the first
    layer has no attention norm; the decoder is the embeddings exactly where tied; transformers' state dict loads
    into autolm's model (its names) with transformers' logits."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert isinstance(model.model.layers[0].attn_norm, torch.nn.Identity)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "ettin")
    assert (model.lm_head.bias is not None) == (name == "ettin")
    fresh = autolm.AutoModelForCausalLM.from_config(model.config)
    fresh.load_state_dict(hf.state_dict())
    fresh.tie_weights()
    same_logits(fresh.eval(), hf)


def test_window_and_rope_bases_matter(tmp_path_factory):
    """The local layers' window (4 tokens, under the prompts' 13) and the two RoPE bases change the logits."""
    from conftest import padded_batch

    directory, _ = ETTIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    kinds = [layer.attn.rope for layer in model.model.layers]
    assert kinds == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert [layer.attn.sliding_window for layer in model.model.layers] == [None, 4, 4, None]
    ids, mask = padded_batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.attn.sliding_window = None
        assert not torch.allclose(base, model(ids, attention_mask=mask).logits, atol=1e-3)
        for layer in model.model.layers:
            layer.attn.rope = "full_attention"
        model.config.layer_types = ["full_attention"] * 4
        assert not torch.allclose(base, model(ids, attention_mask=mask).logits, atol=1e-3)


def test_older_rope_keys(tmp_path_factory, tmp_path):
    """config.json as older Ettin files give it: global_rope_theta, local_rope_theta, global_attn_every_n_layers,
    no rope_parameters or layer_types: transformers' logits; saved as rope_parameters, which transformers loads."""
    import transformers

    directory, _ = BIASED.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    del d["layer_types"], d["sliding_window"]
    d.update(global_rope_theta=rope["full_attention"]["rope_theta"], local_rope_theta=250.0)
    path.write_text(json.dumps(d))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "old", attn_implementation="eager")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    assert model.config.rope_parameters["sliding_attention"]["rope_theta"] == 250.0
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    same_logits(model, theirs.eval())
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (
        "local_rope_theta" not in saved
        and saved["rope_parameters"]["sliding_attention"]["rope_theta"] == 250.0
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    same_logits(model, back.eval())


def test_default_config_and_errors():
    """ModernBertDecoderConfig() holds transformers' defaults (global every third layer, window 64); bad values
    raise ConfigError naming the key; a LoraConfig without targets is refused for the type, as peft does."""
    check_config_defaults(ModernBertDecoderConfig)
    c = ModernBertDecoderConfig()
    assert c.sliding_window == 64 and c.layer_types[:4] == ["full_attention", *["sliding_attention"] * 2,
                                                             "full_attention"]  # fmt: skip
    small = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
    for change, key in ((dict(local_attention=1), "local_attention"), (dict(norm_bias="no"), "norm_bias"),
                        (dict(decoder_bias=1), "decoder_bias"), (dict(classifier_activation="tanh"),
                        "classifier_activation"), (dict(global_attn_every_n_layers=0), "global_attn_every_n_layers"),
                        (dict(local_attention=None), "local_attention"), (dict(hidden_size=30), "hidden_size")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            ModernBertDecoderConfig(**{**small, **change})
    with pytest.raises(AdapterError, match="modernbert-decoder"):  # peft has no default targets for the type
        default_targets("modernbert-decoder")


@pytest.mark.parametrize("name", FAMILIES)
def test_resize_keeps_the_decoder_bias(tmp_path_factory, name):
    """Resizing the vocabulary resizes the decoder's bias with it (new rows zero, as transformers): the old tokens'
    logits stay."""
    from conftest import VOCAB, padded_batch

    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        model.resize_token_embeddings(VOCAB + 8)
        after = model(ids, attention_mask=mask).logits
    assert after.shape[-1] == VOCAB + 8 and model.lm_head.weight.shape[0] == VOCAB + 8
    assert (model.lm_head.bias is not None) == (name == "ettin")
    if name == "ettin":
        assert model.lm_head.bias.shape == (VOCAB + 8,) and not model.lm_head.bias[VOCAB:].any()
    torch.testing.assert_close(after[..., :VOCAB], before)
