"""Whisper's decoder (transformers' WhisperForCausalLM, the assistant model of Whisper's speculative decoding)
against transformers and peft: pre-norm layers and a final layer_norm, learned positions without offset
(max_target_positions), k_proj without bias, the head `proj_out` tied to embed_tokens (or not), scale_embedding
unread, the cross-attention's weights loaded and saved but never run (encoder_outputs refused by name); a
WhisperForConditionalGeneration file loading as the decoder LM; positions counting the cache's slots as
transformers' generate counts them (transformers' forward reads position_ids where a caller passes them: pinned);
the unshifted loss; config defaults. llama.cpp has no Whisper: no GGUF. peft has no default targets for whisper."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import AdapterError, ConfigError, GenerationError

SMALL = dict(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=48, encoder_layers=2,
             encoder_attention_heads=4, encoder_ffn_dim=48, max_target_positions=64, decoder_start_token_id=1,
             num_mel_bins=8, max_source_positions=16)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FAMILIES = {
    "whisper": Family("WhisperConfig", SMALL, lora_targets=TARGETS),
    # an untied proj_out, ReLU, scale_embedding set (transformers' decoder does not read it)
    "untied": Family(
        "WhisperConfig",
        dict(SMALL, tie_word_embeddings=False, activation_function="relu", scale_embedding=True),
        lora_targets=TARGETS,
    ),
}


def _reference(tmp_path_factory, name):
    """(directory, transformers' model) with its decoder called as transformers' generate calls it: without
    position_ids (the battery's checks pass the padding mask's positions, which its forward would read)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    decoder = hf.model.decoder
    if "forward" not in decoder.__dict__:
        forward = decoder.forward

        def slots_forward(*args, position_ids=None, **kwargs):
            return forward(*args, **kwargs)

        decoder.forward = slots_forward
    return directory, hf


def _load(directory):
    return autolm.AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    """A left-padded batch: logits equal transformers' at every real position (positions are cache slots,
    padding included, as transformers counts them without position_ids)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = _load(directory)
    assert type(model).__name__ == "WhisperForCausalLM"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], theirs, atol=1e-4, rtol=1e-4)
        # position_ids are not read (transformers' generate never passes them)
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_transformers_forward_reads_explicit_position_ids(tmp_path_factory):
    """Pinned difference: transformers' forward reads position_ids a caller passes (the padded rows change);
    autolm counts slots, as transformers' forward without them and its generate."""
    directory, _ = FAMILIES["whisper"].checkpoint(tmp_path_factory)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    model = _load(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    slots = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours[real], hf(ids, attention_mask=mask, position_ids=slots).logits[real])
        moved = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert torch.allclose(moved[0], ours[0], atol=1e-4)  # the unpadded row: the same positions
    assert not torch.allclose(moved[1][real[1]], ours[1][real[1]], atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    """Greedy (a left-padded batch, and one row through the one-token step) and beam search: transformers'."""
    FAMILIES[name].check_generate(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    FAMILIES["whisper"].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    FAMILIES["untied"].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    """peft's adapter (every projection, k_proj's missing bias included) gives peft's logits, and back."""
    _reference(tmp_path_factory, name)
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_lora_has_no_default_targets(tmp_path_factory):
    """peft has no default target modules for whisper: a LoraConfig naming none is refused, as peft does."""
    directory, _ = FAMILIES["whisper"].checkpoint(tmp_path_factory)
    with pytest.raises(AdapterError, match="whisper"):
        autolm.get_peft_model(_load(directory), autolm.LoraConfig(r=4))


def test_quantized(tmp_path_factory):
    FAMILIES["whisper"].check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """autolm's save loads in transformers with equal logits and back in autolm bit-identical; the file holds
    transformers' tensor names (k_proj without bias, encoder_attn, proj_out where untied); the state dict is
    transformers' with proj_out as lm_head; config.json round-trips."""
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
        assert set(ours.keys()) == set(original.keys())
        assert ("proj_out.weight" in set(ours.keys())) == (name == "untied")
        assert "model.decoder.layers.0.self_attn.k_proj.bias" not in set(ours.keys())
    want = {k.replace("proj_out.", "lm_head."): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    written, read = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
    for d in (written, read):
        d.pop("transformers_version", None)
    assert written == read


def test_seq2seq_checkpoint(tmp_path):
    """A WhisperForConditionalGeneration file loads as the decoder LM (its encoder skipped, the head tied):
    logits equal transformers' WhisperForCausalLM with the same decoder weights."""
    import transformers

    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL
    )
    torch.manual_seed(0)
    full = transformers.WhisperForConditionalGeneration(cfg).eval()
    full.save_pretrained(tmp_path / "s2s")
    model = _load(tmp_path / "s2s")
    causal = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s2s").eval()
    assert type(causal).__name__ == "WhisperForCausalLM"
    torch.testing.assert_close(
        causal.model.decoder.layers[0].fc1.weight, full.model.decoder.layers[0].fc1.weight
    )
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = causal(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)


def test_loss_is_unshifted_and_encoder_inputs_are_refused(tmp_path_factory):
    directory, hf = FAMILIES["whisper"].checkpoint(tmp_path_factory)
    model = _load(directory)
    ids, _ = padded_batch()
    labels = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, labels=labels).loss, hf(ids, labels=labels).loss, atol=1e-5, rtol=1e-5
        )
        for key in ("encoder_outputs", "encoder_hidden_states"):
            with pytest.raises(GenerationError, match=key):
                model(ids, **{key: torch.zeros(3, 4, 32)})


def test_positions_past_max_target_positions_are_refused(tmp_path_factory):
    directory, _ = FAMILIES["whisper"].checkpoint(tmp_path_factory)
    with pytest.raises(GenerationError, match="max_target_positions"):
        _load(directory)(torch.ones(1, 65, dtype=torch.long))


def test_default_config_is_transformers():
    """Every field autolm writes holds transformers' default; config.json's names as arguments and attributes;
    num_hidden_layers and num_attention_heads are the decoder's (transformers' read the encoder's)."""
    import transformers

    cls = autolm.WhisperConfig
    check_config_defaults(cls)
    theirs = json.loads(transformers.WhisperConfig().to_json_string())
    assert set(cls().to_dict()) - {"model_type"} <= set(theirs)
    ours = cls(d_model=64, decoder_attention_heads=4, decoder_ffn_dim=96, decoder_layers=2, encoder_layers=6,
               max_target_positions=100)  # fmt: skip
    assert (ours.hidden_size, ours.num_attention_heads, ours.intermediate_size, ours.num_hidden_layers) == (
        64, 4, 96, 2)  # fmt: skip
    assert ours.max_position_embeddings == ours.max_target_positions == 100
    assert ours.to_dict()["max_target_positions"] == 100 and "max_position_embeddings" not in ours.to_dict()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(dropout=2.0), "dropout"),
        (dict(d_model=66), "d_model"),  # not divisible by 4 heads
        (dict(max_target_positions=0), "max_target_positions"),
        (dict(activation_function="swiglu"), "activation_function"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(
        model_type="whisper", d_model=64, decoder_attention_heads=4, decoder_layers=2, vocab_size=VOCAB
    )
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers declares no tensor-parallel plan for Whisper: tp_plan='auto' is a ConfigError."""
    directory, _ = FAMILIES["whisper"].checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="'whisper' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
