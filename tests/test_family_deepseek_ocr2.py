"""DeepSeek-OCR 2's and Unlimited-OCR's language model against transformers and peft: Llama's attention (grouped-query
here) over DeepSeek-V2's mixture (dense and sparse layers by mlp_layer_types; greedy and group-limited softmax
routing times routed_scaling_factor, the shared experts, MLP biases), its head size fixed at hidden / heads.

transformers has no causal-LM class for the text configs (only the image-text models and their text models), so the
Family battery's reference is a text causal LM made of transformers' own text model and a head, registered with
AutoModelForCausalLM (`register_reference`); the image-text cases check that it and autolm both give what
transformers' DeepseekOcr2ForConditionalGeneration / UnlimitedOcrForConditionalGeneration give on text (logits over a
left-padded batch, head tying, greedy tokens, the saved text model), loading the files transformers writes in the
original layout (per-expert tensors, model.sam_model, model.qwen2_model, model.vision_model, model.view_seperator).
GGUF (llama.cpp's deepseek2-ocr) is checked in test_deepseek_ocr2_gguf.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HEAD_TIED as _TIED
from conftest import VOCAB, padded_batch, randomize, register_reference
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_image_text import _logits
from test_family_image_text_more import _tied, check_language_model

import autolm


@pytest.fixture(scope="module", autouse=True)
def references():
    register_reference("DeepseekOcr2Text", "DeepseekOcr2TextPreTrainedModel", "DeepseekOcr2TextModel", _TIED)
    register_reference("UnlimitedOcrText", "UnlimitedOcrTextPreTrainedModel", "UnlimitedOcrTextModel", _TIED)


SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=2, routed_scaling_factor=1.5, max_position_embeddings=64,
             mlp_layer_types=["dense", "sparse", "sparse"])  # fmt: skip
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# greedy routing, a dense first layer
GREEDY = Family("DeepseekOcr2TextConfig", SIZES, lora_targets=_TARGETS)
# group-limited routing (2 of 4 groups by their best probability), biases everywhere, a sparse first layer, and a
# head_dim in config.json that transformers (and autolm) overrule with hidden / heads
GROUPED = Family("DeepseekOcr2TextConfig",
                 dict(SIZES, topk_method="group_limited_greedy", n_group=4, topk_group=2, attention_bias=True,
                      mlp_bias=True, mlp_layer_types=["sparse", "dense", "sparse"], head_dim=8,
                      rope_parameters=dict(rope_type="default", rope_theta=500.0)),
                 lora_targets=_TARGETS)  # fmt: skip
FAMILIES = {"greedy": GREEDY, "grouped": GROUPED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    GROUPED.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GREEDY.check_compiled_step(tmp_path_factory, home)


def test_bf16_lora_quantized(tmp_path_factory, tmp_path):
    GROUPED.check_bf16(tmp_path_factory)
    GROUPED.check_lora(tmp_path_factory, tmp_path)
    GREEDY.check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes, its files' names (the experts stacked) and its config.json written back."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.2.mlp.experts.gate_up_proj" in saved


def test_default_config_is_transformers():
    """DeepseekOcr2TextConfig() and UnlimitedOcrTextConfig() hold transformers' defaults (DeepSeek-OCR 2's
    num_experts_per_tok, null there, aside); initializer_range and pretraining_tp, kept only where given, aside."""
    import transformers

    from autolm.models.deepseek_ocr2 import DeepseekOcr2TextConfig, UnlimitedOcrTextConfig

    check_config_defaults(UnlimitedOcrTextConfig)
    kinds = ["dense"] + ["sparse"] * 31
    theirs = json.loads(
        transformers.DeepseekOcr2TextConfig(num_experts_per_tok=6, mlp_layer_types=kinds).to_json_string()
    )
    for key in ("transformers_version", "initializer_range", "pretraining_tp"):
        theirs.pop(key)
    assert DeepseekOcr2TextConfig(mlp_layer_types=kinds).to_dict() == theirs
    # first_k_dense_replace (DeepSeek's spelling) as transformers' Unlimited-OCR reads it
    ours = UnlimitedOcrTextConfig.from_dict(dict(num_hidden_layers=4, first_k_dense_replace=2))
    assert (
        ours.mlp_layer_types
        == transformers.UnlimitedOcrTextConfig(num_hidden_layers=4, first_k_dense_replace=2).mlp_layer_types
    )


def test_config_errors_name_the_key():
    from autolm.models.deepseek_ocr2 import DeepseekOcr2TextConfig, UnlimitedOcrTextConfig

    small = dict(hidden_size=64, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                 num_hidden_layers=2, mlp_layer_types=["dense", "sparse"])  # fmt: skip
    DeepseekOcr2TextConfig(**small)
    for key, bad in (("mlp_layer_types", ["dense"]), ("mlp_layer_types", ["dense", "moe"]), ("topk_method", "noaux_tc"),
                     ("num_experts_per_tok", 9), ("n_shared_experts", 0), ("routed_scaling_factor", 0),
                     ("first_k_dense_replace", -1)):  # fmt: skip
        d = {**small, key: bad}
        if key == "first_k_dense_replace":
            d.pop("mlp_layer_types")
        with pytest.raises(autolm.ConfigError, match=key):
            DeepseekOcr2TextConfig.from_dict(d)
    grouped = {**small, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
    DeepseekOcr2TextConfig.from_dict(grouped)
    with pytest.raises(autolm.ConfigError, match="n_group"):
        DeepseekOcr2TextConfig.from_dict({**grouped, "n_group": 3})
    with pytest.raises(autolm.ConfigError, match="mlp_layer_types"):
        autolm.AutoModelForCausalLM.from_config(DeepseekOcr2TextConfig(**{**small, "mlp_layer_types": None}))
    with pytest.raises(autolm.ConfigError, match="sliding_window"):
        UnlimitedOcrTextConfig.from_dict({**small, "num_key_value_heads": 4, "sliding_window": None})


# ---- the image-text checkpoints ------------------------------------------------------------------------------------

TEXT = dict(SIZES, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SAM = dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
           mlp_dim=32, global_attn_indexes=[0], window_size=2, downsample_channels=[16, 32])  # fmt: skip
OCR2_VISION = dict(sam_config=SAM, encoder_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=16))  # fmt: skip
UNLIMITED_VISION = dict(sam_config=SAM, encoder_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=16, patch_size=4))  # fmt: skip
CASES = {
    "deepseek_ocr2": ("DeepseekOcr2", dict(text_config=TEXT, vision_config=OCR2_VISION), "DeepseekOcr2TextForCausalLM"),
    "deepseek_ocr2_tied": ("DeepseekOcr2", dict(text_config=dict(TEXT, topk_method="group_limited_greedy", n_group=2,
                           topk_group=1), vision_config=OCR2_VISION, tie_word_embeddings=True),
                           "DeepseekOcr2TextForCausalLM"),
    # its reference sliding window wider than the 6 tokens generated: causal attention throughout
    "unlimited_ocr": ("UnlimitedOcr", dict(text_config=dict(TEXT, sliding_window=16), vision_config=UNLIMITED_VISION),
                      "UnlimitedOcrTextForCausalLM"),
}  # fmt: skip


def _checkpoint(tmp_path_factory, name: str):
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
    return str(directory), model.eval()


@pytest.mark.parametrize("name", CASES)
def test_language_model_is_the_image_text_models(name, tmp_path_factory, tmp_path):
    """The checkpoint (the original layout transformers writes) loads as the text family with the image-text
    model's logits over a left-padded batch, head tying and greedy tokens; saved, the text model loads in
    transformers with the same logits."""
    check_language_model(*_checkpoint(tmp_path_factory, name), CASES[name][2], tmp_path)


def test_unlimited_ocr_window_and_original_config(tmp_path_factory, tmp_path):
    """Unlimited-OCR's reference sliding window of 4: the first 5 generated tokens are transformers' (autolm attends
    causally throughout, as R-SWA does that far); its original config.json (language_config, sliding_window at the
    top) reads as transformers' does."""
    import transformers

    from autolm.models.deepseek_ocr2 import UnlimitedOcrConfig

    config = transformers.UnlimitedOcrConfig(
        text_config=dict(TEXT, sliding_window=4), vision_config=UNLIMITED_VISION
    )
    torch.manual_seed(0)
    hf = transformers.UnlimitedOcrForConditionalGeneration(config).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "w4")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "w4")
    assert model.config.sliding_window == 4 and not _tied(model)
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    prompt = ids[:1, -9:]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), theirs)
    original = config.to_dict()
    text = original.pop("text_config")
    original.update(
        language_config={k: v for k, v in text.items() if k != "sliding_window"}, sliding_window=4
    )
    ours = UnlimitedOcrConfig.from_dict(original)
    theirs_config = transformers.UnlimitedOcrConfig(
        **{k: v for k, v in original.items() if k != "model_type"}
    )
    assert ours.sliding_window == theirs_config.text_config.sliding_window == 4
    assert ours.mlp_layer_types == theirs_config.text_config.mlp_layer_types
