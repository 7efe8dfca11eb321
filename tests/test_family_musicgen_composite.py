"""MusicGen's and MusicGen Melody's composite files (model types "musicgen" / "musicgen_melody": transformers'
MusicgenForConditionalGeneration / MusicgenMelodyForConditionalGeneration, a T5 text encoder, an EnCodec audio codec
and the audio-token decoder) load in autolm as their decoder: the `decoder` sub-config read, decoder.* tensors
mapped, text_encoder.* / audio_encoder.* / enc_to_dec_proj.* (Melody: audio_enc_to_dec_proj.*) skipped. The
reference is the composite model's own `.decoder` (a MusicgenForCausalLM / MusicgenMelodyForCausalLM) on the same
ids. generation_config.json as facebook/musicgen-small's (decoder_start_token_id, pad, guidance_scale 3.0, sampling).
Saved, the model is the decoder-only checkpoint transformers' *ForCausalLM loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize

import autolm
from autolm.errors import ConfigError, GenerationError
from autolm.models.musicgen import MusicgenConfig, MusicgenDecoderConfig, MusicgenMelodyConfig

V = 64  # the pad / start token is V
DECODER = dict(vocab_size=V, pad_token_id=V, bos_token_id=V, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, ffn_dim=48, max_position_embeddings=64, dropout=0.0)  # fmt: skip
KINDS = {
    "Musicgen": dict(num_codebooks=3),
    "MusicgenMelody": dict(num_codebooks=2, activation_function="silu"),
}
# facebook/musicgen-small's generation_config.json, the token ids ours
GENERATION = dict(decoder_start_token_id=V, pad_token_id=V, bos_token_id=V, guidance_scale=3.0, do_sample=True,
                  max_length=1500)  # fmt: skip
_CACHE: dict = {}


def composite(tmp_path_factory, kind: str):
    """(directory, transformers' composite model loaded back from it) for a tiny random composite, made once."""
    import transformers

    if kind not in _CACHE:
        t5 = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2)
        codec = transformers.EncodecConfig(hidden_size=8, num_filters=4, codebook_size=V, num_residual_layers=1,
                                           upsampling_ratios=[2, 2], codebook_dim=8, num_lstm_layers=1)  # fmt: skip
        decoder = getattr(transformers, f"{kind}DecoderConfig")(**DECODER, **KINDS[kind])
        config = getattr(transformers, f"{kind}Config")(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(),
                                                        decoder=decoder.to_dict())  # fmt: skip
        torch.manual_seed(0)
        model = getattr(transformers, f"{kind}ForConditionalGeneration")(config)
        randomize(model)
        model.generation_config.update(**GENERATION)
        d = str(tmp_path_factory.mktemp(f"musicgen_composite_{kind}"))
        model.save_pretrained(d)
        ref = type(model).from_pretrained(d, attn_implementation="eager")
        _CACHE[kind] = (d, ref.eval())
    return _CACHE[kind]


def left_padded(K: int, lengths=(8, 5, 2), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, V, (len(lengths) * K, T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
def test_loads_the_decoder_with_its_logits(tmp_path_factory, kind):
    """The composite loads as its decoder: class, config (the decoder's, dtype kept), state dict equal to the
    composite's .decoder's (MusicGen's unused cross-attention included), fp32 logits of a left-padded batch equal
    its logits at every real position."""
    directory, hf = composite(tmp_path_factory, kind)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == f"{kind}ForCausalLM"
    assert model.config.model_type == hf.decoder.config.model_type
    assert model.config.num_codebooks == KINDS[kind]["num_codebooks"] and not model.config.tie_word_embeddings
    theirs = hf.decoder.state_dict()
    ours = model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert ("model.decoder.layers.0.encoder_attn.q_proj.weight" in ours) == (kind == "Musicgen")
    K = KINDS[kind]["num_codebooks"]
    ids, mask = left_padded(K)
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, hf.decoder(ids, attention_mask=mask).logits
    assert got.shape == want.shape == (ids.shape[0], ids.shape[1], V)
    real = mask.bool().repeat_interleave(K, dim=0)
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_reads_the_composites_generation_config(tmp_path_factory, kind):
    """generation_config.json's decoder_start_token_id and pad_token_id are the decoder's: greedy tokens equal the
    composite's .decoder.generate given that start token (its own generation config, built from the decoder's
    config, has none and crashes without it); the file's guidance_scale 3.0 (which needs the text encoder's
    unconditional pass) is refused by name until guidance_scale=1 is passed."""
    directory, hf = composite(tmp_path_factory, kind)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    K = KINDS[kind]["num_codebooks"]
    ids, _ = left_padded(K, lengths=(4, 4), seed=1)
    with pytest.raises(GenerationError, match="guidance_scale"):
        model.generate(ids, max_new_tokens=3, do_sample=False)
    for n in (8, 2):
        ours = model.generate(ids, max_new_tokens=n, do_sample=False, guidance_scale=1.0)
        theirs = hf.decoder.generate(ids, max_new_tokens=n, do_sample=False, num_return_sequences=1,
                                     decoder_start_token_id=V)  # fmt: skip
        assert ours.shape[:2] == (2, K) and torch.equal(ours, theirs), n


@pytest.mark.parametrize("kind", KINDS)
def test_saves_the_decoder_only_checkpoint(tmp_path_factory, tmp_path, kind):
    """save_pretrained writes the decoder alone (its config, model type and architecture; the decoder's tensor
    names; generation_config.json kept): transformers' *ForCausalLM loads it with equal logits, autolm bit-identical."""
    import transformers
    from safetensors import safe_open

    directory, hf = composite(tmp_path_factory, kind)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == hf.decoder.config.model_type
    assert written["architectures"] == [f"{kind}ForCausalLM"]
    assert not {"text_encoder", "audio_encoder", "decoder"} & set(written)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(hf.decoder.state_dict())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == V and generation["pad_token_id"] == V
    theirs = getattr(transformers, f"{kind}ForCausalLM").from_pretrained(
        tmp_path, attn_implementation="eager"
    )
    ids, _ = left_padded(KINDS[kind]["num_codebooks"], lengths=(5, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_composite_config():
    """MusicgenConfig / MusicgenMelodyConfig read the composite config.json as its decoder's config (transformers'
    decoder settings, keys and defaults; the outer dtype where the decoder leaves it out); no `decoder` object
    raises ConfigError naming it."""
    import transformers

    for ours, theirs in ((MusicgenConfig, transformers.MusicgenConfig),
                         (MusicgenMelodyConfig, transformers.MusicgenMelodyConfig)):  # fmt: skip
        outer = json.loads(theirs(decoder=dict(DECODER, num_codebooks=2)).to_json_string())
        outer["dtype"] = "bfloat16"
        outer["decoder"].pop("dtype", None)
        config = ours.from_dict(outer)
        assert isinstance(config, ours.text_class) and config.dtype in ("bfloat16", torch.bfloat16)
        decoder = {k: v for k, v in outer["decoder"].items() if k != "transformers_version"}
        assert {k: v for k, v in config.to_dict().items() if k in decoder and k != "dtype"} == {
            k: v for k, v in decoder.items() if k != "dtype"
        }
        default = json.loads(theirs().to_json_string())["decoder"]
        mine = ours().to_dict()
        assert {k: mine[k] for k in mine if k in default and k != "dtype"} == {
            k: default[k] for k in mine if k in default and k != "dtype"
        }
        with pytest.raises(ConfigError, match="decoder"):
            ours.from_dict({"model_type": ours.model_type, "text_encoder": {}})
    assert type(MusicgenConfig(decoder=dict(hidden_size=32, num_attention_heads=4))) is MusicgenDecoderConfig


def test_lora_made_on_the_composite(tmp_path_factory, tmp_path):
    """An adapter peft made on transformers' composite model (the decoder's q_proj / v_proj, named under
    decoder.model.decoder.*) gives its decoder's logits in autolm; autolm saves it under the decoder's own names,
    which peft loads onto a MusicgenForCausalLM with the same logits."""
    import peft
    import transformers

    directory, _ = composite(tmp_path_factory, "Musicgen")
    hf = transformers.MusicgenForConditionalGeneration.from_pretrained(directory, attn_implementation="eager")
    target = r".*decoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
    pm = peft.get_peft_model(hf.eval(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=target))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    pm.save_pretrained(tmp_path / "peft")
    ids, _ = left_padded(3, lengths=(6, 6))
    base = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        expected, plain = hf.decoder(ids).logits, base(ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)
    ours = autolm.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-4, rtol=1e-4)
        ours.save_pretrained(tmp_path / "ours")
    autolm.AutoModelForCausalLM.from_pretrained(directory).save_pretrained(tmp_path / "decoder")
    decoder = transformers.MusicgenForCausalLM.from_pretrained(
        tmp_path / "decoder", attn_implementation="eager"
    )
    back = peft.PeftModel.from_pretrained(decoder.eval(), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
