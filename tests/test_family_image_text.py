"""Image-text checkpoints whose language model autolm runs (autolm.models.image_text), against transformers: Qwen2-VL,
Qwen2.5-VL (also in the Hub's older flat config), Qwen3-VL, Qwen3-VL-MoE (its experts also in the Hub's (E, in, out)
layout), Mistral 3 with a Mistral or a Ministral 3 language model and Kimi K2.5 over DeepSeek-V3, each a transformers ForConditionalGeneration
with a tiny vision tower. On text, autolm's model of the checkpoint is the text family's, with the image-text
model's logits over a left-padded batch and its greedy tokens; saved, it is the text model transformers'
AutoModelForCausalLM loads, with the same logits. llama.cpp's "qwen2vl", "qwen3vl" and "qwen3vlmoe" files (the text
model's file as the VL converters write it: the family's keys under the VL architecture, the multimodal RoPE
sections, the deepstack count) read as the text family's, with its logits, and llama.cpp's own on the same file
(llama-cpp-python, where installed)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import SPECS, VOCAB, padded_batch, positions, randomize
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
MROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}  # head_dim 16: 8 frequencies
QWEN_VISION = dict(
    depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4
)
QWEN3_VISION = dict(QWEN_VISION, num_position_embeddings=16, deepstack_visual_indexes=[0])
GLM_TEXT = {k: v for k, v in TEXT.items() if k not in ("bos_token_id", "eos_token_id")}
GLM_VISION = dict(QWEN_VISION, image_size=16)
# half of each 16-wide head rotates: 4 frequencies
GLM_ROPE = {
    "rope_type": "default",
    "rope_theta": 1e4,
    "mrope_section": [2, 1, 1],
    "partial_rotary_factor": 0.5,
}
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, image_size=16, patch_size=4, projection_dim=32)  # fmt: skip
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, image_size=16, patch_size=4)  # fmt: skip
TINY_VISION = dict(
    hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4
)
PIXTRAL = dict(model_type="pixtral", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, image_size=16, patch_size=4, head_dim=16)  # fmt: skip
# (its query low-rank, as Kimi K2's: transformers would save a plain q_proj fused as the vision tower's "wqkv")
KIMI_TEXT = dict(SPECS["deepseek_v3"][1], q_lora_rank=16, model_type="kimi_k2", vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)  # fmt: skip
KIMI_VISION = dict(patch_size=4, pos_emb_height=4, pos_emb_width=4, num_attention_heads=2, num_hidden_layers=1,
                   hidden_size=32, intermediate_size=32)  # fmt: skip
# name -> (transformers' config and model class names, config kwargs, autolm's text model, transformers' text model)
CASES = {
    "qwen2_vl": (
        "Qwen2VL",
        dict(
            text_config=dict(TEXT, rope_parameters=MROPE),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4),
        ),
        "Qwen2ForCausalLM",
    ),
    "qwen2_5_vl": (
        "Qwen2_5_VL",
        dict(
            text_config=dict(TEXT, rope_parameters=MROPE), vision_config=QWEN_VISION, tie_word_embeddings=True
        ),
        "Qwen2ForCausalLM",
    ),
    "qwen3_vl": (
        "Qwen3VL",
        dict(
            text_config=dict(TEXT, head_dim=16, rope_parameters=dict(MROPE, mrope_interleaved=True)),
            vision_config=QWEN3_VISION,
        ),
        "Qwen3ForCausalLM",
    ),
    "qwen3_vl_moe": (
        "Qwen3VLMoe",
        dict(
            text_config=dict(
                TEXT,
                head_dim=16,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=24,
                rope_parameters=dict(MROPE, mrope_interleaved=True),
            ),
            vision_config=QWEN3_VISION,
        ),
        "Qwen3MoeForCausalLM",
    ),
    "glm4v": (
        "Glm4v",
        dict(text_config=dict(GLM_TEXT, rope_parameters=GLM_ROPE), vision_config=GLM_VISION),
        "Glm4ForCausalLM",
    ),
    # no partial_rotary_factor: GLM-4V's RoPE turns the whole head (GLM-4's default is half); tied by text_config
    "glm4v_whole_rotary": (
        "Glm4v",
        dict(
            text_config=dict(
                GLM_TEXT, tie_word_embeddings=True, rope_parameters=dict(MROPE, mrope_section=[4, 2, 2])
            ),
            vision_config=GLM_VISION,
        ),
        "Glm4ForCausalLM",
    ),
    "glm4v_moe": (
        "Glm4vMoe",
        dict(
            text_config=dict(
                GLM_TEXT,
                n_routed_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=24,
                first_k_dense_replace=1,
                n_shared_experts=1,
                rope_parameters=GLM_ROPE,
            ),
            vision_config=GLM_VISION,
        ),
        "Glm4MoeForCausalLM",
    ),
    "llava": (
        "Llava",
        dict(text_config=dict(TEXT, model_type="llama"), vision_config=CLIP),
        "LlamaForCausalLM",
    ),
    # LLaVA-NeXT over a Mistral (text_config names the family)
    "llava_next": (
        "LlavaNext",
        dict(
            text_config=dict(TEXT, model_type="mistral", sliding_window=None),
            vision_config=CLIP,
            image_grid_pinpoints=[[16, 16]],
        ),
        "MistralForCausalLM",
    ),
    "llava_onevision": (
        "LlavaOnevision",
        dict(
            text_config=dict(TEXT, model_type="qwen2"), vision_config=SIGLIP, image_grid_pinpoints=[[16, 16]]
        ),
        "Qwen2ForCausalLM",
    ),
    # InternVL 3.5 over a Qwen 3, its head tied by the outer config
    "internvl": (
        "InternVL",
        dict(
            text_config=dict(TEXT, model_type="qwen3", head_dim=16),
            vision_config=dict(TINY_VISION, image_size=[16, 16], patch_size=[4, 4]),
        ),
        "Qwen3ForCausalLM",
    ),
    "smolvlm": (
        "SmolVLM",
        dict(
            text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(TINY_VISION, image_size=16),
            scale_factor=2,
        ),
        "LlamaForCausalLM",
    ),
    "lfm2_vl": (
        "Lfm2Vl",
        dict(text_config=dict(TEXT, layer_types=["conv", "full_attention"]), vision_config=TINY_VISION),
        "Lfm2ForCausalLM",
    ),
    "aya_vision": (
        "AyaVision",
        dict(
            text_config=dict(
                TEXT,
                model_type="cohere2",
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
            ),
            vision_config=SIGLIP,
        ),
        "Cohere2ForCausalLM",
    ),
    "mistral3": (
        "Mistral3",
        dict(
            text_config=dict(TEXT, model_type="mistral", head_dim=16, sliding_window=None),
            vision_config=PIXTRAL,
        ),
        "MistralForCausalLM",
    ),
    # Kimi K2.5 over DeepSeek-V3 named as the Hub names it ("kimi_k2"), its head tied by the outer default, then untied
    "kimi_k25": (
        "Kimi_K25",
        dict(
            text_config=dict(KIMI_TEXT, tie_word_embeddings=False),
            vision_config=KIMI_VISION,
            projection_hidden_size=32,
        ),
        "DeepseekV3ForCausalLM",
    ),
    "kimi_k25_untied": (
        "Kimi_K25",
        dict(
            text_config=KIMI_TEXT,
            vision_config=KIMI_VISION,
            projection_hidden_size=32,
            tie_word_embeddings=False,
        ),
        "DeepseekV3ForCausalLM",
    ),
    "mistral3_ministral3": (
        "Mistral3",
        dict(
            text_config=dict(TEXT, model_type="ministral3", head_dim=16, tie_word_embeddings=True),
            vision_config=PIXTRAL,
            tie_word_embeddings=False,
        ),
        "Ministral3ForCausalLM",
    ),
}


def _checkpoint(tmp_path_factory, name: str):
    """The case's transformers image-text model (random weights), saved; (directory, model)."""
    import transformers

    prefix, kwargs, _ = CASES[name]
    directory = tmp_path_factory.mktemp(name)
    config = getattr(transformers, f"{prefix}Config")(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    randomize(model)
    model.tie_weights()
    model.save_pretrained(directory)
    if prefix == "Kimi_K25":  # transformers saves the language model's layers as the vision tower's "blocks"
        from safetensors.torch import load_file, save_file

        path = os.path.join(directory, "model.safetensors")
        tensors = load_file(path)
        save_file({k.replace(".model.blocks.", ".model.layers."): v for k, v in tensors.items()}, path,
                  metadata={"format": "pt"})  # fmt: skip
    return str(directory), model.eval()


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("name", CASES)
def test_language_model_is_the_image_text_models(name, tmp_path_factory, tmp_path):
    """The checkpoint loads as its text family with the image-text model's logits (a left-padded batch), head tying
    and greedy tokens; saved, transformers' AutoModelForCausalLM loads the text model with the same logits."""
    import transformers

    directory, hf = _checkpoint(tmp_path_factory, name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == CASES[name][2]
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == hf.config.tie_word_embeddings
    ids, mask = padded_batch()
    ours = _logits(model, ids, mask)
    torch.testing.assert_close(ours, _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    prompt = ids[:1, -9:]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), theirs)
    model.save_pretrained(tmp_path / "text")
    text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    assert type(text).__name__ == CASES[name][2]
    torch.testing.assert_close(ours, _logits(text, ids, mask), atol=1e-4, rtol=1e-4)


def _rewrite(directory: str, dst, change_config=None, change_tensors=None) -> str:
    """A copy of a checkpoint with its config.json and tensors changed (as an older file holds them)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(change_config(config) if change_config else config, f)
    save_file(change_tensors(tensors) if change_tensors else tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_hub_files_older_layouts(tmp_path_factory, tmp_path):
    """Qwen2.5-VL's config as the Hub's files hold it (the language model's settings at the top level, multimodal
    RoPE as rope_scaling type "mrope", RoPE base as rope_theta) and Qwen3-VL-MoE's experts as the Hub's hold them,
    (E, in, out): the same logits."""

    def flat(d):
        text = d.pop("text_config")
        rope = text.pop("rope_parameters")
        text.pop("model_type")
        return {**d, **text, "rope_theta": rope.pop("rope_theta"), "rope_scaling": {**rope, "type": "mrope"}}

    def in_out(tensors):
        return {k: v.transpose(1, 2).contiguous() if ".experts." in k else v for k, v in tensors.items()}

    ids, mask = padded_batch()
    for name, change in (
        ("qwen2_5_vl", dict(change_config=flat)),
        ("qwen3_vl_moe", dict(change_tensors=in_out)),
    ):
        directory, hf = _checkpoint(tmp_path_factory, name)
        older = _rewrite(directory, tmp_path / name, **change)
        model = autolm.AutoModelForCausalLM.from_pretrained(older)
        assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
        torch.testing.assert_close(_logits(model, ids, mask), _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    assert "architectures" not in model.config.extra and "vision_config" not in model.config.extra


def _normal_to_neox(a, hf_config):
    """conversion/glm.py's Glm4Model.normal_to_neox of q's / k's rows (weight or bias): per head, the rotary rows'
    even ones, then the odd ones."""
    text = hf_config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    rotary = int(head_dim * text.rope_parameters.get("partial_rotary_factor", 1.0))
    heads = a.reshape(-1, head_dim, *a.shape[1:])
    rot = heads[:, :rotary]
    return np.concatenate([rot[:, 0::2], rot[:, 1::2], heads[:, rotary:]], axis=1).reshape(a.shape)


def _vl_file(path: str, arch: str, out: str, deepstack: int | None, hf_config=None) -> str:
    """The text model's GGUF as llama.cpp's VL converter writes it: the "<family>.*" keys under `arch`, the RoPE
    sections (four, the last 0), the deepstack count (Qwen3-VL), a "llama" vocabulary llama.cpp loads; with
    `hf_config` (GLM-4V), q's and k's rotary rows regrouped for llama.cpp's multimodal kernel (_normal_to_neox)."""
    import gguf
    from gguf_mimic import add_toy_vocab

    reader = gguf.GGUFReader(path)
    family = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name.startswith(f"{family}."):
            w.add_key_value(f"{arch}.{field.name.removeprefix(family + '.')}", field.contents(), field.types[0],
                            sub_type=field.types[-1])  # fmt: skip
    w.add_rope_dimension_sections(
        [*hf_config.text_config.rope_parameters["mrope_section"], 0] if hf_config else [2, 3, 3, 0]
    )
    if deepstack is not None:
        w.add_num_deepstack_layers(deepstack)
    add_toy_vocab(w)
    for t in reader.tensors:
        a = t.data.reshape(tuple(reversed(t.shape.tolist())))
        if hf_config is not None and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            a = _normal_to_neox(a, hf_config)
        w.add_tensor(t.name, a, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize(
    "name,arch,deepstack", [("qwen2_5_vl", "qwen2vl", None), ("qwen3_vl", "qwen3vl", 1),
                            ("qwen3_vl_moe", "qwen3vlmoe", 1), ("glm4v", "glm4", None),
                            ("glm4v_whole_rotary", "glm4", None), ("glm4v_moe", "glm4moe", None)]
)  # fmt: skip
def test_vl_gguf_files_read_as_the_text_family(
    name,
    arch,
    deepstack,
    tmp_path_factory,
    tmp_path,
    byte_tokenizer,  # noqa: F811
):
    """llama.cpp's VL architectures read as the text family, with the model's logits; llama.cpp's on the same
    file agree (within its float16 KV cache). GLM-4V's "glm4" files hold q/k rows regrouped for llama.cpp's
    multimodal RoPE: read back in the model's order, and written back as they were read."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf

    directory, hf = _checkpoint(tmp_path_factory, name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    text = save_gguf(model, byte_tokenizer, str(tmp_path / "text.gguf"), "f32")
    permuted = hf.config if arch == "glm4" else None
    _vl_file(text, arch, str(tmp_path / "vl.gguf"), deepstack, permuted)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="vl.gguf", progress=False)
    assert type(back).__name__ == CASES[name][2]
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = back(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        torch.testing.assert_close(ours, _logits(model, ids, mask), atol=1e-4, rtol=1e-4)
        row = back(ROW).logits[0]
    if permuted is not None:  # the sections kept: written back with the rows regrouped, as read
        again = save_gguf(back, byte_tokenizer, str(tmp_path / "again.gguf"), "f32")
        assert _tensors(again, "attn_q") == _tensors(str(tmp_path / "vl.gguf"), "attn_q")
    _close_to_llama_cpp(row, llama_cpp_logits(str(tmp_path / "vl.gguf")))


def _tensors(path: str, stem: str) -> list[bytes]:
    import gguf

    return [bytes(t.data) for t in gguf.GGUFReader(path).tensors if t.name.split(".")[-2] == stem]


def test_config_errors_and_defaults():
    """A wrapper without text_config names the key; Mistral 3's language model is a Mistral unless text_config
    names Ministral 3; the image-text defaults for tying."""
    from autolm.models import Mistral3Config, Qwen3VLConfig, Qwen3VLMoeConfig

    with pytest.raises(ConfigError, match="text_config"):
        Qwen3VLConfig.from_dict({"model_type": "qwen3_vl", "hidden_size": 64})
    assert type(Mistral3Config(text_config=dict(TEXT))).__name__ == "MistralConfig"
    assert Mistral3Config(
        text_config=dict(TEXT)
    ).tie_word_embeddings  # transformers' Mistral3 ties by default
    assert Qwen3VLConfig(text_config=dict(TEXT, tie_word_embeddings=True)).tie_word_embeddings is False
    moe = Qwen3VLMoeConfig(text_config=dict(TEXT, norm_topk_prob=False, rope_parameters=MROPE))
    assert moe.norm_topk_prob is True and "mrope_section" not in moe.rope_parameters
