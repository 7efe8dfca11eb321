"""Further image-text and audio-text checkpoints whose language model autolm runs (autolm.models.image_text),
against transformers: Audio Flamingo 3, Music Flamingo, VibeVoice-ASR, VideoLLaMA 3 and PP-Chart2Table (Qwen 2),
Qwen3-ASR, Fun-ASR-Nano, MOSS Transcribe-Diarize and Qianfan-OCR (Qwen 3), GLM-ASR (Llama), HyperCLOVA X SEED Vision 2
(HyperCLOVA X), LFM3-VL (LFM3), MiniCPM-OCR and MiniCPM-V 4.6 / 4.7 (Qwen 3.5), each the model class transformers'
AutoModelForImageTextToText gives (PP-Chart2Table's: GOT-OCR 2.0's), with tiny towers, checked as
test_family_image_text_more's cases are: logits over a left-padded batch, head tying, greedy tokens and the saved
text model. BLIP-2 and InstructBLIP (OPT), whose wrapper needs an image, GLM-ASR's text defaults and VideoLLaMA 3's
tying by text_config are checked apart."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS, VOCAB, padded_batch, randomize
from test_family_image_text import QWEN_VISION, TEXT, TINY_VISION, _logits
from test_family_image_text_more import _tied, check_language_model

import autolm

WHISPER = dict(num_mel_bins=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, hidden_size=32,
               max_source_positions=16)  # fmt: skip
VIBE = dict(hidden_size=8, num_filters=4, downsampling_ratios=[2], depths=[1, 1])
QWEN2, QWEN3 = dict(TEXT, model_type="qwen2"), dict(TEXT, model_type="qwen3", head_dim=16)
TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
QWEN3_5 = dict(SPECS["qwen3_5_text"][1], **TOKENS, model_type="qwen3_5_text")  # Gated DeltaNet and attention
LFM3 = dict(TOKENS, model_type="lfm3", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=6,
            layer_types=["conv", "sliding_attention", "full_attention"])  # fmt: skip
MINICPM_VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                      patch_size=4, insert_layer_id=0)  # fmt: skip
# name -> (transformers' config class prefix, config kwargs, autolm's text model class, transformers' model class)
CASES = {
    # audio-text over Qwen 2: the head never tied
    "audioflamingo3": ("AudioFlamingo3", dict(text_config=QWEN2, audio_config=WHISPER), "Qwen2ForCausalLM"),
    "musicflamingo": ("MusicFlamingo", dict(text_config=QWEN2, audio_config=dict(WHISPER,
                      model_type="audioflamingo3_encoder")), "Qwen2ForCausalLM"),
    "vibevoice_asr": ("VibeVoiceAsr", dict(text_config=QWEN2, acoustic_tokenizer_encoder_config=VIBE,
                                           semantic_tokenizer_encoder_config=VIBE), "Qwen2ForCausalLM"),
    # image-text over Qwen 2: VideoLLaMA 3 tied by the outer config; PP-Chart2Table is GOT-OCR 2.0's model, tied
    "video_llama_3": ("VideoLlama3", dict(text_config=QWEN2, vision_config=TINY_VISION, tie_word_embeddings=True),
                      "Qwen2ForCausalLM"),
    "pp_chart2table": ("PPChart2Table", dict(text_config=QWEN2, vision_config=dict(
        hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
        mlp_dim=32, global_attn_indexes=[0], window_size=2)), "Qwen2ForCausalLM", "GotOcr2"),
    # over Qwen 3: the audio-text heads tied by default, Qianfan-OCR's untied
    "qwen3_asr": ("Qwen3ASR", dict(text_config=QWEN3, audio_config=dict(
        num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32, output_dim=64,
        downsample_hidden_size=8, n_window=4, n_window_infer=8)), "Qwen3ForCausalLM"),
    "fun_asr_nano": ("FunAsrNano", dict(text_config=QWEN3, audio_config=dict(
        num_mel_bins=16, hidden_size=32, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1,
        num_stacked_frames=1, num_timestamp_prediction_layers=1, fsmn_kernel_size=3), adaptor_config=dict(
        hidden_size=64, num_attention_heads=2, intermediate_size=16, num_hidden_layers=1), projector_hidden_size=32),
        "Qwen3ForCausalLM"),
    "moss_transcribe_diarize": ("MossTranscribeDiarize", dict(text_config=QWEN3, audio_config=WHISPER),
                                "Qwen3ForCausalLM"),
    "qianfan_ocr": ("QianfanOCR", dict(text_config=QWEN3, vision_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
        patch_size=14)), "Qwen3ForCausalLM"),
    # GLM-ASR's text defaults merged under text_config (its head_dim and layer count set here)
    "glmasr": ("GlmAsr", dict(text_config=dict(TEXT, model_type="llama", head_dim=16, num_attention_heads=4,
                                               num_key_value_heads=2, hidden_size=64, intermediate_size=96),
                              audio_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, num_mel_bins=16,
                                                max_position_embeddings=16)), "LlamaForCausalLM"),
    # HyperCLOVA X's multipliers, its head's logits_scaling applied by the wrapper as by the text model
    "hyperclovax_vision_v2": ("HyperCLOVAXVisionV2", dict(text_config=dict(SPECS["hyperclovax"][1], **TOKENS,
                              model_type="hyperclovax"), vision_config=dict(QWEN_VISION, out_hidden_size=64)),
                              "HyperCLOVAXForCausalLM"),
    "lfm3_vl": ("Lfm3Vl", dict(text_config=LFM3, vision_config=dict(hidden_size=32, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, patch_size=4),
                projector_hidden_size=32), "Lfm3ForCausalLM"),
    # over Qwen 3.5: MiniCPM-OCR tied by default, MiniCPM-V 4.6 / 4.7 untied
    "minicpm_ocr": ("MiniCPMOcr", dict(text_config=QWEN3_5, vision_config=MINICPM_VISION), "Qwen3_5ForCausalLM"),
    "minicpmv4_6": ("MiniCPMV4_6", dict(text_config=QWEN3_5, vision_config=MINICPM_VISION), "Qwen3_5ForCausalLM"),
    "minicpmv4_7": ("MiniCPMV4_7", dict(text_config=QWEN3_5, vision_config=MINICPM_VISION), "Qwen3_5ForCausalLM"),
}  # fmt: skip


def _checkpoint(tmp_path_factory, name: str):
    """The case's transformers model (random weights), saved; (directory, model)."""
    import transformers

    prefix, kwargs, _, *model_prefix = CASES[name]
    directory = tmp_path_factory.mktemp(name)
    config = getattr(transformers, f"{prefix}Config")(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, f"{(model_prefix or [prefix])[0]}ForConditionalGeneration")(config)
    randomize(model)
    model.tie_weights()
    model.save_pretrained(directory)
    return str(directory), model.eval()


@pytest.mark.parametrize("name", CASES)
def test_language_model_is_the_wrappers(name, tmp_path_factory, tmp_path):
    """The checkpoint loads as its text family with the wrapper's logits (a left-padded batch), head tying and
    greedy tokens; saved, transformers' AutoModelForCausalLM loads the text model with the same logits."""
    check_language_model(*_checkpoint(tmp_path_factory, name), CASES[name][2], tmp_path)


def test_text_defaults_and_tying():
    """GLM-ASR's text defaults where text_config leaves them out are transformers'; VideoLLaMA 3 ties its head as
    older files say it in text_config; Qwen3-ASR ties by default and Qianfan-OCR does not."""
    import transformers

    from autolm.models import GlmAsrConfig, QianfanOCRConfig, Qwen3ASRConfig, VideoLlama3Config

    ours = GlmAsrConfig(text_config=dict(model_type="llama", vocab_size=VOCAB))
    theirs = transformers.GlmAsrConfig(text_config=dict(model_type="llama", vocab_size=VOCAB)).text_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "eos_token_id", "head_dim"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.tie_word_embeddings
    for tied in (False, True):
        text = dict(QWEN2, tie_word_embeddings=tied)
        assert VideoLlama3Config(text_config=text).tie_word_embeddings == tied
        assert transformers.VideoLlama3Config(text_config=text).tie_word_embeddings == tied
    assert Qwen3ASRConfig(text_config=QWEN3).tie_word_embeddings
    assert not QianfanOCRConfig(text_config=QWEN3).tie_word_embeddings


OPT = dict(TOKENS, model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=128, word_embed_proj_dim=64)  # fmt: skip
BLIP_TOWERS = dict(vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=16, patch_size=4),
                   qformer_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       encoder_hidden_size=32, vocab_size=VOCAB),
                   num_query_tokens=2, image_token_index=VOCAB - 1)  # fmt: skip


@pytest.mark.parametrize("prefix", ["Blip2", "InstructBlip"])
def test_blip_language_model(prefix, tmp_path):
    """BLIP-2's and InstructBLIP's OPT: the wrapper's logits (given an image, which fills no place in a prompt
    without image tokens) over a left-padded batch, its head tying (text_config's own, both ways) and greedy tokens;
    saved, the text model transformers loads. A T5 language model is refused by name."""
    import transformers

    from autolm.errors import ConfigError

    ids, mask = padded_batch()
    pixels = torch.zeros(len(ids), 3, 16, 16)
    media = dict(qformer_input_ids=ids[:, :2]) if prefix == "InstructBlip" else {}
    for tied in (True, False):
        config = getattr(transformers, f"{prefix}Config")(text_config=dict(OPT, tie_word_embeddings=tied),
                                                          **BLIP_TOWERS)  # fmt: skip
        torch.manual_seed(0)
        hf = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
        randomize(hf)
        hf.tie_weights()
        hf.save_pretrained(tmp_path / prefix)
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / prefix)
        assert type(model).__name__ == "OPTForCausalLM"
        assert model.config.tie_word_embeddings == _tied(hf) == _tied(model) == tied
        ours = _logits(model, ids, mask)
        with torch.no_grad():
            theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, **media).logits[mask.bool()]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        prompt = ids[:1, -9:]
        greedy = hf.language_model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), greedy)
        model.save_pretrained(tmp_path / "text")
        text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
        torch.testing.assert_close(ours, _logits(text, ids, mask), atol=1e-4, rtol=1e-4)
    config = getattr(transformers, f"{prefix}Config")(
        text_config=dict(model_type="t5", vocab_size=VOCAB)
    ).to_dict()
    with pytest.raises(ConfigError, match="text_config.model_type is 't5'"):
        getattr(autolm, f"{prefix}Config").from_dict(config)
