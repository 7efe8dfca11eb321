"""Cosmos3 Edge's language model (cosmos3_edge_text; cosmos3_edge: the image-text checkpoints) against transformers'
Cosmos3EdgeForConditionalGeneration (a tiny SigLIP 2 tower; transformers has no text-only causal LM: its
Cosmos3EdgeTextModel carries the head's hidden states) and peft. Llama's attention with Qwen3-VL's multimodal RoPE
(plain RoPE over halves on text) and CLIP's ReLU-squared fc1 / fc2 MLP, head_dim 16 over 64 / 4 heads; a variant with
q/k/v/o and MLP biases, GELU, as many KV heads as heads and tie_word_embeddings set (transformers ties no weights of
the image-text model all the same). The battery, the files' own layout (the
language model at the top level, diffusers' attention names, up_proj / down_proj; the generator's tensors skipped),
the text model saved (transformers' Cosmos3EdgeTextModel loads it), the config as transformers reads it (defaults, the
tie rule, the checks on the RoPE). llama.cpp has no Cosmos3 Edge architecture: no GGUF layout."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models import Cosmos3EdgeConfig, Cosmos3EdgeTextConfig

# transformers maps cosmos3_edge to no causal-LM auto class; its image-text model is the causal LM the battery runs
transformers.AutoModelForCausalLM.register(
    transformers.Cosmos3EdgeConfig, transformers.Cosmos3EdgeForConditionalGeneration, exist_ok=True
)
VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
              num_patches=16)  # fmt: skip
TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]}
TEXT = dict(TOKENS, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_parameters=ROPE)  # fmt: skip
_TARGETS = [
    "o_proj"
]  # peft has no default for cosmos3_edge; the tower's attention and MLP share the other names
COSMOS = Family("Cosmos3EdgeConfig", dict(text_config=TEXT, vision_config=VISION, projector_hidden_size=32),
                lora_targets=_TARGETS)  # fmt: skip
VARIANT = Family(
    "Cosmos3EdgeConfig",
    dict(text_config=dict(TEXT, attention_bias=True, mlp_bias=True, num_key_value_heads=4, hidden_act="gelu",
                          head_dim=32, rope_parameters={**ROPE, "mrope_section": [8, 4, 4]}),
         vision_config=VISION, projector_hidden_size=32, tie_word_embeddings=True),
    lora_targets=_TARGETS,
)  # fmt: skip
FAMILIES = {"cosmos": COSMOS, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    COSMOS.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    VARIANT.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    """An adapter peft made on the image-text model (model.language_model.* names) gives peft's logits in autolm, and
    merged the same. (autolm saves adapters under the text model's names, which transformers' wrapper does not map
    back from Cosmos3 Edge's top-level file layout: that direction is test_lora_on_the_mlp's, over the text model.)"""
    import peft
    from family_checks import _randomize_lora

    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    ids, mask = padded_batch(seed=5)
    real = mask.bool()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS))
    _randomize_lora(pm)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    pm.unload()
    ours = autolm.PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory),
                                            str(tmp_path / "peft"))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )
        merged = ours.merge_and_unload()(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


def test_lora_on_the_mlp(tmp_path_factory, tmp_path):
    """An adapter of autolm's on fc1 / fc2 and q_proj (names the vision tower shares, so not made in peft on the
    image-text model) gives, in peft over transformers' text model with the saved head, the same logits; merged and
    saved, autolm's logits."""
    import peft
    from safetensors.torch import load_file, save_file

    model = autolm.AutoModelForCausalLM.from_pretrained(COSMOS.checkpoint(tmp_path_factory)[0])
    ours = autolm.get_peft_model(
        model, autolm.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1", "fc2"])
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = ours(ids, attention_mask=mask).logits[real]
    ours.save_pretrained(tmp_path / "adapter")
    ours.merge_and_unload().save_pretrained(tmp_path / "merged")
    model = autolm.AutoModelForCausalLM.from_pretrained(COSMOS.checkpoint(tmp_path_factory)[0])
    model.save_pretrained(tmp_path / "text")
    text = transformers.AutoModel.from_pretrained(tmp_path / "text", attn_implementation="eager")
    # the text model is the body alone (layers.*, no model. prefix), as a base model's adapter names it
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in load_file(path).items()},
              str(path))  # fmt: skip
    adapted = peft.PeftModel.from_pretrained(text, str(tmp_path / "adapter"))
    with torch.no_grad():
        hidden = adapted(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    torch.testing.assert_close(hidden[real] @ model.lm_head.weight.T, want, atol=1e-4, rtol=1e-4)
    merged = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    COSMOS.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    COSMOS.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_text_model_is_transformers(tmp_path_factory, tmp_path, name):
    """The checkpoint as transformers writes it (the files' own layout) loads as Cosmos3EdgeForCausalLM under
    transformers' text names, the head untied whatever the config says; saved, it is the cosmos3_edge_text model:
    text_config's keys and values, transformers' Cosmos3EdgeTextModel loads it with hidden states whose head gives
    autolm's logits, and autolm loads it back bit-identical."""
    from safetensors import safe_open

    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    with safe_open(f"{directory}/model.safetensors", "pt") as f:
        assert {"layers.0.self_attn.to_q.weight", "layers.0.mlp.up_proj.weight"} <= set(f.keys())
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "Cosmos3EdgeForCausalLM" and model.config.model_type == "cosmos3_edge_text"
    prefix = "model.language_model."
    theirs = {k.replace(prefix, "model."): tuple(v.shape) for k, v in hf.state_dict().items()
              if k.startswith(prefix) or k == "lm_head.weight"}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert hf.lm_head.weight is not hf.get_input_embeddings().weight and not model.config.tie_word_embeddings
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())["text_config"]
    for d in (written, original):
        for key in ("transformers_version", "architectures", "dtype", "tie_word_embeddings"):
            d.pop(key, None)
    assert written == original
    text = transformers.AutoModel.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    assert type(text).__name__ == "Cosmos3EdgeTextModel"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        hidden = text(ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state[real]
        torch.testing.assert_close(ours, hidden @ model.lm_head.weight.T, atol=1e-4, rtol=1e-4)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())


def test_generator_tensors_are_skipped(tmp_path_factory, tmp_path):
    """The Hub's files carry the Cosmos world model's generator (action and time embeddings, the MoE-generation
    branch's norms, MLPs and attention projections), which transformers drops: autolm skips them with the same
    logits."""
    from safetensors.torch import load_file, save_file

    directory, hf = COSMOS.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "gen")
    tensors = load_file(f"{directory}/model.safetensors")
    names = ["action_modality_embed", "action_proj_in.fc.weight", "time_embedder.linear_1.weight", "proj_in.weight",
             "norm_moe_gen.weight", "layers.0.input_layernorm_moe_gen.weight", "layers.1.mlp_moe_gen.up_proj.weight",
             "layers.0.self_attn.add_q_proj.weight", "layers.1.self_attn.to_add_out.weight",
             "layers.0.self_attn.norm_added_k.weight"]  # fmt: skip
    extra = {name: torch.zeros(4, 64) for name in names}
    save_file({**tensors, **extra}, str(tmp_path / "gen" / "model.safetensors"), metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "gen")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_config_as_transformers_reads_it():
    """Cosmos3EdgeTextConfig() holds transformers' defaults (RoPE base 1e8 with its sections, also where config.json
    names no RoPE); the head is never tied (transformers' image-text model ties no weights); a RoPE type other than
    default, or sections not summing to head_dim / 2, name the key."""
    check_config_defaults(Cosmos3EdgeTextConfig)
    assert Cosmos3EdgeTextConfig().rope_parameters == transformers.Cosmos3EdgeTextConfig().rope_parameters
    no_rope = {k: v for k, v in TEXT.items() if k != "rope_parameters"}
    assert Cosmos3EdgeTextConfig.from_dict(dict(no_rope, head_dim=128)).rope_parameters["mrope_section"] == [
        24,
        20,
        20,
    ]
    for outer, text in ((None, None), (None, True), (True, False), (True, True)):
        d = {"text_config": dict(TEXT, **({} if text is None else {"tie_word_embeddings": text}))}
        if outer is not None:
            d["tie_word_embeddings"] = outer
        assert Cosmos3EdgeConfig.from_dict(d).tie_word_embeddings is False, (outer, text)
    for rope, key in (({**ROPE, "rope_type": "linear", "factor": 2.0}, "rope_type"),
                      ({**ROPE, "mrope_section": [4, 2, 1]}, "mrope_section"),
                      ({k: v for k, v in ROPE.items() if k != "mrope_section"}, "mrope_section")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            Cosmos3EdgeTextConfig.from_dict(dict(TEXT, rope_parameters=rope))
