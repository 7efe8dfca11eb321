"""Gemma 4 unified (text, and the encoder-free image-text checkpoints' language model) against transformers and peft:
the family battery on two tiny checkpoints. DENSE: sliding and full layers, the full ones with their own head size
and one KV head (global_head_dim, num_global_key_value_heads), their values their keys (attention_k_eq_v),
proportional RoPE with a partial rotary factor and a factor, final soft-capping, a window shorter than the prompts.
SHARED: the last two layers reading the keys and values of the last earlier layer of their type, double-wide MLPs
there. Also: random layer_scalar values, Gemma 4's per-layer-input and expert keys in config.json left unused as
transformers leaves them, the image-text checkpoint (its vision embedder skipped), the config's defaults and errors,
and GGUF out as llama.cpp's converter writes it (arch "gemma4", read back as Gemma 4's text model); test_gguf_out and
test_gguf_llamacpp run the same files through the converter mimic and llama.cpp."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, randomize
from family_checks import Family, same_logits
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_gemma4_gguf import write_gemma4_gguf
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
}
_SIZES = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64, sliding_window=4, final_logit_softcapping=10.0, global_head_dim=32,
              layer_types=["sliding_attention", "full_attention"] * 2, num_hidden_layers=4)  # fmt: skip
_TARGETS = ["q_proj", "v_proj"]  # peft has no default for gemma4_unified_text
DENSE = Family("Gemma4UnifiedTextConfig", dict(_SIZES, num_global_key_value_heads=1, attention_k_eq_v=True,
                                               rope_parameters={**_ROPE, "full_attention": {**_ROPE["full_attention"],
                                                                                            "factor": 2.0}}),
               lora_targets=_TARGETS)  # fmt: skip
SHARED = Family("Gemma4UnifiedTextConfig", dict(_SIZES, num_kv_shared_layers=2, use_double_wide_mlp=True,
                                                rope_parameters=_ROPE), lora_targets=_TARGETS)  # fmt: skip
# llama.cpp's graph has no proportional RoPE factor
GGUF_FAMILIES = {"dense": Family(DENSE.config_cls, dict(DENSE.kwargs, rope_parameters=_ROPE), lora_targets=_TARGETS),
                 "shared": SHARED}  # fmt: skip
FAMILIES = {"dense": DENSE, "shared": SHARED}
families = pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))


@families
def test_logits_generate_and_one_token_step(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)
    family.check_generate(tmp_path_factory)
    family.check_one_token_step(tmp_path_factory)


def test_bf16(tmp_path_factory):
    DENSE.check_bf16(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    DENSE.check_compiled_step(tmp_path_factory, home)


@families
def test_lora(family, tmp_path_factory, tmp_path):
    family.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(bits, tmp_path_factory):
    DENSE.check_quantized(tmp_path_factory, bits)


@families
def test_save(family, tmp_path_factory, tmp_path):
    """The save round trip; the state dict's names and config.json's keys are transformers'."""
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "Gemma4UnifiedForCausalLM"
    assert model._no_split_modules == {"Gemma4UnifiedTextDecoderLayer"} == set(hf._no_split_modules)
    assert {type(layer).__name__ for layer in model.model.layers} == {"Gemma4UnifiedTextDecoderLayer"}
    assert set(model.state_dict()) == set(hf.state_dict())
    model.save_pretrained(tmp_path / "again")
    ours = json.loads((tmp_path / "again" / "config.json").read_text())
    theirs = json.loads(open(f"{directory}/config.json").read())
    assert set(ours) - {"transformers_version"} == set(theirs) - {"transformers_version"}
    for key in ("per_layer_config", "rope_parameters", "use_bidirectional_attention", "model_type"):
        assert ours[key] == theirs[key], key


def test_disk_offload(tmp_path_factory, tmp_path):
    SHARED.check_disk_offload(tmp_path_factory, tmp_path)


def _transformers_checkpoint(tmp_path, kwargs, image_text=False, extra=None):
    """A transformers Gemma 4 unified checkpoint with random weights and layer_scalar values; `image_text`: the
    image-text model with tiny vision and audio embedders; `extra`: keys added to (text_)config.json after."""
    import transformers

    text = transformers.Gemma4UnifiedTextConfig(
        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs
    )
    torch.manual_seed(0)
    if image_text:
        vision = dict(
            patch_size=2, pooling_kernel_size=1, mm_embed_dim=8, mm_posemb_size=4, output_proj_dims=8
        )
        config = transformers.Gemma4UnifiedConfig(text_config=text.to_dict(), vision_config=vision,
                                                  audio_config=dict(audio_embed_dim=8))  # fmt: skip
        model = transformers.Gemma4UnifiedForConditionalGeneration(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(text)
    randomize(model)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                buf.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    if extra:
        d = json.loads((tmp_path / "config.json").read_text())
        (d["text_config"] if image_text else d).update(extra)
        (tmp_path / "config.json").write_text(json.dumps(d))
    return model.eval()


_GEMMA4_ONLY = dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, enable_moe_block=True,
                    num_experts=4, top_k_experts=2, moe_intermediate_size=32)  # fmt: skip


def test_layer_scalar_and_gemma4_keys_left_unused(tmp_path):
    """Each layer's output times its layer_scalar; Gemma 4's per-layer-input and expert keys in config.json build
    nothing (transformers' unified model has neither) and are written back as given."""
    import transformers

    hf = _transformers_checkpoint(tmp_path / "hf", SHARED.kwargs, extra=_GEMMA4_ONLY)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert float(model.model.layers[0].layer_scalar) != 1.0
    assert not model.model.per_layer_dim and not model.config.enable_moe_block
    same_logits(model, hf)
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: saved[k] for k in _GEMMA4_ONLY} == _GEMMA4_ONLY


def test_image_text_checkpoint(tmp_path):
    """model_type gemma4_unified: the language model of Gemma4UnifiedForConditionalGeneration (its vision
    embedder's and audio projection's tensors skipped), saved as the text model transformers loads."""
    import transformers

    hf = _transformers_checkpoint(tmp_path / "it", DENSE.kwargs, image_text=True)
    assert any(
        k.startswith("model.vision_embedder.") for k in load_file(tmp_path / "it" / "model.safetensors")
    )
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "it")
    assert type(model).__name__ == "Gemma4UnifiedForCausalLM" and model.config.final_logit_softcapping == 10.0
    same_logits(model, hf)
    model.save_pretrained(tmp_path / "text")
    text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    assert type(text).__name__ == "Gemma4UnifiedForCausalLM"
    same_logits(model, text.eval())


def test_config_defaults_are_transformers():
    import transformers

    from autolm.models.gemma4_unified import Gemma4UnifiedTextConfig

    for kwargs in (dict(num_hidden_layers=8), dict(num_hidden_layers=4, attention_k_eq_v=True,
                                                   num_global_key_value_heads=1, global_head_dim=64)):  # fmt: skip
        ours, theirs = Gemma4UnifiedTextConfig(**kwargs), transformers.Gemma4UnifiedTextConfig(**kwargs)
        written = theirs.to_dict()
        for key in ("layer_types", "rope_parameters", "sliding_window", "max_position_embeddings",
                    "use_bidirectional_attention", "vocab_size", "hidden_size", "head_dim", "tie_word_embeddings",
                    "final_logit_softcapping", "num_kv_shared_layers", "attention_k_eq_v"):  # fmt: skip
            assert getattr(ours, key) == written[key], key
        for i in range(ours.num_hidden_layers):
            assert ours.layer_head_dim(i) == theirs.per_layer_config[i].head_dim
            assert ours.layer_kv_heads(i) == theirs.per_layer_config[i].num_key_value_heads
    assert set(Gemma4UnifiedTextConfig().to_dict()) <= set(transformers.Gemma4UnifiedTextConfig().to_dict())


def test_config_errors_name_the_key():
    from autolm.models.gemma4_unified import Gemma4UnifiedConfig, Gemma4UnifiedTextConfig

    small = dict(num_hidden_layers=2)
    cases = {
        "use_bidirectional_attention": dict(use_bidirectional_attention="all"),
        "num_kv_shared_layers": dict(num_kv_shared_layers=2),
        "global_head_dim": dict(global_head_dim=0),
        "final_logit_softcapping": dict(final_logit_softcapping=-1.0),
    }
    for key, kwargs in cases.items():
        with pytest.raises(ConfigError, match=key):
            Gemma4UnifiedTextConfig(**{**small, **kwargs})
    with pytest.raises(ConfigError, match="text_config"):
        Gemma4UnifiedConfig.from_dict({"text_config": None})


@pytest.mark.parametrize("family", list(GGUF_FAMILIES.values()), ids=list(GGUF_FAMILIES))
def test_gguf_out_is_the_converters_file(family, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """save_gguf writes what llama.cpp's Gemma4UnifiedModel converter writes (Gemma4Model's "gemma4" file), byte
    for byte; the file reads back as Gemma 4's text model with transformers' unified logits."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    write_gemma4_gguf(hf, str(tmp_path / "ref.gguf"))
    _same_file(GGUFFile(path), GGUFFile(str(tmp_path / "ref.gguf")))
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="ref.gguf")
    assert type(back).__name__ == "Gemma4ForCausalLM" and back.config.model_type == "gemma4_text"
    same_logits(back, hf)
