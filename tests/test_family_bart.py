"""The BART-style decoders (transformers' BartForCausalLM, MBart..., Marian..., Pegasus..., Blenderbot...,
BlenderbotSmall..., PLBart..., Mvp..., TrOCR...) against transformers and peft: post-norm (BART) and pre-norm with a
final layer_norm (mBART, Pegasus, Blenderbot), learned positions with and without the offset of 2, Marian's and
Pegasus' sinusoidal table, TrOCR's fairseq sinusoids over the non-pad ids, layernorm_embedding after or before the
positions, scaled embeddings, an untied head (TrOCR's `output_projection`), the cross-attention's weights loaded and
saved but never run; the battery for bart, mbart, pegasus, marian and trocr, logits for the rest; seq2seq files
loading as transformers' *ForCausalLM; positions counting the cache's slots with left padding, as transformers;
the unshifted loss; config defaults and refused configs (llama.cpp has no BART decoder LM: no GGUF)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, GenerationError

SMALL = dict(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=48, encoder_layers=2,
             encoder_attention_heads=4, encoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0)  # fmt: skip
DEC = {k: v for k, v in SMALL.items() if not k.startswith("encoder")}
TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]  # peft has defaults for bart only
FAMILIES = {
    "bart": Family("BartConfig", SMALL),  # peft's default targets (q_proj, v_proj)
    # pre-norm, a final layer_norm, scaled embeddings, untied head, ReLU
    "mbart": Family(
        "MBartConfig",
        dict(SMALL, scale_embedding=True, tie_word_embeddings=False, activation_function="relu"),
        lora_targets=TARGETS,
    ),
    "pegasus": Family("PegasusConfig", dict(SMALL, scale_embedding=True), lora_targets=TARGETS),
    "marian": Family("MarianConfig", dict(SMALL, decoder_start_token_id=0), lora_targets=TARGETS),
    # learned positions, layernorm_embedding, its head output_projection, untied
    "trocr": Family("TrOCRConfig", dict(DEC, tie_word_embeddings=False), lora_targets=TARGETS),
}
LOGITS_ONLY = {
    "blenderbot": Family("BlenderbotConfig", SMALL),
    "blenderbot-small": Family("BlenderbotSmallConfig", dict(SMALL, scale_embedding=True)),
    "plbart": Family("PLBartConfig", SMALL),
    "mvp": Family("MvpConfig", SMALL),
    # fairseq's sinusoids over the non-pad ids, no layernorm_embedding, cross-attention of another width
    "trocr_sinusoidal": Family(
        "TrOCRConfig",
        dict(
            DEC,
            use_learned_position_embeddings=False,
            layernorm_embedding=False,
            cross_attention_hidden_size=24,
        ),
    ),
}
ALL = {**FAMILIES, **LOGITS_ONLY}


def _slot_positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).expand(ids.shape[0], -1)


def _reference(tmp_path_factory, name):
    """The checkpoint of ALL[name]; transformers' TrOCR sinusoids made on the meta device while it loads are
    dropped, so that its forward computes them (else it cannot run)."""
    directory, hf = ALL[name].checkpoint(tmp_path_factory)
    if name == "trocr_sinusoidal":
        positions = hf.model.decoder.embed_positions
        positions.weights = positions.get_embedding(
            64 + 1, 32, 0
        )  # max_position_embeddings + pad_token_id + 1
    return directory, hf


@pytest.mark.parametrize("name", ALL)
def test_logits(tmp_path_factory, name):
    """A left-padded batch: logits equal transformers' at every real position (positions as transformers counts
    them: cache slots, padding included; position_ids are not read by either)."""
    _reference(tmp_path_factory, name)
    ALL[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_generate_trocr_sinusoidal(tmp_path_factory):
    """TrOCR's id-counted sinusoids: every token takes the general forward, tokens as transformers'."""
    _reference(tmp_path_factory, "trocr_sinusoidal")
    LOGITS_ONLY["trocr_sinusoidal"].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", ["bart", "pegasus"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    FAMILIES["mbart"].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", ["bart", "marian", "trocr"])
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_quantized(tmp_path_factory):
    FAMILIES["mbart"].check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """autolm's save loads in transformers with equal logits; the file holds transformers' tensor names
    (encoder_attn included, TrOCR's output_projection); config.json round-trips."""
    if name != "trocr":
        FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
        return
    from safetensors import safe_open

    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        assert "output_projection.weight" in set(ours.keys())
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    want = {k.replace("output_projection.", "lm_head."): v.shape for k, v in hf.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == want


@pytest.mark.parametrize(
    "config_cls,model_cls,kwargs",
    [
        ("BartConfig", "BartForConditionalGeneration", {}),
        ("MarianConfig", "MarianMTModel", dict(decoder_start_token_id=0)),  # no position table in its file
        ("PegasusConfig", "PegasusForConditionalGeneration", {}),
    ],
)
def test_seq2seq_checkpoint(tmp_path, config_cls, model_cls, kwargs):
    """A full seq2seq file loads as the decoder LM: model.shared as the embeddings (and the tied head), the
    encoder and final_logits_bias skipped, Marian's table computed; logits equal transformers' *ForCausalLM's
    with the seq2seq model's decoder weights."""
    import transformers

    cfg = getattr(transformers, config_cls)(
        vocab_size=VOCAB, pad_token_id=0, eos_token_id=2, **SMALL, **kwargs
    )
    torch.manual_seed(0)
    full = getattr(transformers, model_cls)(cfg).eval()
    full.save_pretrained(tmp_path / "s2s")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "s2s")
    causal = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    causal.model.decoder.load_state_dict(full.model.decoder.state_dict())
    causal.tie_weights()
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = causal(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)


def test_positions_count_slots_and_loss_is_unshifted(tmp_path_factory):
    """position_ids are not read (transformers' decoders count cache slots); the loss compares each position's
    logits with its label as given; encoder_hidden_states refused by name."""
    directory, hf = FAMILIES["bart"].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        b = model(ids, attention_mask=mask, position_ids=_slot_positions(ids)).logits
        torch.testing.assert_close(a, b)
        labels = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(3))
        ours, theirs = model(ids, labels=labels).loss, hf(ids, labels=labels).loss
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        with pytest.raises(GenerationError, match="encoder_hidden_states"):
            model(ids, encoder_hidden_states=torch.zeros(2, 3, 32))


@pytest.mark.parametrize("name", ["bart", "marian"])
def test_positions_past_the_table_are_refused(tmp_path_factory, name):
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        model(torch.ones(1, 65, dtype=torch.long))


CLASSES = ["BartConfig", "MBartConfig", "MarianConfig", "PegasusConfig", "BlenderbotConfig",
           "BlenderbotSmallConfig", "PLBartConfig", "MvpConfig", "TrOCRConfig"]  # fmt: skip


@pytest.mark.parametrize("name", CLASSES)
def test_default_config_is_transformers(name):
    """Every field autolm writes holds transformers' default; config.json's names as arguments and attributes."""
    import transformers

    cls = getattr(autolm.models, name)
    check_config_defaults(cls)
    ours = cls(d_model=64, decoder_attention_heads=4, decoder_ffn_dim=96, decoder_layers=2)
    assert (ours.hidden_size, ours.num_attention_heads, ours.intermediate_size, ours.num_hidden_layers) == (
        64, 4, 96, 2)  # fmt: skip
    theirs = json.loads(getattr(transformers, name)().to_json_string())
    assert set(cls().to_dict()) - {"model_type"} <= set(theirs)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(dropout=2.0), "dropout"),
        (dict(decoder_layerdrop=-1), "decoder_layerdrop"),
        (dict(scale_embedding="yes"), "scale_embedding"),
        (dict(activation_function="swiglu"), "activation_function"),
        (dict(d_model=66), "d_model"),  # not divisible by 4 heads
        (dict(model_type="marian", decoder_vocab_size=7), "decoder_vocab_size"),
        (dict(model_type="trocr", cross_attention_hidden_size=0), "cross_attention_hidden_size"),
        (dict(model_type="trocr", use_learned_position_embeddings=False, pad_token_id=None), "pad_token_id"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="bart", d_model=64, decoder_attention_heads=4, decoder_layers=2, vocab_size=VOCAB)
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers declares no tensor-parallel plan for these decoders: tp_plan='auto' is a ConfigError."""
    directory, _ = FAMILIES["bart"].checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="'bart' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
