"""ERNIE 4.5 VL's language model (ernie4_5_vl_moe_text; ernie4_5_vl_moe: the image-text checkpoints) against
transformers' Ernie4_5_VLMoeForConditionalGeneration (a tiny vision tower and resampler; transformers has no
text-only causal LM: its Ernie4_5_VLMoeTextModel carries the head's hidden states) and peft. ERNIE 4.5 MoE's layer
with modality-split experts: text runs the text experts (transformers routes to the vision experts only tokens that
moe_mm_token_type_ids marks, which text has none of), the vision experts load and save. 3-D RoPE sections (on text,
plain interleaved RoPE: checked against transformers' tables). The battery; the checkpoint as transformers writes it
(the Hub's layout: transposed routers, one (2, experts) correction bias, text then vision experts one tensor each)
and in transformers' own layout; the saved text model that Ernie4_5_VLMoeTextModel loads, vision experts included;
the wrapper's logits over a left-padded batch (no position ids) and greedy tokens; config defaults and errors.
llama.cpp converts no ERNIE 4.5 VL model: no GGUF."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from safetensors import safe_open
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_image_text import _logits

import autolm
from autolm.errors import ConfigError, GenerationError
from autolm.models import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeTextConfig

# transformers maps ernie4_5_vl_moe to no causal-LM auto class; its image-text model is the causal LM the battery runs
transformers.AutoModelForCausalLM.register(
    transformers.Ernie4_5_VLMoeConfig, transformers.Ernie4_5_VLMoeForConditionalGeneration, exist_ok=True
)
VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, patch_size=4)
TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SIZES = dict(TOKENS, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, moe_num_experts=4, moe_k=2)  # fmt: skip
# the released shape: a dense first layer, one shared expert, the head tied, head_dim 16 with sections [2, 2, 4]
TEXT = dict(SIZES, moe_intermediate_size=[32, 16], moe_num_shared_experts=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]})  # fmt: skip
ERNIE_VL = Family(
    "Ernie4_5_VLMoeConfig",
    dict(text_config=TEXT, vision_config=VISION),
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],  # peft has no default for ernie4_5_vl_moe
)
# the rest: biases (q/k/v/o, the dense MLP), the head untied by the outer config, head_dim 32, sparse / dense /
# sparse, no shared experts, equal text and vision expert sizes, a clamp of the weights' sum at 0.8
VARIANT = Family(
    "Ernie4_5_VLMoeConfig",
    dict(text_config=dict(SIZES, head_dim=32, use_bias=True, moe_intermediate_size=[16, 16], moe_num_shared_experts=0,
                          mlp_layer_types=["sparse", "dense", "sparse"], moe_norm_min=0.8,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [4, 4, 8]}),
         vision_config=VISION, tie_word_embeddings=False),
    lora_targets=["q_proj", "o_proj"],
)  # fmt: skip
FAMILIES = {"ernie_vl": ERNIE_VL, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    ERNIE_VL.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    ERNIE_VL.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    ERNIE_VL.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    ERNIE_VL.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    ERNIE_VL.check_disk_offload(tmp_path_factory, tmp_path)


def _text_state(hf) -> dict[str, torch.Tensor]:
    """transformers' language model's tensors and head under the text model's names."""
    prefix = "model.language_model."
    return {k.replace(prefix, "model."): v for k, v in hf.state_dict().items()
            if k.startswith(prefix) or k == "lm_head.weight"}  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_layout_and_saved_text_model(tmp_path_factory, tmp_path, name):
    """transformers writes the Hub's layout (routers transposed as gate.weight / gate.weight_1, one (2, experts)
    correction bias, text experts then vision experts one tensor each); autolm reads it into transformers' text
    names and values, the vision experts included. Saved, the model is ernie4_5_vl_moe_text (text_config's keys and
    values): Ernie4_5_VLMoeTextModel loads it with every tensor equal and hidden states whose head gives autolm's
    logits; autolm loads it back bit-identical."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    layer = "model.layers.2.mlp."
    assert {layer + "gate.weight", layer + "gate.weight_1", layer + "moe_statics.e_score_correction_bias",
            layer + "experts.7.down_proj.weight"} <= stored  # fmt: skip
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "Ernie4_5_VLMoeForCausalLM"
    assert model.config.model_type == "ernie4_5_vl_moe_text"
    theirs, ours = _text_state(hf), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "ernie_vl")
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())["text_config"]
    for d in (written, original):
        for key in ("transformers_version", "architectures", "dtype", "tie_word_embeddings"):
            d.pop(key, None)
    assert written == original
    text = transformers.Ernie4_5_VLMoeTextModel.from_pretrained(
        tmp_path / "saved", attn_implementation="eager"
    )
    assert all(torch.equal(v, theirs["model." + k]) for k, v in text.state_dict().items())
    assert len(text.state_dict()) == len(theirs) - 1  # all but the head
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        hidden = text(ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state[real]
        torch.testing.assert_close(logits, hidden @ model.lm_head.weight.T, atol=1e-4, rtol=1e-4)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(v, ours[k]) for k, v in back.state_dict().items())


def test_transformers_own_layout_reads(tmp_path_factory, tmp_path):
    """A checkpoint in transformers' own layout (save_original_format=False: model.language_model.*, the experts
    stacked per modality) loads to the same tensors."""
    _, hf = VARIANT.checkpoint(tmp_path_factory)
    hf.save_pretrained(tmp_path, save_original_format=False)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        assert "model.language_model.layers.0.mlp.vision_moe.experts.gate_up_proj" in set(f.keys())
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    theirs, ours = _text_state(hf), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("name", FAMILIES)
def test_wrapper_on_text(tmp_path_factory, name):
    """The image-text model's logits over a left-padded batch, as its forward computes them without position ids
    (with the processor's all-zero token types too), and its greedy tokens from an unpadded prompt; token types that
    mark image or video tokens are refused by name."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the processor's token types for text (all zero): the same logits
        types = dict(moe_mm_token_type_ids=torch.zeros_like(ids), mm_token_type_ids=torch.zeros_like(ids))
        typed = model(input_ids=ids, attention_mask=mask, **types).logits[mask.bool()]
        torch.testing.assert_close(typed, _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    for key in types:  # image or video tokens marked: refused by name
        with pytest.raises(GenerationError, match=key):
            model(ids, **{key: torch.ones_like(ids)})
    prompt = ids[:1, -9:]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), theirs)


@pytest.mark.parametrize("name", FAMILIES)
def test_rope_is_transformers_on_text(tmp_path_factory, name):
    """transformers' 3-D RoPE tables (pre-permuted frequencies, recomposed per axis) over text positions are
    autolm's plain interleaved RoPE: each frequency twice in a row where autolm's rotate-half table holds it once."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    rotary = hf.model.language_model.rotary_emb
    for length in (8, 40):
        pos = torch.arange(length)[None]
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1), pos)
        ours = model.model.rotary.tables(pos, torch.float32)["default"]
        half = cos.shape[-1] // 2
        for a, b in ((ours[0][:, 0], cos), (ours[1][:, 0], sin)):
            torch.testing.assert_close(a[..., :half], b[..., 0::2], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(a[..., :half], b[..., 1::2], atol=1e-6, rtol=1e-6)


def test_config_defaults_tying_and_errors():
    """Ernie4_5_VLMoeTextConfig() holds transformers' defaults; the head is tied as the outer config says
    (default tied) whatever text_config says; bad values raise ConfigError naming the key."""
    theirs = json.loads(transformers.Ernie4_5_VLMoeTextConfig().to_json_string())
    for key in ("transformers_version", "architectures"):
        theirs.pop(key, None)
    ours = Ernie4_5_VLMoeTextConfig().to_dict()
    assert ours == theirs
    for outer, text in ((None, None), (False, None), (None, False), (False, True), (True, False)):
        d = {"text_config": dict(TEXT, **({} if text is None else {"tie_word_embeddings": text}))}
        if outer is not None:
            d["tie_word_embeddings"] = outer
        tied = transformers.Ernie4_5_VLMoeConfig(**copy.deepcopy(d)).tie_word_embeddings
        assert Ernie4_5_VLMoeConfig.from_dict(d).tie_word_embeddings == tied, (outer, text)
    rope = {"rope_type": "default", "rope_theta": 1e4}
    for change, key in ((dict(rope_parameters={**rope, "mrope_section": [3, 1, 4]}), "mrope_section"),
                        (dict(rope_parameters={**rope, "mrope_section": [4, 4, 0]}), "mrope_section"),
                        (dict(rope_parameters=rope), "mrope_section"),  # the default [22, 22, 20] needs head_dim 128
                        (dict(rope_parameters={**rope, "rope_type": "linear", "factor": 2.0}), "RoPE type"),
                        (dict(moe_intermediate_size=32), "moe_intermediate_size"),
                        (dict(mlp_layer_types=["dense", "moe", "sparse"]), "mlp_layer_types"),
                        (dict(mlp_layer_types=["dense"]), "mlp_layer_types"),
                        (dict(moe_k=5), "moe_k"), (dict(moe_norm_min=0), "moe_norm_min")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            Ernie4_5_VLMoeTextConfig.from_dict({**TEXT, **change})


def test_experts_summary_counts_the_text_experts(tmp_path_factory):
    """`autolm inspect`'s experts line: the sparse layers' text experts, the vision experts wholly unused on text."""
    from autolm.nn.moe import experts_summary

    path, _ = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    per_expert = 3 * 64 * 16  # gate, up and down of one expert (hidden 64, experts 16 wide)
    # two sparse layers: 2 of 4 text experts unused, and every vision expert
    unused = 2 * ((4 - 2) + 4) * per_expert
    assert experts_summary(model, params) == (2, 4, 2, params - unused)
