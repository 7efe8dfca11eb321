"""Mistral 4 (Mistral Small 4) against transformers and peft: DeepSeek-V3's latent attention (low-rank query and a
plain q_proj, interleaved and rotate-half RoPE, v wider than q/k) with Llama 4's attention temperature on the queries
(from position 4 on in the tiny checkpoints), YaRN, the softmax router choosing in 2 groups by their two best
probabilities, renormalised or not and scaled, plus the shared expert; the experts stacked on disk as transformers
keeps them. The standard battery, config.json as transformers writes it (head_dim = qk_head_dim, partial_rotary_factor),
the image-text checkpoint (Mistral3ForConditionalGeneration with a mistral4 text_config), GGUF as llama.cpp's
Mistral4Model converter writes it (in and out, llama.cpp's logits where llama_cpp is installed), the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import padded_batch, positions, register_causal_lm_gaps
from family_checks import Family
from gguf_mimic import add_mla_lengths, add_toy_vocab
from gguf_moe import mla_pieces
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_mimo_v2_flash import merged_tokenizer  # noqa: F401  (llama.cpp reads a vocabulary with merges)
from test_family_phi import _byte_tokenizer

import autolm

register_causal_lm_gaps()  # transformers 5.23 has no AutoModelForCausalLM of mistral4

# YaRN over the rope part, the temperature from position 4 on
ROPE = dict(rope_type="yarn", rope_theta=10000.0, factor=16.0, original_max_position_embeddings=4, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.5)  # fmt: skip
SIZES = dict(
    hidden_size=64,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    n_shared_experts=1,
    routed_scaling_factor=1.5,
    max_position_embeddings=64,
    rope_parameters=ROPE,
)
_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
M4 = Family("Mistral4Config", SIZES, lora_targets=_TARGETS)
# no low-rank query, rotate-half RoPE, biases on q_a / kv_a / o, v wider than q/k, no renormalising, one group,
# transformers' default RoPE (YaRN, temperature from 8192 on)
PLAIN_Q = Family(
    "Mistral4Config",
    dict(SIZES, q_lora_rank=None, rope_interleave=False, attention_bias=True, v_head_dim=32, norm_topk_prob=False,
         n_group=1, topk_group=1, rope_parameters=None),
    lora_targets=_TARGETS,
)  # fmt: skip
FAMILIES = {"m4": M4, "plain_q": PLAIN_Q}
# the converter writes no temperature: a checkpoint whose temperature starts past the tests' prompts
LATE = Family(
    "Mistral4Config", dict(SIZES, rope_parameters=dict(ROPE, factor=2.0, original_max_position_embeddings=32))
)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    M4.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    M4.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    M4.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    M4.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes in the state dict; the experts stacked and transformers' config.json (keys
    and values) in the files autolm saves."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.2.mlp.experts.gate_up_proj" in saved
    assert not any("e_score_correction" in k for k in saved)


def test_disk_offload(tmp_path_factory, tmp_path):
    M4.check_disk_offload(tmp_path_factory, tmp_path)


def test_temperature_and_router_matter(tmp_path_factory):
    """The checkpoint's logits need the queries' temperature (beta 0 differs from position 4 on only) and the
    routing by groups (one group, a different choice)."""
    directory, hf = M4.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.arange(3, 16).unsqueeze(0)
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(want, hf(ids).logits, atol=1e-4, rtol=1e-4)
        model.model.rotary.beta = 0.0
        plain = model(ids).logits
        model.model.rotary.beta = 0.5
        assert torch.allclose(plain[:, :4], want[:, :4], atol=1e-5) and not torch.allclose(
            plain, want, atol=1e-3
        )
        for layer in model.model.layers[1:]:
            layer.mlp.gate.n_group = 1
        assert not torch.allclose(model(ids).logits, want, atol=1e-3)


# ---- the image-text checkpoint -----------------------------------------------------------------------------------


def test_image_text_checkpoint_runs_its_language_model(tmp_path):
    """Mistral3ForConditionalGeneration with a mistral4 text_config (Mistral Small 4 as released) loads as
    Mistral4ForCausalLM with the image-text model's logits; saved, transformers loads the text model."""
    import transformers
    from conftest import randomize
    from test_family_image_text import PIXTRAL

    text = dict(SIZES, model_type="mistral4", vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = transformers.Mistral3Config(text_config=text, vision_config=PIXTRAL, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.Mistral3ForConditionalGeneration(config)
    randomize(hf)
    hf.save_pretrained(tmp_path / "it")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "it")
    assert type(model).__name__ == "Mistral4ForCausalLM"
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, position_ids=positions(mask))  # the temperature counts real positions
    with torch.no_grad():
        ours = model(ids, **kw).logits[mask.bool()]
        theirs = hf.eval()(input_ids=ids, **kw).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "text")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    assert type(back).__name__ == "Mistral4ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, **kw).logits[mask.bool()], ours, atol=1e-4, rtol=1e-4)


# ---- GGUF: llama.cpp's Mistral4Model converter, emulated ----------------------------------------------------------


def write_mistral4_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter (Mistral3Model's Mistral4Model, a DeepseekV2Model; --outtype f32) makes of
    transformers' Mistral 4 `hf`: TextModel's metadata (YaRN's keys, the group counts) with num_key_value_heads 1
    (MLA as MQA), DeepseekV2Model's keys (no gating function: config.json names no scoring_func; no temperature),
    the experts as stored (gate_up_proj / down_proj + ".weight"), kv_b_proj split per head into attn_k_b
    (transposed) and attn_v_b, the rest by gguf-py's name map for MISTRAL4."""
    import gguf
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    rope = c["rope_parameters"]
    w = gguf.GGUFWriter(path, "mistral4")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(1)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_expert_group_count(c["n_group"])
    w.add_expert_group_used_count(c["topk_group"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_leading_dense_block_count(c["first_k_dense_replace"])
    w.add_vocab_size(c["vocab_size"])
    w.add_q_lora_rank(c["q_lora_rank"])
    add_mla_lengths(w, c)
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    if c["norm_topk_prob"]:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(c["qk_rope_head_dim"])
    w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MISTRAL4, c["num_hidden_layers"])
    heads, nope = c["num_attention_heads"], c["qk_nope_head_dim"]
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        if name.endswith((".down_proj", ".gate_up_proj")):
            name += ".weight"
        for piece, value in mla_pieces(name, t, heads, nope):
            base, kind = piece.rsplit(".", 1)
            w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(value.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return _byte_tokenizer(tmp_path_factory.mktemp("mistral4") / "tokenizer")


def _row_logits(model) -> torch.Tensor:
    from test_gguf_remote_archs import ROW

    with torch.no_grad():
        return model(ROW).logits[0]


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as Mistral4ForCausalLM with transformers' logits (no temperature in the file:
    beta 0, the same logits before original_max_position_embeddings) and llama.cpp's."""
    from test_gguf_remote_archs import _close_to_llama_cpp, llama_cpp_logits

    _, hf = LATE.checkpoint(tmp_path_factory)
    path = str(tmp_path / "model.gguf")
    write_mistral4_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "Mistral4ForCausalLM"
    c = model.config
    assert (c.n_group, c.topk_group, c.norm_topk_prob, c.q_lora_rank) == (2, 1, True, 32)
    assert c.rope_parameters["llama_4_scaling_beta"] == 0.0 and c.routed_scaling_factor == 1.5
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    _close_to_llama_cpp(_row_logits(model), llama_cpp_logits(path))


def test_gguf_out(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """save_gguf's file (the temperature as llama.cpp's keys) loads back with the model's logits, the temperature
    from position 4 on included, and llama.cpp runs it with close logits."""
    from test_gguf_remote_archs import _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = M4.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    path = str(tmp_path / "m.gguf")
    save_gguf(model, merged_tokenizer, path, "f32")
    meta = GGUFFile(path).metadata
    assert meta["mistral4.attention.temperature_length"] == 4
    assert meta["mistral4.attention.temperature_scale"] == pytest.approx(0.5)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(back).__name__ == "Mistral4ForCausalLM"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = back(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    _close_to_llama_cpp(_row_logits(model), llama_cpp_logits(path))


@pytest.mark.parametrize(
    ("change", "refused"),
    [({"rope_interleave": False}, "rope_interleave"), ({"q_lora_rank": None}, "q_lora_rank"),
     ({"attention_bias": True}, "attention_bias")],
)  # fmt: skip
def test_gguf_out_refused(tmp_path_factory, tmp_path, byte_tokenizer, change, refused):
    """What llama.cpp's mistral4 (deepseek2's graph) cannot run is refused, naming it, and no file is left:
    rotate-half RoPE, a plain q projection at a depth where llama.cpp reads a low-rank one, attention biases."""
    from autolm.gguf_writer import save_gguf

    family = PLAIN_Q if "q_lora_rank" in change else M4
    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    for key, value in change.items():
        setattr(model.config, key, value)
    model.config.rope_interleave = change.get("rope_interleave", True)
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


# ---- config ------------------------------------------------------------------------------------------------------


def test_default_config_is_transformers():
    """Mistral4Config() holds transformers' defaults (head_dim = qk_head_dim, its YaRN RoPE with the temperature
    and partial_rotary_factor); initializer_range and pretraining_tp, kept only where given, aside."""
    import transformers

    from autolm.models.mistral4 import Mistral4Config

    theirs = json.loads(transformers.Mistral4Config().to_json_string())
    for key in ("transformers_version", "initializer_range", "pretraining_tp"):
        theirs.pop(key)
    assert Mistral4Config().to_dict() == theirs


def test_config_json_round_trip(tmp_path_factory, tmp_path):
    """config.json as transformers writes it reads back and saves back equal (but transformers' version)."""
    from autolm.models.mistral4 import Mistral4Config

    for family in FAMILIES.values():
        directory, _ = family.checkpoint(tmp_path_factory)
        theirs = json.load(open(f"{directory}/config.json"))
        ours = Mistral4Config.from_pretrained(directory).to_dict()
        for key in ("transformers_version", "architectures", "output_attentions", "output_hidden_states",
                    "return_dict", "use_cache", "dtype"):  # fmt: skip
            theirs.pop(key, None), ours.pop(key, None)
        assert ours == theirs


def test_config_errors_name_the_key():
    from autolm.models.mistral4 import Mistral4Config

    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=2,
                 topk_group=1, num_experts_per_tok=2)  # fmt: skip
    Mistral4Config(**small)
    for key, bad in (("q_lora_rank", 0), ("qk_rope_head_dim", 7), ("num_experts_per_tok", 9), ("n_group", 3),
                     ("routed_scaling_factor", 0)):  # fmt: skip
        with pytest.raises(autolm.ConfigError, match=key):
            Mistral4Config.from_dict({**small, key: bad})
    for key, bad in (("llama_4_scaling_beta", None), ("original_max_position_embeddings", 0)):
        with pytest.raises(autolm.ConfigError, match=key):
            Mistral4Config.from_dict({**small, "rope_parameters": dict(ROPE, **{key: bad})})
