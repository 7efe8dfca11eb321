"""Kosmos-2's language model (kosmos_2_text_model) against transformers and peft: embeddings (and given
inputs_embeds) times sqrt(embed_dim), XGLM's sinusoidal positions read from row pad_token_id + 1 on, the heads'
output normed by inner_attn_ln before out_proj, the activated fc1 output normed by ffn_layernorm before fc2, a final
layer_norm and a tied head; the standard battery, config.json in transformers' names, refused configs; the
image-text model (kosmos-2, Kosmos2ForConditionalGeneration) with a tiny vision tower read as its language model,
its head tying and image inputs refused by name. llama.cpp has no Kosmos-2: no GGUF.

transformers' Kosmos2TextForCausalLM reads explicit position_ids as rows of its table (the positions plus
pad_token_id + 1), autolm's as positions from 0 (as every family's): the battery's checks that pass position_ids to
transformers run it through `_Rows`, which gives it those rows. test_logits and the generation tests call
transformers as a user does (no position_ids: its own numbering from input_ids)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, randomize
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, GenerationError


def _text_class(name: str) -> type:
    """transformers' Kosmos2TextForCausalLM or Kosmos2_5TextForCausalLM (not exported at its top level)."""
    import importlib

    module = "kosmos2_5" if "2_5" in name else "kosmos2"
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


_ROWS: dict[str, type] = {}


class KosmosFamily(Family):
    """The text model's checkpoint; transformers' class (`hf_class`) taking position ids from 0 (autolm's and the
    battery's) as its table rows (those plus pad_token_id + 1)."""

    def hf_auto(self) -> type:
        if self.hf_class not in _ROWS:

            class _Rows(_text_class(self.hf_class)):
                def forward(self, *args, position_ids=None, **kwargs):
                    if position_ids is not None:
                        position_ids = position_ids + self.config.pad_token_id + 1
                    return super().forward(*args, position_ids=position_ids, **kwargs)

            _ROWS[self.hf_class] = _Rows
        return _ROWS[self.hf_class]


SMALL = dict(ffn_dim=96, layers=2, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
TARGETS = [
    "q_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
]  # peft has no default targets for kosmos_2_text_model
# kosmos-2's options: scaled embeddings, GELU, a tied head
KOSMOS = KosmosFamily("Kosmos2TextConfig", dict(SMALL, embed_dim=64, attention_heads=4), lora_targets=TARGETS,
                      hf_class="Kosmos2TextForCausalLM")  # fmt: skip
# an odd embed_dim (the sinusoids' zero column), unscaled embeddings, an untied head, ReLU, another epsilon
ODD = KosmosFamily(
    "Kosmos2TextConfig",
    dict(SMALL, embed_dim=63, attention_heads=3, scale_embedding=False, tie_word_embeddings=False,
         activation_function="relu", layer_norm_eps=1e-6),
    lora_targets=["q_proj", "fc2"], hf_class="Kosmos2TextForCausalLM",
)  # fmt: skip
# Kosmos-2.5's language model: no inner_attn_ln (query scaled before its scores), an untied head
KOSMOS_2_5 = KosmosFamily("Kosmos2_5TextConfig", dict(SMALL, embed_dim=64, attention_heads=4, tie_word_embeddings=False),
                          lora_targets=TARGETS, hf_class="Kosmos2_5TextForCausalLM")  # fmt: skip
FAMILIES = {"kosmos": KOSMOS, "odd": ODD, "kosmos_2_5": KOSMOS_2_5}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    """A left-padded batch (padding pad_token_id) gives transformers' logits where transformers numbers the
    positions from input_ids itself; with the inputs_embeds given instead (scaled as transformers scales them),
    the same logits."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], theirs, atol=1e-4, rtol=1e-4)
        row = ids[:1]
        embeds = model.get_input_embeddings()(row)
        want = hf(inputs_embeds=embeds).logits
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    """Greedy and beam search over one prompt give transformers' tokens; a left-padded batch gives each row's
    tokens as transformers generates them for the row alone (transformers' own batch counts the padding slots in
    its decode steps' positions: see autolm.models.kosmos2). The pad token is suppressed (transformers gives a
    generated pad token the zero row)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5))
    row, no_pad = ids[:1], dict(suppress_tokens=[0], do_sample=False)
    for kwargs in (dict(max_new_tokens=12, **no_pad), dict(max_new_tokens=8, num_beams=3, **no_pad)):
        theirs = hf.generate(row, attention_mask=torch.ones_like(row), **kwargs)
        assert torch.equal(model.generate(row, **kwargs), theirs), kwargs
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, **no_pad)
    for i, n in enumerate(mask.sum(-1).tolist()):
        alone = ids[i : i + 1, -n:]
        theirs = hf.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=10, **no_pad)
        assert torch.equal(batch[i, -n - 10 :], theirs[0]), i


def test_bf16(tmp_path_factory):
    KOSMOS.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    KOSMOS.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_quantized(tmp_path_factory):
    KOSMOS.check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (inner_attn_ln, ffn.ffn_layernorm, no position table); the saved
    config.json has transformers' keys and values (embed_dim, layers, ffn_dim, ...), no others."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", ["Kosmos2TextConfig", "Kosmos2_5TextConfig"])
def test_default_config_is_transformers(name):
    """The config class holds transformers' defaults; its config.json names as keyword arguments and attributes."""
    import transformers

    import autolm.models

    cls = getattr(autolm.models, name)
    theirs = json.loads(getattr(transformers, name)().to_json_string())
    theirs.pop("transformers_version")
    assert cls().to_dict() == theirs
    check_config_defaults(cls)
    ours = cls(embed_dim=64, attention_heads=4, ffn_dim=96, layers=2, layer_norm_eps=1e-6)
    assert (ours.hidden_size, ours.num_attention_heads, ours.intermediate_size, ours.num_hidden_layers,
            ours.rms_norm_eps) == (64, 4, 96, 2, 1e-6)  # fmt: skip
    assert ours.embed_dim == 64 and ours.to_dict()["layer_norm_eps"] == 1e-6


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(dropout=2.0), "dropout"),
        (dict(activation_function="swiglu"), "activation_function"),
        (dict(embed_dim=66), "embed_dim"),  # not divisible by 4 heads
        (dict(pad_token_id=None), "pad_token_id"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="kosmos_2_text_model", embed_dim=64, attention_heads=4, layers=2, vocab_size=VOCAB)
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


# ---- the image-text model -------------------------------------------------------------------------------------

TEXT = dict(SMALL, vocab_size=VOCAB, embed_dim=64, attention_heads=4, bos_token_id=0, eos_token_id=2)
VISION = {
    "Kosmos2": dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                    patch_size=4),
    "Kosmos2_5": dict(hidden_size=32, patch_embed_hidden_size=32, intermediate_size=32, head_dim=16,
                      num_hidden_layers=1, num_attention_heads=2, max_num_patches=16),
}  # fmt: skip


def _image_text(tmp_path, prefix: str, tie: bool | None):
    """A tiny Kosmos2ForConditionalGeneration / Kosmos2_5ForConditionalGeneration (pad_token_id 1, as theirs)
    saved; (directory, model)."""
    import transformers

    extra = {} if tie is None else dict(tie_word_embeddings=tie)
    text = dict(TEXT, pad_token_id=1, **extra)
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=VISION[prefix],
                                                      latent_query_num=2, **extra)  # fmt: skip
    torch.manual_seed(0)
    hf = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    randomize(hf)
    hf.tie_weights()
    hf.save_pretrained(tmp_path / prefix)
    return tmp_path / prefix, hf


@pytest.mark.parametrize("tie", [None, False])
@pytest.mark.parametrize("prefix", ["Kosmos2", "Kosmos2_5"])
def test_image_text_language_model(tmp_path, prefix, tie):
    """Kosmos-2's and Kosmos-2.5's checkpoints (vision tower, projection) load as their language model with the
    image-text model's logits on text (a left-padded batch, padding pad_token_id 1; no image embeddings at any
    place), its head tying (tied unless both configs untie it) and greedy tokens; saved, transformers' text class
    loads it with the same logits."""
    directory, hf = _image_text(tmp_path, prefix, tie)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    name = f"{prefix}TextForCausalLM"
    assert type(model).__name__ == name
    tied = hf.text_model.lm_head.weight is hf.text_model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings == tied == (tie is None)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, mask = padded_batch()
    ids[mask == 0] = 1
    real = mask.bool()
    no_image = dict(
        image_embeds=torch.zeros(len(ids), 0, 64), image_embeds_position_mask=torch.zeros_like(mask)
    )
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[real]
        theirs = hf(input_ids=ids, attention_mask=mask, **no_image).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    prompt = ids[:1, -9:]
    greedy = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[1])  # no pad token (see test_generate)
    theirs = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), image_embeds=torch.zeros(1, 0, 64),
                         image_embeds_position_mask=torch.zeros_like(prompt), **greedy)  # fmt: skip
    assert torch.equal(model.generate(prompt, **greedy), theirs)
    model.save_pretrained(tmp_path / "text")
    saved = json.loads((tmp_path / "text" / "config.json").read_text())
    assert saved["model_type"] == hf.config.text_config.model_type
    text = _text_class(name).from_pretrained(tmp_path / "text").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, text(ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4)


def test_image_inputs_are_refused(tmp_path_factory):
    """Image inputs (pixel values, Kosmos-2.5's flattened patches, image embeddings and where they go) are a
    GenerationError naming them."""
    model = autolm.AutoModelForCausalLM.from_pretrained(KOSMOS.checkpoint(tmp_path_factory)[0])
    ids = torch.tensor([[5, 6, 7]])
    for key, value in (("pixel_values", torch.zeros(1, 3, 16, 16)), ("image_embeds", torch.zeros(1, 2, 64)),
                       ("image_embeds_position_mask", torch.ones_like(ids)),
                       ("flattened_patches", torch.zeros(1, 4, 50))):  # fmt: skip
        with pytest.raises(GenerationError, match=key):
            model(ids, **{key: value})
        with pytest.raises(GenerationError, match=key):
            model.generate(ids, max_new_tokens=2, **{key: value})


def test_tensor_parallel_is_refused(tmp_path_factory):
    directory, _ = KOSMOS.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
