"""MiniMax-M2 against transformers and peft: q/k RMSNorms over the whole projections (head_dim * heads = 128, twice
hidden_size), GQA, partial rotate-half RoPE from the released `rotary_dim` (16 of head_dim 32), and in every layer
8 experts of which each token uses 2 (sigmoid scores steered by a random `mlp.e_score_correction_bias`, the plain
scores of the chosen renormalised); the checkpoint as transformers writes it (the released layout:
block_sparse_moe, one w1/w2/w3 per expert), as transformers holds it in memory (stacked), and the released
config.json spelling. The standard battery, GGUF as llama.cpp's MiniMaxM2Model converter writes it (in, and out of
autolm), the chat template (the unsloth-fixed MiniMax-M2 template llama.cpp's tests keep) and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chat_checks import check_chat_template, check_cli
from conftest import padded_batch
from family_checks import RoutedFamily, same_logits
from gguf_mimic import add_text_model, add_toy_vocab, stacked_experts
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rotary_dim=16,
    max_position_embeddings=64,
    num_local_experts=8,
    num_experts_per_tok=2,
    # keys of the released config.json that transformers keeps as read and ignores
    scoring_func="sigmoid",
    use_qk_norm=True,
    qk_norm_type="per_layer",
    use_routing_bias=True,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for minimax_m2
M2 = RoutedFamily("MiniMaxM2Config", SIZES, lora_targets=TARGETS)


def test_logits(tmp_path_factory):
    M2.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    M2.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    M2.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    M2.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    M2.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    M2.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    M2.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    M2.check_disk_offload(tmp_path_factory, tmp_path)


def test_layers_and_routing(tmp_path_factory):
    """Whole-projection q/k norms, the partial RoPE from rotary_dim; the checkpoint's random correction biases
    loaded on the block (transformers' values), and they change the logits."""
    directory, hf = M2.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    attn = model.model.layers[0].self_attn
    assert (attn.q_norm.weight.shape, attn.k_norm.weight.shape) == ((128,), (64,))
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    for i in (0, 1):
        ours = model.model.layers[i].mlp.e_score_correction_bias
        theirs = hf.model.layers[i].mlp.e_score_correction_bias
        assert ours.abs().min() > 0 and torch.equal(ours, theirs)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.zero_()
        after = model(ids, attention_mask=mask).logits
    assert not torch.allclose(before, after, atol=1e-3)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the released layout (per-expert w1/w2/w3 under block_sparse_moe, the
    bias on the block) and only the checkpoint's config keys in the files autolm saves."""
    from safetensors import safe_open

    M2.check_save(tmp_path_factory, tmp_path)
    directory, hf = M2.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        for key in ("block_sparse_moe.experts.7.w3.weight", "block_sparse_moe.e_score_correction_bias"):
            assert f"model.layers.1.{key}" in set(ours.keys())
    keys = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(keys[1]) - {"transformers_version"} == set(keys[0]) - {"transformers_version"}
    assert keys[1]["rotary_dim"] == 16 and keys[1]["scoring_func"] == "sigmoid"


def test_stacked_checkpoint_loads(tmp_path_factory, tmp_path):
    """A file under transformers' in-memory names (mlp.experts.gate_up_proj stacked, mlp.e_score_correction_bias)
    loads with the same logits."""
    import shutil

    from safetensors.torch import save_file

    directory, hf = M2.checkpoint(tmp_path_factory)
    (tmp_path / "m").mkdir()
    shutil.copy(f"{directory}/config.json", tmp_path / "m" / "config.json")
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    same_logits(autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m"), hf)


def test_released_config_spelling(tmp_path_factory, tmp_path):
    """The released config.json's spelling (rope_theta and rotary_dim at the top level, no RoPE parameters): the
    same model, saved back in that spelling (no rope_scaling added), which transformers loads with equal logits."""
    import shutil

    import transformers

    src, hf = M2.checkpoint(tmp_path_factory)
    shutil.copytree(src, tmp_path / "v4")
    path = tmp_path / "v4" / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    v4 = {**d, "rope_theta": rope["rope_theta"], "attn_type_list": [1, 1], "shared_intermediate_size": 0}
    path.write_text(json.dumps(v4))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "v4")
    assert model.config.rope_parameters == rope
    same_logits(model, hf)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert set(saved) - {"transformers_version"} == set(v4) - {"transformers_version"}
    assert (saved["rope_theta"], saved["rotary_dim"]) == (rope["rope_theta"], 16)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    same_logits(model, back)


# ---- GGUF: llama.cpp's MiniMaxM2Model converter, emulated --------------------------------------------------------


def write_minimax_m2_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' MiniMax-M2 `hf` (--outtype f32), from the checkpoint
    files: TextModel's keys (the head size, the experts' counts, the sigmoid gating from scoring_func), the experts'
    length (intermediate_size), rope.dimension_count as rotary_dim; no q/k permutation; each layer's w1/w3/w2
    stacked into ffn_{gate,up,down}_exps, e_score_correction_bias as exp_probs_b.bias, the rest by gguf-py's map;
    a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c, hp = hf.config, json.load(open(f"{hf.name_or_path}/config.json"))
    w = gguf.GGUFWriter(path, "minimax-m2")
    add_text_model(w, c)
    w.add_expert_count(hp["num_local_experts"])
    w.add_expert_used_count(c.num_experts_per_tok)
    assert hp["scoring_func"] == "sigmoid"
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_expert_feed_forward_length(hp["intermediate_size"])
    w.add_rope_dimension_count(hp["rotary_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MINIMAXM2, c.num_hidden_layers)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".block_sparse_moe.experts.", hp["num_local_experts"]):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as MiniMaxM2ForCausalLM with transformers' logits (correction biases and the
    partial RoPE included); int8 from it quantizes the experts."""
    _, hf = M2.checkpoint(tmp_path_factory)
    write_minimax_m2_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "MiniMaxM2ForCausalLM"
    c = model.config
    assert (c.head_dim, c.num_local_experts, c.rope_parameters["partial_rotary_factor"]) == (32, 8, 0.5)
    same_logits(model, hf)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[1].mlp.experts).__name__ == "Int8Experts"


# ---- chat template, CLI, config -----------------------------------------------------------------------------------


def test_chat_template(tmp_path):
    """MiniMax-M2's template (system turn always rendered, <think> opened by the generation prompt) as transformers
    renders it."""
    check_chat_template(tmp_path / "tok", "minimax-m2.jinja")


def test_cli(tmp_path_factory, tmp_path):
    long = RoutedFamily(M2.config_cls, dict(M2.kwargs, max_position_embeddings=2048), lora_targets=["q_proj"])
    check_cli(long, "minimax-m2.jinja", tmp_path_factory, tmp_path, "MiniMaxM2ForCausalLM (minimax_m2)")


def test_default_config_is_transformers():
    """MiniMaxM2Config holds transformers' defaults; initializer_range, kept only where given, aside."""
    import transformers

    from autolm.models.minimax_m2 import MiniMaxM2Config

    theirs = json.loads(transformers.MiniMaxM2Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert MiniMaxM2Config().to_dict() == theirs


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_local_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_local_experts="8"), "experts"),
        (dict(router_jitter_noise=2), "router_jitter_noise"),
        (dict(output_router_logits="no"), "output_router_logits"),
        (dict(rotary_dim=300), "rotary_dim"),
        (dict(rotary_dim=3), "partial_rotary_factor"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    from autolm.models.minimax_m2 import MiniMaxM2Config

    with pytest.raises(autolm.ConfigError, match=match):
        MiniMaxM2Config.from_dict({"model_type": "minimax_m2", **bad})
