"""IDEFICS 1's language model (model_type idefics) against transformers and peft on text: LLaMA's layers with a
gated cross-attention block before every cross_layer_interval-th layer, whose MLP still runs on text (its
cross-attention's output zeroed), and the decoupled embeddings / head (additional_vocab_size).

transformers' IdeficsForVisionText2Text refuses input without an image: the reference here (IdeficsTextOnly, an
adapter) passes a dummy image (image_encoder_embeddings of zeros) with an all-zero image_attention_mask, which is
transformers' text-only path (no token attends to an image). transformers has no AutoModelForCausalLM for idefics,
so the checkpoints are built and loaded through the adapter (IdeficsFamily.hf_auto). llama.cpp has no IDEFICS 1:
no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import VOCAB, padded_batch
from family_checks import Family, check_config_defaults
from safetensors import safe_open

import autolm
from autolm import step
from autolm.errors import ConfigError, GenerationError
from autolm.models.idefics import IdeficsConfig, IdeficsForCausalLM


class IdeficsTextOnly(transformers.IdeficsForVisionText2Text):
    """transformers' model on text: without an image given, a dummy one no token attends to."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, pixel_values=None, image_encoder_embeddings=None, perceiver_embeddings=None,
                image_attention_mask=None, **kwargs):  # fmt: skip
        x = input_ids if input_ids is not None else inputs_embeds
        B, T = x.shape[:2]
        if pixel_values is None and image_encoder_embeddings is None and perceiver_embeddings is None:
            width = self.config.vision_config.embed_dim
            image_encoder_embeddings = torch.zeros(B, 1, 1, width, dtype=self.dtype)
        if image_attention_mask is None:
            image_attention_mask = torch.zeros(B, T, 1, dtype=torch.long)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                               pixel_values=pixel_values, image_encoder_embeddings=image_encoder_embeddings,
                               perceiver_embeddings=perceiver_embeddings, image_attention_mask=image_attention_mask,
                               **kwargs)  # fmt: skip


class IdeficsFamily(Family):
    def hf_auto(self) -> type:
        return IdeficsTextOnly


VISION = dict(embed_dim=24, image_size=28, patch_size=14, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2)  # fmt: skip
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=64, vision_config=VISION)  # fmt: skip
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]  # peft has no default for idefics
HF = "IdeficsForVisionText2Text"
# a gated block before every layer, float alphas, no additional vocabulary
IDEFICS = IdeficsFamily("IdeficsConfig", SIZES, hf_class=HF, lora_targets=TARGETS)
# a block every second layer, vector alphas, q/k layer norms, the decoupled vocabulary (8 more ids), the perceiver
# (skipped on load), another RoPE base and epsilon
VARIANT = IdeficsFamily(
    "IdeficsConfig",
    dict(SIZES, cross_layer_interval=2, alpha_type="vector", qk_layer_norms=True, additional_vocab_size=8,
         use_resampler=True, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
         perceiver_config=dict(resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8, resampler_n_latents=4)),
    hf_class=HF,
)  # fmt: skip
# the decoupled vocabulary tied: both pairs of embeddings and head
TIED = IdeficsFamily(
    "IdeficsConfig", dict(SIZES, additional_vocab_size=8, tie_word_embeddings=True), hf_class=HF
)
FAMILIES = {"idefics": IDEFICS, "variant": VARIANT, "tied": TIED}


def _ids_with_extra(mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """ids where some real tokens are additional ones (VOCAB and up)."""
    ids = ids.clone()
    ids[:, -3:-1] = torch.tensor([VOCAB + 1, VOCAB + 7])
    return ids


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", ["variant", "tied"])
def test_additional_vocabulary(tmp_path_factory, name):
    """Ids from vocab_size up take the additional embeddings; the logits cover vocab_size + additional_vocab_size."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    ids = _ids_with_extra(mask, ids)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask).logits
    assert ours.shape[-1] == VOCAB + 8
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
    if name == "tied":
        assert model.lm_head.additional_fc.weight is model.model.embed_tokens.additional_embedding.weight


def test_generate(tmp_path_factory):
    VARIANT.check_generate(tmp_path_factory)


def test_bf16_and_hidden_states(tmp_path_factory):
    """bf16 as close as transformers'; hidden_states: each decoder layer's input (after its gated block) and the
    final norm's output, as transformers records them."""
    IDEFICS.check_bf16(tmp_path_factory)
    VARIANT.check_hidden_states(tmp_path_factory)


def test_one_token_step_and_no_compiled_graphs(tmp_path_factory):
    """The eager one-token step runs the gated blocks (the general forward's tokens and logits); the compiled
    step's per-layer graphs cannot hold the blocks beside model.layers, so the model refuses them."""
    VARIANT.check_one_token_step(tmp_path_factory)
    directory, _ = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert not step.compilable(model)


def test_lora(tmp_path_factory, tmp_path):
    """LoRA on q/v and the MLPs (the gated blocks' too, as peft targets them) as peft's."""
    IDEFICS.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    IDEFICS.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_files(tmp_path_factory, tmp_path, name):
    """Saved (check_save: transformers' model loads it with equal logits, autolm bit-identical): the state dict is
    transformers' less the vision tower and perceiver (names and shapes), the file holds every tensor of the
    language model (the gated blocks', the decoupled embeddings' and head's) and no tower; config.json as read."""
    family = FAMILIES[name]
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    tower = ("model.vision_model.", "model.perceiver_resampler.")
    text = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not k.startswith(tower)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == text
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    if model.config.tie_word_embeddings:
        text = {k: v for k, v in text.items() if k not in ("lm_head.weight", "lm_head.additional_fc.weight")}
    assert saved == set(text) and "model.gated_cross_attn_layers.0.alpha_dense" in saved
    written, original = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
    for d in (written, original):
        d.pop("transformers_version", None)
    assert written == original


def test_disk_offload(tmp_path_factory, tmp_path):
    IDEFICS.check_disk_offload(tmp_path_factory, tmp_path)


def test_gated_blocks_run_on_text_and_images_are_refused(tmp_path_factory):
    """The gated blocks' MLPs change the logits on text, their cross-attentions do not; image inputs are refused
    by name."""
    directory, _ = IDEFICS.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with safe_open(f"{directory}/model.safetensors", "pt") as f:
        assert any(k.startswith("model.vision_model.") for k in f.keys())  # noqa: SIM118 - the tower is there
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        block = model.model.gated_cross_attn_layers[1]
        for p in [
            *block.cross_attn.parameters(),
            *block.input_layernorm.parameters(),
            block.alpha_cross_attn,
        ]:
            p.mul_(3.0).add_(0.5)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, before, atol=0, rtol=0)
        block.alpha_dense.add_(0.5)
        assert not torch.allclose(model(ids, attention_mask=mask).logits, before)
    for key, value in (("pixel_values", torch.zeros(3, 1, 3, 28, 28)),
                       ("image_encoder_embeddings", torch.zeros(3, 1, 1, 24)),
                       ("image_attention_mask", torch.ones(3, 13, 1))):  # fmt: skip
        with pytest.raises(GenerationError, match=key):
            model(ids, **{key: value})
    model(ids, image_attention_mask=torch.zeros(3, 13, 1))  # no token attends to an image: text


def test_config_defaults_and_errors(tmp_path):
    """IdeficsConfig() holds transformers' defaults; config.json round-trips (vision_config kept); bad values raise
    ConfigError naming the key."""
    check_config_defaults(IdeficsConfig)
    config = IdeficsConfig.from_dict(dict(SIZES, vocab_size=VOCAB))
    assert config.vision_embed_dim == 24 and IdeficsConfig().vision_embed_dim == 768
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["vision_config"] == VISION and "num_key_value_heads" not in written
    assert IdeficsConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    theirs = transformers.IdeficsConfig.from_pretrained(tmp_path)
    assert theirs.vision_config.embed_dim == 24 and theirs.num_hidden_layers == 4
    small = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4)
    for change, key in ((dict(cross_layer_interval=3), "cross_layer_interval"),
                        (dict(cross_layer_interval=0), "cross_layer_interval"),
                        (dict(num_key_value_heads=2), "num_key_value_heads"), (dict(head_dim=8), "head_dim"),
                        (dict(additional_vocab_size=-1), "additional_vocab_size"),
                        (dict(alpha_type="matrix"), "alpha_type"), (dict(alpha_initializer="x"), "alpha_initializer"),
                        (dict(qk_layer_norms="yes"), "qk_layer_norms"), (dict(dropout=2), "dropout"),
                        (dict(vision_config=dict(embed_dim=0)), "vision_config")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            IdeficsConfig.from_dict({**small, **change})
    assert type(autolm.AutoModelForCausalLM.from_config(config)) is IdeficsForCausalLM
