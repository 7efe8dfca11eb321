"""GIT (GitForCausalLM, which transformers' AutoModelForCausalLM and AutoModelForImageTextToText both give) on text
alone, against transformers and peft: word + learned positions + LayerNorm, BERT's post-LN layers run causally, the
biased head `output` (untied by default, tied where asked), positions without position_ids as the cache's slots,
generate (transformers' cached decode of a left-padded batch widens the mask by the image's patches, so its
uncached tokens are the reference there), the one-token and compiled steps, LoRA (query/value: peft has no
default for the type), int8, saves transformers loads (the image tower skipped on load, vision_config kept),
config defaults, refusals of image inputs. llama.cpp has no GIT: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import VOCAB, padded_batch
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, GenerationError

_VISION = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=8,
               patch_size=4)  # fmt: skip
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, vision_config=_VISION)  # fmt: skip


# defaults (gelu, untied head); a variant with gelu_new, a tied head, a larger epsilon and video frames' embeddings
GIT = Family("GitConfig", _SMALL)
GIT_X = Family("GitConfig", dict(_SMALL, hidden_act="gelu_new", tie_word_embeddings=True, layer_norm_eps=1e-5,
                                 num_image_with_embedding=2))  # fmt: skip
FAMILIES = {"git": GIT, "git_x": GIT_X}
_IMAGE = ("git.image_encoder.", "git.visual_projection.", "git.img_temporal_embedding.")


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_default_positions(tmp_path_factory, name):
    """A left-padded batch's logits equal transformers' with the padding mask's positions and without any (then
    the cache's slots, padding included); inputs_embeds; a cached step of an unpadded batch."""
    FAMILIES[name].check_logits(tmp_path_factory)
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (name == "git_x")
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
        emb = hf.get_input_embeddings()(ids[:1])
        torch.testing.assert_close(model(inputs_embeds=emb).logits, hf(inputs_embeds=emb).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
        row = ids[:1]
        a, b = model(row, use_cache=True), hf(row, use_cache=True)
        nxt = torch.tensor([[5]])
        torch.testing.assert_close(model(nxt, past_key_values=a.past_key_values).logits,
                                   hf(nxt, past_key_values=b.past_key_values).logits, atol=1e-4, rtol=1e-4)  # fmt: skip


def test_generate(tmp_path_factory):
    """Greedy and beam search: an unpadded prompt gives transformers' tokens; a left-padded batch gives
    transformers' uncached tokens (its cached decode reads a mask widened by image_patch_tokens: see the module's
    doc of autolm/models/git.py; the assertion on its cached tokens pins that difference)."""
    directory, hf = GIT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5))
    for kwargs in (dict(max_new_tokens=10), dict(max_new_tokens=6, num_beams=3)):
        ours = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        theirs = hf.generate(ids, attention_mask=mask, do_sample=False, use_cache=False, **kwargs)
        assert torch.equal(ours, theirs), kwargs
        row = ids[:1]
        assert torch.equal(model.generate(row, do_sample=False, **kwargs),
                           hf.generate(row, do_sample=False, **kwargs)), kwargs  # fmt: skip
    cached = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert torch.equal(cached[0], greedy[0]) and not torch.equal(cached[1], greedy[1])


def test_loss_on_text(tmp_path_factory):
    """labels: the next-token loss over the text (transformers' own drops image_patch_tokens logits first, image
    or not, and fails on text alone: pinned, with autolm's loss equal to the shifted cross-entropy of its logits)."""
    directory, hf = GIT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="batch_size"):
        hf(ids, labels=ids)
    with torch.no_grad():
        logits = hf(ids).logits
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
        )
        torch.testing.assert_close(model(ids, labels=ids).loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GIT.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_both_ways(tmp_path_factory, tmp_path, name):
    """query/value adapters (peft has no default for the type) peft made give peft's logits here (the padding
    mask's positions given to both: GIT's own default is the slots), autolm's load in peft with the same logits
    in transformers' names, and merging changes nothing."""
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path, targets=["query", "value"], slots=True)


def test_int8_bf16_and_disk_offload(tmp_path_factory, tmp_path):
    GIT.check_quantized(tmp_path_factory, "int8")
    GIT.check_bf16(tmp_path_factory)
    GIT.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_round_trip(tmp_path_factory, tmp_path, name):
    """Saved files load in transformers (AutoModelForCausalLM and AutoModelForImageTextToText) with equal logits and
    back here bit-identical; state_dict() holds transformers' names, all but the image tower's; config.json keeps
    vision_config as given and writes no image weights."""
    family = FAMILIES[name]
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ours, theirs = set(model.state_dict()), set(hf.state_dict())
    assert ours <= theirs and all(k.startswith(_IMAGE) for k in theirs - ours)
    assert any(k.startswith("git.image_encoder.") for k in theirs) and "output.bias" in ours
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "git" and saved["vision_config"]["image_size"] == 8
    other = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert type(other).__name__ == "GitForCausalLM"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real],
                                   other(ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4)  # fmt: skip


def test_config_defaults_and_round_trip(tmp_path_factory, tmp_path):
    """Defaults equal transformers' GitConfig; config.json round-trips (layer_norm_eps by its name, vision_config
    and num_image_with_embedding kept); bad values are ConfigErrors naming the field."""
    from autolm.models.git import GitConfig

    check_config_defaults(GitConfig)
    directory, _ = GIT_X.checkpoint(tmp_path_factory)
    config = autolm.AutoConfig.from_pretrained(directory)
    config.save_pretrained(tmp_path)
    assert autolm.AutoConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert config.layer_norm_eps == 1e-5 and config.num_image_with_embedding == 2
    assert config.vision_config["patch_size"] == 4
    for bad, field in ((dict(num_image_with_embedding=0), "num_image_with_embedding"),
                       (dict(vision_config=3), "vision_config"), (dict(layer_norm_eps=-1.0), "layer_norm_eps")):  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            GitConfig.from_dict({**config.to_dict(), **bad})


def test_refusals(tmp_path_factory):
    """Image inputs and token_type_ids are refused by name; a position past the table is a clear error; heads
    other than the causal LM are refused."""
    directory, _ = GIT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, _ = padded_batch()
    with pytest.raises(GenerationError, match="pixel_values"):
        model(ids, pixel_values=torch.zeros(3, 3, 8, 8))
    with pytest.raises(GenerationError, match="pixel_values"):
        model.generate(ids[:1], pixel_values=torch.zeros(1, 3, 8, 8), max_new_tokens=2)
    with pytest.raises(GenerationError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        model(ids, position_ids=torch.full_like(ids, 64))
    with pytest.raises(ConfigError, match="causal LM only"):
        autolm.AutoModelForSequenceClassification.from_pretrained(directory)


def test_resize_token_embeddings_as_transformers(tmp_path_factory):
    """Resized by 5 rows (mean_resizing off): the head's bias as transformers resizes it, the old logits kept."""
    directory, _ = GIT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory)
    hf.resize_token_embeddings(VOCAB + 5, mean_resizing=False)
    model.resize_token_embeddings(VOCAB + 5, mean_resizing=False)
    torch.testing.assert_close(model.lm_head.bias, hf.get_output_embeddings().bias)
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape[-1] == VOCAB + 5
    torch.testing.assert_close(after[..., :VOCAB], before)
