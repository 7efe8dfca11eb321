"""BigBird-Pegasus' decoder (transformers' BigBirdPegasusForCausalLM) against transformers and peft: full attention,
pre-norm layers whose final norm is `layernorm_embedding` (none on the embeddings), learned positions without
offset at the cache's slots, embeddings times sqrt(d_model) (scale_embedding, on by default), the attentions'
projections biased only where use_bias (fc1/fc2 always), gelu_new; the head never tied (transformers ties none,
whatever tie_word_embeddings says); the cross-attention's weights loaded and saved but never run
(encoder_hidden_states refused by name); a seq2seq file (no lm_head.weight) refused by name where transformers
initialises its head and embeddings at random; the unshifted loss; config defaults. llama.cpp has no BigBird-Pegasus:
no GGUF. peft has no default targets for bigbird_pegasus."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import AdapterError, CheckpointError, ConfigError, GenerationError

SMALL = dict(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=48, encoder_layers=2,
             encoder_attention_heads=4, encoder_ffn_dim=48, max_position_embeddings=64)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FAMILIES = {
    # defaults: no attention biases, scale_embedding, gelu_new, tie_word_embeddings true (and yet untied)
    "bigbird_pegasus": Family("BigBirdPegasusConfig", SMALL, lora_targets=TARGETS),
    # biased attentions, unscaled embeddings, ReLU, tie_word_embeddings false
    "biased": Family(
        "BigBirdPegasusConfig",
        dict(
            SMALL, use_bias=True, scale_embedding=False, activation_function="relu", tie_word_embeddings=False
        ),
        lora_targets=TARGETS,
    ),
}


def _load(directory):
    return autolm.AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    """A left-padded batch: logits equal transformers' at every real position (positions are cache slots, padding
    included, as transformers counts them; position_ids are not read by either)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = _load(directory)
    assert type(model).__name__ == "BigBirdPegasusForCausalLM"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], theirs, atol=1e-4, rtol=1e-4)
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    """Greedy (a left-padded batch, and one row through the one-token step) and beam search: transformers'."""
    FAMILIES[name].check_generate(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    FAMILIES["biased"].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    FAMILIES["bigbird_pegasus"].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    """peft's adapter on every projection (the missing attention biases included) gives peft's logits, and back."""
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_lora_has_no_default_targets(tmp_path_factory):
    """peft has no default target modules for bigbird_pegasus: a LoraConfig naming none is refused, as peft does."""
    directory, _ = FAMILIES["bigbird_pegasus"].checkpoint(tmp_path_factory)
    with pytest.raises(AdapterError, match="bigbird_pegasus"):
        autolm.get_peft_model(_load(directory), autolm.LoraConfig(r=4))


def test_quantized(tmp_path_factory):
    FAMILIES["bigbird_pegasus"].check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """autolm's save loads in transformers with equal logits and back in autolm bit-identical; the file holds
    transformers' tensor names (lm_head.weight always, no attention biases unless use_bias, encoder_attn,
    layernorm_embedding as the final norm); the state dict is transformers'; config.json round-trips."""
    import transformers
    from safetensors import safe_open

    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = _load(directory)
    model.save_pretrained(tmp_path / "saved")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        a, b = (m(ids, attention_mask=mask).logits[real] for m in (model, theirs))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    back, sd = _load(tmp_path / "saved"), model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as original,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        keys = set(ours.keys())
        assert keys == set(original.keys()) and "lm_head.weight" in keys
        assert ("model.decoder.layers.0.self_attn.q_proj.bias" in keys) == (name == "biased")
        assert "model.decoder.layernorm_embedding.weight" in keys
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in hf.state_dict().items()
    }
    written, read = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
    for d in (written, read):
        d.pop("transformers_version", None)
    assert written == read


def test_head_is_never_tied(tmp_path_factory):
    """tie_word_embeddings true (the default) ties nothing, as in transformers: the head is its own tensor, the
    attribute reads False and config.json keeps true."""
    directory, hf = FAMILIES["bigbird_pegasus"].checkpoint(tmp_path_factory)
    assert hf.lm_head.weight is not hf.model.decoder.embed_tokens.weight
    model = _load(directory)
    assert model.lm_head.weight is not model.model.decoder.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.decoder.embed_tokens.weight)
    torch.testing.assert_close(model.lm_head.weight, hf.lm_head.weight)
    assert model.config.tie_word_embeddings is False and model.config.to_dict()["tie_word_embeddings"] is True


def test_seq2seq_checkpoint_is_refused(tmp_path):
    """A BigBirdPegasusForConditionalGeneration file has no lm_head.weight (its head is model.shared): transformers'
    ForCausalLM loads it with a random head and random embeddings (pinned); autolm refuses it naming the tensor."""
    import transformers

    cfg = transformers.BigBirdPegasusConfig(vocab_size=VOCAB, attention_type="original_full", **SMALL)
    torch.manual_seed(0)
    transformers.BigBirdPegasusForConditionalGeneration(cfg).save_pretrained(tmp_path / "s2s")
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s2s", output_loading_info=True)
    assert {"lm_head.weight", "model.decoder.embed_tokens.weight"} <= set(info["missing_keys"])
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        _load(tmp_path / "s2s")


def test_loss_is_unshifted_and_encoder_inputs_are_refused(tmp_path_factory):
    directory, hf = FAMILIES["bigbird_pegasus"].checkpoint(tmp_path_factory)
    model = _load(directory)
    ids, _ = padded_batch()
    labels = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, labels=labels).loss, hf(ids, labels=labels).loss, atol=1e-5, rtol=1e-5
        )
        with pytest.raises(GenerationError, match="encoder_hidden_states"):
            model(ids, encoder_hidden_states=torch.zeros(3, 4, 32))


def test_positions_past_max_position_embeddings_are_refused(tmp_path_factory):
    directory, _ = FAMILIES["bigbird_pegasus"].checkpoint(tmp_path_factory)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        _load(directory)(torch.ones(1, 65, dtype=torch.long))


def test_default_config_is_transformers():
    """Every field autolm writes holds transformers' default; config.json's names as arguments and attributes;
    num_hidden_layers and num_attention_heads are the decoder's (transformers' read the encoder's)."""
    import transformers

    cls = autolm.BigBirdPegasusConfig
    check_config_defaults(cls)
    theirs = json.loads(transformers.BigBirdPegasusConfig().to_json_string())
    assert set(cls().to_dict()) - {"model_type"} <= set(theirs)
    ours = cls(d_model=64, decoder_attention_heads=4, decoder_ffn_dim=96, decoder_layers=2, encoder_layers=6)
    assert (ours.hidden_size, ours.num_attention_heads, ours.intermediate_size, ours.num_hidden_layers) == (
        64, 4, 96, 2)  # fmt: skip


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(dropout=2.0), "dropout"),
        (dict(d_model=66), "d_model"),  # not divisible by 4 heads
        (dict(activation_function="swiglu"), "activation_function"),
        (dict(attention_type="sparse"), "attention_type"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(
        model_type="bigbird_pegasus",
        d_model=64,
        decoder_attention_heads=4,
        decoder_layers=2,
        vocab_size=VOCAB,
    )
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers declares no tensor-parallel plan for BigBird-Pegasus: tp_plan='auto' is a ConfigError."""
    directory, _ = FAMILIES["bigbird_pegasus"].checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="'bigbird_pegasus' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
