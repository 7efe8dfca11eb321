"""MusicGen's audio-token decoder (transformers' MusicgenForCausalLM over MusicgenDecoderConfig, model_type
"musicgen_decoder") against transformers: (batch * num_codebooks, seq_len) ids, per-codebook embeddings summed,
sinusoidal positions over the cache's slots, pre-LN layers without biases, one head per codebook, logits in
transformers' (batch * num_codebooks, seq_len, vocab) layout over a left-padded batch; mono (GELU) and stereo (ReLU,
a narrower cross-attention input) checkpoints; the codebook loss; greedy generation under the delay pattern; the
cross-attention weights kept and saved, encoder_hidden_states refused by name; save_pretrained loaded by
transformers; config defaults. transformers' AutoModelForCausalLM refuses MusicgenDecoderConfig (it maps the
composite "musicgen", which it cannot build): the reference is its MusicgenForCausalLM class."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize
from family_checks import check_config_defaults

import autolm
from autolm.errors import ConfigError, GenerationError
from autolm.models.musicgen import MusicgenDecoderConfig

V = 64  # the pad / start token is V, the embeddings' last row
MONO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, num_codebooks=3,
            max_position_embeddings=64)  # fmt: skip
STEREO = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, ffn_dim=40, num_codebooks=4,
              audio_channels=2, activation_function="relu", cross_attention_hidden_size=24,
              max_position_embeddings=64)  # fmt: skip
MELODY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, num_codebooks=2,
              max_position_embeddings=64, activation_function="silu")  # fmt: skip
CONFIGS = {"mono": MONO, "stereo": STEREO, "melody": MELODY}
_CACHE: dict = {}


def checkpoint(tmp_path_factory, name: str):
    """(directory, transformers' model loaded back from it) for a tiny random checkpoint, made once."""
    import transformers

    if name not in _CACHE:
        kind = "MusicgenMelody" if name == "melody" else "Musicgen"
        cfg = getattr(transformers, f"{kind}DecoderConfig")(vocab_size=V, pad_token_id=V, bos_token_id=V,
                                                            dropout=0.0, **CONFIGS[name])  # fmt: skip
        torch.manual_seed(0)
        model = getattr(transformers, f"{kind}ForCausalLM")(cfg)
        randomize(model)
        model.generation_config.decoder_start_token_id = V
        d = str(tmp_path_factory.mktemp(f"musicgen_{name}"))
        model.save_pretrained(d)
        ref = type(model).from_pretrained(d, attn_implementation="eager")
        _CACHE[name] = (d, ref.eval())
    return _CACHE[name]


def batch(K: int, lengths=(9, 6, 3), seed: int = 0):
    """Left-padded (batch * K, T) ids and the (batch, T) mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, V, (len(lengths) * K, T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_logits(tmp_path_factory, name):
    """fp32 logits of a left-padded batch equal transformers' at every real position, in its layout."""
    directory, hf = checkpoint(tmp_path_factory, name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    K = CONFIGS[name]["num_codebooks"]
    ids, mask = batch(K)
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    assert ours.shape == theirs.shape == (ids.shape[0], ids.shape[1], V)
    real = mask.bool().repeat_interleave(K, dim=0)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_generate(tmp_path_factory, name):
    """Greedy tokens under the delay pattern equal transformers' (its generate needs num_return_sequences=1 set
    to run at all); decoder_start_token_id from generation_config.json or given."""
    directory, hf = checkpoint(tmp_path_factory, name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    K = CONFIGS[name]["num_codebooks"]
    ids, _ = batch(K, lengths=(4, 4), seed=1)
    for n in (10, 3):
        theirs = hf.generate(ids, max_new_tokens=n, do_sample=False, num_return_sequences=1)
        ours = model.generate(ids, max_new_tokens=n, do_sample=False)
        assert ours.shape[:2] == (2, K) and torch.equal(ours, theirs), n
    assert torch.equal(model.generate(ids[:K], max_new_tokens=6, decoder_start_token_id=V, do_sample=False),
                       hf.generate(ids[:K], max_new_tokens=6, do_sample=False, num_return_sequences=1))  # fmt: skip


def test_loss(tmp_path_factory):
    """transformers' loss: labels (batch, seq_len, num_codebooks), pad_token_id ignored, codebooks averaged."""
    directory, hf = checkpoint(tmp_path_factory, "mono")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, _ = batch(3, lengths=(7, 7))
    labels = torch.randint(0, V + 1, (2, 7, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels=labels).loss, hf(ids, labels=labels).loss)


@pytest.mark.parametrize("name", CONFIGS)
def test_names_save_and_config(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes (the cross-attention's kept); save_pretrained loads in transformers with
    equal logits and back in autolm bit-identical; config.json round-trips with transformers' keys only."""
    directory, hf = checkpoint(tmp_path_factory, name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ("model.decoder.layers.0.encoder_attn.k_proj.weight" in shapes) == (name != "melody")
    assert f"lm_heads.{CONFIGS[name]['num_codebooks'] - 1}.weight" in shapes
    model.save_pretrained(tmp_path / "saved")
    theirs = type(hf).from_pretrained(tmp_path / "saved", attn_implementation="eager")
    ids, _ = batch(CONFIGS[name]["num_codebooks"], lengths=(5, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(f"{directory}/config.json").read())
    for d in (written, original):
        d.pop("transformers_version", None)
    assert written == original


def test_refusals(tmp_path_factory):
    """No text encoder runs: encoder_hidden_states is refused by name, in forward and generate; so are ids not
    (batch * num_codebooks) rows, beam search, guidance and a missing decoder_start_token_id; no TP plan."""
    directory, _ = checkpoint(tmp_path_factory, "mono")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, _ = batch(3, lengths=(4, 4))
    states = torch.zeros(2, 5, 32)
    with pytest.raises(GenerationError, match="encoder_hidden_states"):
        model(ids, encoder_hidden_states=states)
    with pytest.raises(GenerationError, match="encoder_hidden_states"):
        model.generate(ids, encoder_hidden_states=states, max_new_tokens=2)
    with pytest.raises(GenerationError, match="num_codebooks"):
        model(ids[:5])
    with pytest.raises(GenerationError, match="num_beams"):
        model.generate(ids, num_beams=2, max_new_tokens=2)
    with pytest.raises(GenerationError, match="guidance_scale"):
        model.generate(ids, guidance_scale=3.0, max_new_tokens=2)
    model.generation_config = None
    with pytest.raises(GenerationError, match="decoder_start_token_id"):
        model.generate(ids, max_new_tokens=2)
    with pytest.raises(ConfigError, match="resize_token_embeddings"):
        model.resize_token_embeddings(V + 8)
    with pytest.raises(ConfigError, match="tensor-parallel"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_default_config_and_errors():
    """MusicgenDecoderConfig() holds transformers' defaults, with transformers' keys only; bad values raise
    ConfigError naming the key."""
    import transformers

    check_config_defaults(MusicgenDecoderConfig)
    theirs = json.loads(transformers.MusicgenDecoderConfig().to_json_string())
    theirs.pop("transformers_version")
    assert set(MusicgenDecoderConfig().to_dict()) <= set(theirs)
    small = dict(hidden_size=32, num_attention_heads=4, ffn_dim=48)
    for change, key in ((dict(audio_channels=3), "audio_channels"), (dict(num_codebooks=0), "num_codebooks"),
                        (dict(num_codebooks=3, audio_channels=2), "num_codebooks"), (dict(dropout=2), "dropout"),
                        (dict(activation_function="swiglu"), "hidden_act"), (dict(scale_embedding=1), "scale_embedding")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            MusicgenDecoderConfig(**{**small, **change})


def test_melody_conditioning(tmp_path_factory):
    """MusicGen Melody's decoder: encoder_hidden_states prepended to the codebook embeddings (with and without
    their mask, beside a left-padded attention_mask), logits over the prepended positions too, equal to
    transformers'; conditioned generation is refused by name (unconditioned generation: test_generate)."""
    directory, hf = checkpoint(tmp_path_factory, "melody")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "MusicgenMelodyForCausalLM"
    ids, mask = batch(2)
    states = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(3))
    states_mask = torch.ones(3, 4, dtype=torch.long)
    states_mask[2, :2] = 0
    for extra in (dict(), dict(encoder_attention_mask=states_mask)):
        with torch.no_grad():
            ours = model(ids, attention_mask=mask, encoder_hidden_states=states, **extra).logits
            theirs = hf(ids, attention_mask=mask, encoder_hidden_states=states, **extra).logits
        assert ours.shape == theirs.shape == (6, 4 + 9, V)
        full = torch.cat([extra.get("encoder_attention_mask", torch.ones(3, 4, dtype=torch.long)), mask], 1)
        real = full.bool().repeat_interleave(2, dim=0)
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    with pytest.raises(GenerationError, match="encoder_hidden_states"):
        model.generate(ids[:2, :3], encoder_hidden_states=states[:1], max_new_tokens=2)


def test_melody_default_config():
    """MusicgenMelodyDecoderConfig() holds transformers' defaults, with transformers' keys only."""
    import transformers

    from autolm.models.musicgen import MusicgenMelodyDecoderConfig

    check_config_defaults(MusicgenMelodyDecoderConfig)
    theirs = json.loads(transformers.MusicgenMelodyDecoderConfig().to_json_string())
    assert set(MusicgenMelodyDecoderConfig().to_dict()) <= set(theirs)


@pytest.mark.parametrize("name", ["mono", "melody"])
def test_lora(tmp_path_factory, tmp_path, name):
    """An adapter peft made on transformers' model (q_proj / v_proj, the unused cross-attention's too, and fc1)
    gives peft's logits in autolm; autolm's saved adapter gives them back in peft."""
    import peft

    directory, hf = checkpoint(tmp_path_factory, name)
    pm = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
    )
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    pm.save_pretrained(tmp_path / "peft")
    ids, _ = batch(CONFIGS[name]["num_codebooks"], lengths=(6, 6))
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    pm.unload()
    ours = autolm.PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory),
                                            str(tmp_path / "peft"))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-4, rtol=1e-4)
        ours.save_pretrained(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
        torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        back.unload()


def test_int8(tmp_path_factory):
    """int8 weights stay close to the fp32 model."""
    directory, _ = checkpoint(tmp_path_factory, "mono")
    ids, _ = batch(3, lengths=(6, 6))
    full = autolm.AutoModelForCausalLM.from_pretrained(directory)
    quant = autolm.AutoModelForCausalLM.from_pretrained(directory, quantization="int8")
    assert any(type(m).__name__.startswith("Int") for m in quant.model.decoder.layers.modules())
    with torch.no_grad():
        truth, got = full(ids).logits, quant(ids).logits.float()
    assert (got - truth).abs().mean() <= 0.08 * truth.abs().mean()
