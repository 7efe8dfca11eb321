"""Qwen2.5-Omni and Qwen3-Omni-MoE, whose language model autolm runs (autolm.models.image_text): the thinker's, from
the thinker's checkpoints (Qwen2_5OmniThinkerForConditionalGeneration, Qwen3OmniMoeThinkerForConditionalGeneration,
tiny audio and vision towers) and from the whole models' (thinker, talker and token2wav / code2wav: the thinker's
thinker.model.* and thinker.lm_head.* tensors, the rest skipped). On text, Qwen2.5-Omni's thinker is Qwen2.5-VL's
language model, a Qwen 2, and Qwen3-Omni-MoE's is Qwen3-VL-MoE's, a Qwen 3 MoE (here renormalising its top k or
not by norm_topk_prob): their multimodal RoPE is plain RoPE on text. Checked against transformers' thinker (the
whole model's own, on the same weights): logits over a left-padded batch, head tying (by the thinker's config,
not text_config's), greedy tokens and the saved text model; transformers' text defaults; the Hub's older config
spelling (rope_theta, rope_scaling with the sections, Qwen3-Omni's "interleaved"); llama.cpp's "qwen2vl" and
"qwen3vlmoe" files, which its converter writes for these models' thinkers, read as the text family's (and
llama.cpp's own logits on the same file, where llama-cpp-python is installed)."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, positions, randomize
from test_family_image_text import MROPE, TEXT, _logits, _rewrite, _vl_file
from test_family_image_text_more import _tied, check_language_model
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

# Qwen2.5-Omni: text_config's own tie_word_embeddings is not the one transformers ties by
QWEN25_TEXT = dict(TEXT, rope_parameters=MROPE, tie_word_embeddings=False)
QWEN25_VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                     fullatt_block_indexes=[0])  # fmt: skip
QWEN25_AUDIO = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32,
                    output_dim=64, max_source_positions=16, n_window=4)  # fmt: skip
QWEN25_TALKER = dict(vocab_size=32, embedding_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_parameters=MROPE)  # fmt: skip
TOKEN2WAV = dict(
    dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, ff_mult=1, emb_dim=16,
                    enc_emb_dim=8, enc_dim=16, enc_channels=[16, 16, 16, 16, 32], enc_attention_channels=8,
                    enc_se_channels=8, num_embeds=16, mel_dim=8, look_ahead_layers=[0], look_backward_layers=[0]),
    bigvgan_config=dict(mel_dim=8, upsample_initial_channel=16, upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
                        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 1, 1]]),
)  # fmt: skip
# Qwen3-Omni-MoE: interleaved sections (as the Hub's files: "interleaved" and "mrope_interleaved")
QWEN3_ROPE = dict(MROPE, interleaved=True, mrope_interleaved=True)
QWEN3_TEXT = dict(TEXT, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  rope_parameters=QWEN3_ROPE)  # fmt: skip
QWEN3_VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                    num_position_embeddings=16, deepstack_visual_indexes=[0])  # fmt: skip
QWEN3_AUDIO = dict(QWEN25_AUDIO, downsample_hidden_size=8, n_window_infer=8)
SMALL = dict(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16)  # fmt: skip
QWEN3_TALKER = dict(
    spatial_merge_size=2,  # transformers' talker reads it, its config class lacks it
    thinker_hidden_size=64, accept_hidden_layer=1, num_code_groups=2,
    text_config=dict(SMALL, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                     shared_expert_intermediate_size=16, rope_parameters=QWEN3_ROPE),
    code_predictor_config=dict(SMALL, num_code_groups=2),
)  # fmt: skip
CODE2WAV = dict(codebook_size=16, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                num_hidden_layers=1, num_quantizers=2, decoder_dim=16, upsample_rates=[2], upsampling_ratios=[2],
                sliding_window=4, max_position_embeddings=64)  # fmt: skip
# the thinkers' forward reads vision_start_token_id, which the Hub's thinker configs hold and their classes lack
QWEN25_THINKER = dict(text_config=QWEN25_TEXT, vision_config=QWEN25_VISION, audio_config=QWEN25_AUDIO,
                      vision_start_token_id=151652)  # fmt: skip
QWEN3_THINKER = dict(text_config=QWEN3_TEXT, vision_config=QWEN3_VISION, audio_config=QWEN3_AUDIO,
                     vision_start_token_id=151652)  # fmt: skip
# name -> (transformers' model class prefix, config kwargs, autolm's text model class); the thinkers' heads tied by
# their config, the whole models' untied (the default); Qwen3-Omni's thinker not renormalising its top k, with a
# dense layer (mlp_only_layers)
CASES = {
    "qwen2_5_omni_thinker": ("Qwen2_5OmniThinker", dict(QWEN25_THINKER, tie_word_embeddings=True), "Qwen2ForCausalLM"),
    "qwen2_5_omni": ("Qwen2_5Omni", dict(thinker_config=QWEN25_THINKER, talker_config=QWEN25_TALKER,
                                         token2wav_config=TOKEN2WAV), "Qwen2ForCausalLM"),
    "qwen3_omni_moe_thinker": ("Qwen3OmniMoeThinker", dict(QWEN3_THINKER, tie_word_embeddings=True, text_config=dict(
        QWEN3_TEXT, norm_topk_prob=False, mlp_only_layers=[1])), "Qwen3MoeForCausalLM"),
    "qwen3_omni_moe": ("Qwen3OmniMoe", dict(thinker_config=QWEN3_THINKER, talker_config=QWEN3_TALKER,
                                            code2wav_config=CODE2WAV), "Qwen3MoeForCausalLM"),
}  # fmt: skip


def _checkpoint(tmp_path_factory, name: str):
    """The case's transformers model (random weights), saved; (directory, its thinker)."""
    import transformers

    prefix, kwargs, _ = CASES[name]
    directory = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(
        getattr(transformers, f"{prefix}Config")(**kwargs)
    )
    randomize(model)
    model.tie_weights()
    model.save_pretrained(directory)
    return str(directory), getattr(model, "thinker", model).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: _checkpoint(tmp_path_factory, name) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_language_model_is_the_thinkers(name, checkpoints, tmp_path):
    """The checkpoint loads as its text family with the thinker's logits (a left-padded batch), head tying and greedy
    tokens; saved, transformers' AutoModelForCausalLM loads the text model with the same logits."""
    directory, thinker = checkpoints[name]
    assert _tied(thinker) == name.endswith("_thinker")
    check_language_model(directory, thinker, CASES[name][2], tmp_path)
    if name == "qwen3_omni_moe_thinker":
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert model.config.norm_topk_prob is False and model.config.mlp_only_layers == [1]
        assert type(model.model.layers[1].mlp).__name__ != type(model.model.layers[0].mlp).__name__


def _hub(d: dict) -> dict:
    """A config.json as the Hub's files spell it: RoPE base as rope_theta, the sections under rope_scaling with
    "type" beside "rope_type", torch_dtype at the top and in the thinker's config."""
    thinker = d.get("thinker_config", d)
    text = thinker["text_config"]
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope.pop("rope_theta"), rope_scaling={**rope, "type": "default"})
    for config in (d, thinker):
        config.pop("dtype", None)
        config["torch_dtype"] = "float32"
    return d


@pytest.mark.parametrize("name", CASES)
def test_hub_config_spelling(name, checkpoints, tmp_path):
    """The Hub's spelling of the same config (see _hub) gives the same model: logits, RoPE base, no sections or
    "interleaved" left in the text model's RoPE settings."""
    directory, thinker = checkpoints[name]
    model = autolm.AutoModelForCausalLM.from_pretrained(
        _rewrite(directory, tmp_path / "hub", change_config=_hub)
    )
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 1e4}
    assert model.dtype == torch.float32
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(thinker, ids, mask), atol=1e-4, rtol=1e-4)


TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "attention_dropout")  # fmt: skip
MOE_KEYS = ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step",
            "mlp_only_layers", "attention_bias")  # fmt: skip


def test_config_defaults_and_refusal():
    """transformers' text defaults where text_config (or thinker_config) leaves them out, the RoPE base (1e6) and
    head size included, no sliding window, the head untied; a whole model's config without thinker_config is refused
    by name."""
    import transformers

    from autolm.models import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniThinkerConfig,
        Qwen3OmniMoeConfig,
        Qwen3OmniMoeThinkerConfig,
    )

    moe, empty = TEXT_KEYS + MOE_KEYS, {"text_config": {}}
    pairs = [
        (Qwen2_5OmniThinkerConfig(text_config={}), transformers.Qwen2_5OmniThinkerConfig(), TEXT_KEYS),
        (Qwen2_5OmniConfig(thinker_config=empty), transformers.Qwen2_5OmniConfig().thinker_config, TEXT_KEYS),
        (Qwen3OmniMoeThinkerConfig(text_config={}), transformers.Qwen3OmniMoeThinkerConfig(), moe),
        (Qwen3OmniMoeConfig(thinker_config=empty), transformers.Qwen3OmniMoeConfig().thinker_config, moe),
    ]
    for ours, theirs, keys in pairs:
        text = theirs.text_config
        for key in keys:
            assert getattr(ours, key) == getattr(text, key), (type(theirs).__name__, key)
        assert ours.head_dim == getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
        assert ours.rope_parameters["rope_theta"] == text.rope_parameters["rope_theta"] == 1e6
        assert all(ours.layer_window(i) is None for i in range(ours.num_hidden_layers))
        assert ours.tie_word_embeddings is theirs.tie_word_embeddings is False
    with pytest.raises(ConfigError, match="thinker_config"):
        Qwen2_5OmniConfig.from_dict({"model_type": "qwen2_5_omni", "text_config": QWEN25_TEXT})


@pytest.mark.parametrize("name,arch", [("qwen2_5_omni", "qwen2vl"), ("qwen3_omni_moe", "qwen3vlmoe")])
def test_llama_cpp_files_read_as_the_text_family(name, arch, checkpoints, tmp_path, byte_tokenizer):  # noqa: F811
    """llama.cpp's converter writes the Omni thinker's language model as "qwen2vl" (Qwen2.5-Omni) or "qwen3vlmoe"
    (Qwen3-Omni-MoE, no deepstack layers): such a file reads as the text family with the model's logits, and
    llama.cpp's logits on it agree (within its float16 KV cache)."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(checkpoints[name][0], dtype=torch.float32)
    text = save_gguf(model, byte_tokenizer, str(tmp_path / "text.gguf"), "f32")
    _vl_file(text, arch, str(tmp_path / "vl.gguf"), 0 if arch == "qwen3vlmoe" else None)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="vl.gguf", progress=False)
    assert type(back).__name__ == CASES[name][2]
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = back(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        torch.testing.assert_close(ours, _logits(model, ids, mask), atol=1e-4, rtol=1e-4)
        row = back(ROW).logits[0]
    _close_to_llama_cpp(row, llama_cpp_logits(str(tmp_path / "vl.gguf")))
