"""More image-text and audio-text checkpoints whose language model autolm runs (autolm.models.image_text), against
transformers: Idefics 2 (Mistral), PaliGemma (Gemma, and PaliGemma 2's Gemma 2), GOT-OCR 2.0, Ovis 2 and
Qwen2-Audio (Qwen 2), Fuyu (Persimmon), DeepSeek-VL, DeepSeek-VL-Hybrid, Janus, Video-LLaVA, ViP-LLaVA,
LLaVA-NeXT-Video and Voxtral (Llama), Granite Speech (Granite), EXAONE 4.5 (EXAONE 4) and LightOnOCR (Qwen 3), each
the model class transformers' AutoModelForImageTextToText (or AutoModelForCausalLM, Fuyu's) gives, with tiny
towers. On text, autolm's model of the checkpoint is the text family's, with the wrapper's logits over a left-padded
batch, its head tying and greedy tokens; saved, it is the text model transformers' AutoModelForCausalLM loads, with
the same logits. Fuyu's flat Hub config, Voxtral's text defaults and the prefix settings of a PaliGemma whose Gemma
attends both ways are checked apart (its attention: test_paligemma_prefix)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB, padded_batch, randomize
from test_family_image_text import CLIP, PIXTRAL, QWEN_VISION, SIGLIP, TEXT, TINY_VISION, _logits

import autolm

SAM = dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=4,
           mlp_dim=32, global_attn_indexes=[0], window_size=2)  # fmt: skip
AUDIO = dict(d_model=32, encoder_attention_heads=2, encoder_ffn_dim=32, encoder_layers=1, num_mel_bins=16,
             max_source_positions=16)  # fmt: skip
JANUS_VQ = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1], num_res_blocks=1,
                latent_channels=8, projection_dim=64, num_hidden_layers=1, hidden_size=64)  # fmt: skip
GRANITE_SPEECH = dict(
    encoder_config=dict(hidden_dim=32, num_layers=1, num_heads=2, dim_head=16, input_dim=16, output_dim=8,
                        feedforward_mult=1, context_size=8),
    projector_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          encoder_hidden_size=32),
    window_size=4, downsample_rate=2,
)  # fmt: skip
PHI4_VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                   patch_size=14, crop_size=28)  # fmt: skip
PHI4_AUDIO = dict(hidden_size=32, intermediate_size=32, num_blocks=1, num_attention_heads=2, input_size=16,
                  nemo_conv_channels=16, depthwise_separable_out_channel=16, ext_pw_out_channel=16,
                  depthwise_multiplier=1, kernel_size=3, nemo_final_size=4)  # fmt: skip
# name -> (transformers' config / model class prefix, config kwargs, autolm's and transformers' text model class)
CASES = {
    "idefics2": ("Idefics2", dict(text_config=dict(TEXT, model_type="mistral", sliding_window=None),
                                  vision_config=dict(TINY_VISION, image_size=16),
                                  perceiver_config=dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1,
                                                        resampler_n_heads=2, resampler_head_dim=8,
                                                        num_key_value_heads=1)), "MistralForCausalLM"),
    # the embeddings scaled by sqrt(hidden_size) in Gemma's model; positions from 1; causal (see the refusal test)
    "paligemma": ("PaliGemma", dict(text_config=dict(TEXT, model_type="gemma", head_dim=16,
                                                     use_bidirectional_attention=False), vision_config=SIGLIP,
                                    projection_dim=64), "GemmaForCausalLM"),
    # PaliGemma 2: a Gemma 2 (soft-capped, sliding window), untied by the outer config
    "paligemma2": ("PaliGemma", dict(text_config=dict(TEXT, model_type="gemma2", head_dim=16, sliding_window=4),
                                     vision_config=SIGLIP, projection_dim=64, tie_word_embeddings=False),
                   "Gemma2ForCausalLM"),
    "got_ocr2": ("GotOcr2", dict(text_config=dict(TEXT), vision_config=dict(SAM, image_size=16)),
                 "Qwen2ForCausalLM"),
    "ovis2": ("Ovis2", dict(text_config=dict(TEXT, model_type="qwen2"),
                            vision_config=dict(TINY_VISION, image_size=16, vocab_size=16)), "Qwen2ForCausalLM"),
    "qwen2_audio": ("Qwen2Audio", dict(text_config=dict(TEXT, model_type="qwen2", tie_word_embeddings=True),
                                       audio_config=AUDIO), "Qwen2ForCausalLM"),
    "fuyu": ("Fuyu", dict(text_config=dict(TEXT, model_type="persimmon"), patch_size=4, image_size=16,
                          hidden_size=64), "PersimmonForCausalLM"),
    "deepseek_vl": ("DeepseekVL", dict(text_config=dict(TEXT, model_type="llama"), vision_config=SIGLIP),
                    "LlamaForCausalLM"),
    "deepseek_vl_hybrid": ("DeepseekVLHybrid", dict(text_config=dict(TEXT, model_type="llama"), vision_config=SIGLIP,
                                                    high_res_vision_config=SAM), "LlamaForCausalLM"),
    "janus": ("Janus", dict(text_config=dict(TEXT, model_type="llama"), vision_config=dict(TINY_VISION, image_size=16),
                            vq_config=JANUS_VQ), "LlamaForCausalLM"),
    "video_llava": ("VideoLlava", dict(text_config=dict(TEXT, model_type="llama"), vision_config=CLIP),
                    "LlamaForCausalLM"),
    "vipllava": ("VipLlava", dict(text_config=dict(TEXT, model_type="llama"), vision_config=CLIP,
                                  vision_feature_layers=[-1]), "LlamaForCausalLM"),
    # tied by text_config, as older files hold it
    "llava_next_video": ("LlavaNextVideo", dict(text_config=dict(TEXT, model_type="llama", tie_word_embeddings=True),
                                                vision_config=CLIP, image_grid_pinpoints=[[16, 16]]),
                         "LlamaForCausalLM"),
    "voxtral": ("Voxtral", dict(text_config=dict(TEXT, model_type="llama", head_dim=16, rope_theta=1e4),
                                audio_config=dict(hidden_size=32, num_attention_heads=2, intermediate_size=32,
                                                  num_hidden_layers=1, num_mel_bins=16, max_source_positions=16)),
                "LlamaForCausalLM"),
    # Granite's multipliers; the audio-text head does not divide by logits_scaling
    "granite_speech": ("GraniteSpeech", dict(text_config=dict(TEXT, model_type="granite", embedding_multiplier=2.0,
                                                              residual_multiplier=0.5, attention_multiplier=0.2,
                                                              logits_scaling=4.0), **GRANITE_SPEECH),
                       "GraniteForCausalLM"),
    "exaone4_5": ("Exaone4_5_", dict(text_config=dict(TEXT, model_type="exaone4", head_dim=16, sliding_window=4,
                                                     layer_types=["sliding_attention", "full_attention"]),
                                     vision_config=dict(QWEN_VISION, num_heads=2)), "Exaone4ForCausalLM"),
    # the language model's settings at the top level (flat), Phi-3's partial rotary; the media embeddings skipped
    "phi4_multimodal": ("Phi4Multimodal", dict(TEXT, partial_rotary_factor=0.5, vision_config=PHI4_VISION,
                                               audio_config=PHI4_AUDIO), "Phi3ForCausalLM"),
    "lighton_ocr": ("LightOnOcr", dict(text_config=dict(TEXT, model_type="qwen3", head_dim=16), vision_config=PIXTRAL),
                    "Qwen3ForCausalLM"),
}  # fmt: skip


def _checkpoint(tmp_path_factory, name: str):
    """The case's transformers model (random weights), saved; (directory, model)."""
    import transformers

    prefix, kwargs, _ = CASES[name]
    directory = tmp_path_factory.mktemp(name)
    config = getattr(transformers, f"{prefix}Config")(**kwargs)
    torch.manual_seed(0)
    kind = "ForCausalLM" if prefix in ("Fuyu", "Phi4Multimodal") else "ForConditionalGeneration"
    model = getattr(transformers, f"{prefix}{kind}")(config)
    randomize(model)
    model.tie_weights()
    model.save_pretrained(directory)
    return str(directory), model.eval()


def _tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("name", CASES)
def test_language_model_is_the_wrappers(name, tmp_path_factory, tmp_path):
    """The checkpoint loads as its text family with the wrapper's logits (a left-padded batch), head tying and
    greedy tokens; saved, transformers' AutoModelForCausalLM loads the text model with the same logits."""
    check_language_model(*_checkpoint(tmp_path_factory, name), CASES[name][2], tmp_path)


def check_language_model(directory: str, hf, text_class: str, tmp_path) -> None:
    """autolm's model of a wrapper's checkpoint is `text_class` with the wrapper's (`hf`'s) logits over a left-padded
    batch, head tying and greedy tokens; saved, transformers loads it as that class with the same logits."""
    import transformers

    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == text_class
    assert model.config.tie_word_embeddings == _tied(hf) == _tied(model)
    ids, mask = padded_batch()
    ours = _logits(model, ids, mask)
    torch.testing.assert_close(ours, _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    prompt = ids[:1, -9:]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), theirs)
    model.save_pretrained(tmp_path / "text")
    text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    assert type(text).__name__ == text_class
    torch.testing.assert_close(ours, _logits(text, ids, mask), atol=1e-4, rtol=1e-4)


def test_hub_configs_and_refusals(tmp_path_factory, tmp_path):
    """Fuyu's config as the Hub's files hold it (the language model's settings at the top level) gives the same
    logits; Voxtral's defaults where text_config leaves them out are transformers'; a PaliGemma over a Gemma that
    leaves use_bidirectional_attention unset (transformers then attends over an unpadded prompt both ways), or as
    transformers writes it (true), reads as the causal text model with bidirectional_prompt set."""
    import transformers
    from test_family_image_text import _rewrite

    from autolm.models import PaliGemmaConfig, VoxtralConfig

    def flat(d):
        text = d.pop("text_config")
        text.pop("model_type")
        return {**d, **text}

    directory, hf = _checkpoint(tmp_path_factory, "fuyu")
    model = autolm.AutoModelForCausalLM.from_pretrained(
        _rewrite(directory, tmp_path / "flat", change_config=flat)
    )
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    text = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=8)
    ours = VoxtralConfig(text_config=dict(text, model_type="llama"))
    theirs = transformers.VoxtralConfig(text_config=dict(text, model_type="llama")).text_config
    for key in ("intermediate_size", "num_hidden_layers", "num_key_value_heads", "max_position_embeddings",
                "rms_norm_eps", "head_dim"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"] == 1e8
    assert not ours.tie_word_embeddings
    gemma = dict(text, model_type="gemma", num_key_value_heads=1)
    written = transformers.PaliGemmaConfig(text_config=gemma).to_dict()
    read = PaliGemmaConfig.from_dict(json.loads(json.dumps(written)))
    for config in (PaliGemmaConfig(text_config=gemma), read):
        assert config.bidirectional_prompt and config.prefix_token_type == 0
        assert config.use_bidirectional_attention is False and "bidirectional_prompt" not in config.to_dict()
    causal = PaliGemmaConfig(text_config=dict(gemma, use_bidirectional_attention=False))
    assert not causal.bidirectional_prompt
    assert os.path.isdir(directory)


def test_image_and_audio_inputs_are_refused_by_name(tmp_path_factory):
    """An image-text (or audio-text) checkpoint's language model refuses the media inputs transformers' wrapper
    would read, naming them, in forward and in generate; text alone runs."""
    from autolm.errors import GenerationError

    model = autolm.AutoModelForCausalLM.from_pretrained(_checkpoint(tmp_path_factory, "idefics2")[0])
    ids = torch.tensor([[5, 6, 7]])
    pixels = torch.zeros(1, 3, 16, 16)
    with pytest.raises(GenerationError, match="pixel_values"):
        model(ids, pixel_values=pixels)
    with pytest.raises(GenerationError, match="(?s)input_features.*image_sizes|image_sizes.*input_features"):
        model(ids, input_features=torch.zeros(1, 16, 8), image_sizes=torch.tensor([[16, 16]]))
    with pytest.raises(GenerationError, match="pixel_values"):
        model.generate(ids, pixel_values=pixels, max_new_tokens=2)
    assert model(ids, pixel_values=None).logits.shape[:2] == (1, 3)
