"""GLM-4.5 against transformers and peft: q/k/v biases, per-head q/k norms, partial rotate-half RoPE (half of each
head), head_dim != hidden / heads, GQA; a dense first layer then two mixture layers of 8 experts in 2 groups (each
token's experts from the 1 best group; sigmoid scores steered by a random e_score_correction_bias, renormalised,
scaled by routed_scaling_factor) plus 2 shared experts; the checkpoint as transformers writes it (one tensor per
expert) and with the Hub's next-token-prediction layer past the last, which is not loaded. The standard battery,
GGUF as llama.cpp's Glm4MoeModel converter writes it (in, and out of autolm), and the CLI (GLM-4.5's chat
template is not among the test data: ChatML stands in)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import RoutedFamily
from gguf_mimic import add_text_model, add_toy_vocab, stacked_experts
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer without merges (what GGUF out writes fast)."""
    return _byte_tokenizer(tmp_path_factory.mktemp("byte_tokenizer") / "tokenizer")


SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=64,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    attention_bias=True,
    use_qk_norm=True,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for glm4_moe
GLM = RoutedFamily("Glm4MoeConfig", dict(SIZES, n_group=2, topk_group=1), lora_targets=TARGETS)
# what llama.cpp's glm4moe routes: no groups (and the top k not renormalised, which it honours)
PLAIN = RoutedFamily("Glm4MoeConfig", dict(SIZES, norm_topk_prob=False), lora_targets=TARGETS)


def test_logits(tmp_path_factory):
    GLM.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    GLM.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GLM.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    GLM.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GLM.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    GLM.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GLM.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    GLM.check_disk_offload(tmp_path_factory, tmp_path)


def check_layers_and_routing(family, tmp_path_factory, dense_kind: str = "GatedMLP") -> None:
    """Layer 0 dense, the others mixtures with shared experts; the checkpoint's random correction biases loaded
    (transformers' values), and they change the logits; a bf16 load keeps them in fp32."""
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    layers = model.model.layers
    assert type(layers[0].mlp).__name__ == dense_kind
    assert all(type(layer.mlp).__name__ == "SparseMoeBlock" for layer in layers[1:])
    assert all(hasattr(layer.mlp, "shared_experts") for layer in layers[1:])
    for i in (1, 2):
        ours = layers[i].mlp.gate.e_score_correction_bias
        theirs = hf.model.layers[i].mlp.gate.e_score_correction_bias
        assert ours.abs().min() > 0 and torch.equal(ours, theirs)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for layer in layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        after = model(ids, attention_mask=mask).logits
    assert not torch.allclose(before, after, atol=1e-3)
    half = (
        autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).model.layers[1].mlp.gate
    )
    assert (half.weight.dtype, half.e_score_correction_bias.dtype) == (
        torch.bfloat16,
        torch.float32,
    )  # as transformers


def test_layers_and_routing(tmp_path_factory):
    check_layers_and_routing(GLM, tmp_path_factory)


def check_saved(family, tmp_path_factory, tmp_path) -> None:
    """transformers' names in the state dict; the checkpoint's per-expert tensors and only transformers' config
    keys in the files autolm saves."""
    _, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in saved
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in saved


def test_save(tmp_path_factory, tmp_path):
    check_saved(GLM, tmp_path_factory, tmp_path)


def test_nextn_layers_are_not_loaded(tmp_path_factory, tmp_path):
    """The Hub's checkpoints hold a next-token-prediction layer at index num_hidden_layers (its own norms, eh_proj,
    shared head and a full mixture layer): autolm skips it, silently, as transformers does; and in the GGUF file
    llama.cpp's converter makes of such a checkpoint, as llama.cpp does."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory, hf = PLAIN.checkpoint(tmp_path_factory)  # one group of experts, as GGUF holds them
    shutil.copytree(directory, tmp_path / "mtp")
    tensors = load_file(f"{directory}/model.safetensors")
    n, h = hf.config.num_hidden_layers, hf.config.hidden_size
    extra = {
        k.replace(".layers.2.", f".layers.{n}."): v.clone() for k, v in tensors.items() if ".layers.2." in k
    }
    extra.update({f"model.layers.{n}.eh_proj.weight": torch.zeros(h, 2 * h),
                  f"model.layers.{n}.enorm.weight": torch.ones(h), f"model.layers.{n}.hnorm.weight": torch.ones(h),
                  f"model.layers.{n}.shared_head.norm.weight": torch.ones(h)})  # fmt: skip
    save_file({**tensors, **extra}, str(tmp_path / "mtp" / "model.safetensors"), metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp")
    assert model.load_report.notes == autolm.AutoModelForCausalLM.from_pretrained(directory).load_report.notes
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # the converter's file keeps the layer as blk.<n>.* (nextn.eh_proj, ...): skipped too
    from types import SimpleNamespace

    from autolm.sources.gguf import GGUFFile

    write_glm4moe_gguf(
        SimpleNamespace(config=hf.config, name_or_path=str(tmp_path / "mtp")), str(tmp_path / "m.gguf")
    )
    assert f"blk.{n}.nextn.eh_proj.weight" in {t.name for t in GGUFFile(str(tmp_path / "m.gguf")).tensors}
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_glm45_config_spelling(tmp_path_factory, tmp_path):
    """GLM-4.5's config.json as shipped (transformers 4's spelling: rope_theta and partial_rotary_factor at the top
    level, rope_scaling null): the same model, saved back in that spelling, which transformers loads with equal
    logits."""
    import shutil

    import transformers

    src, hf = GLM.checkpoint(tmp_path_factory)
    shutil.copytree(src, tmp_path / "v4")
    path = tmp_path / "v4" / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    v4 = {**d, "rope_theta": rope["rope_theta"], "partial_rotary_factor": 0.5, "rope_scaling": None}
    path.write_text(json.dumps(v4))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "v4")
    assert model.config.rope_parameters == rope
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert set(saved) - {"transformers_version"} == set(v4) - {"transformers_version"}
    assert (saved["rope_theta"], saved["partial_rotary_factor"], saved["rope_scaling"]) == (
        10000.0,
        0.5,
        None,
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    with torch.no_grad():
        got = back(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---- GGUF: llama.cpp's Glm4MoeModel converter, emulated ---------------------------------------------------------


def write_glm4moe_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' GLM-4.5 `hf` (--outtype f32), from the checkpoint
    files: TextModel's keys (block_count counting the next-token-prediction layers, the head size where config.json
    has head_dim), the rotary dimensions, the expert counts and lengths, the leading dense layers, the sigmoid
    gating, routed_scaling_factor and norm_topk_prob as expert_weights_scale / _norm, nextn_predict_layers; no q/k
    permutation; each layer's experts stacked, e_score_correction_bias as exp_probs_b.bias, the rest by gguf-py's
    map; a plain vocabulary."""
    import gguf

    c, hp = hf.config, json.load(open(f"{hf.name_or_path}/config.json"))
    nextn = hp.get("num_nextn_predict_layers", 0)
    w = gguf.GGUFWriter(path, "glm4moe")
    add_text_model(w, c, c.num_hidden_layers + nextn)
    w.add_expert_used_count(c.num_experts_per_tok)
    if "head_dim" in hp:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    head_dim = hp.get("head_dim") or c.hidden_size // c.num_attention_heads
    w.add_rope_dimension_count(int(head_dim * c.rope_parameters.get("partial_rotary_factor", 0.5)))
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    w.add_nextn_predict_layers(nextn)
    write_tensors(w, hf, gguf.MODEL_ARCH.GLM4_MOE, c.num_hidden_layers + nextn)


def write_tensors(w, hf, arch, blocks: int) -> None:
    """The checkpoint's tensors as the converters of GLM-4.5 and dots.llm1 write them, then the file's rest."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(arch, blocks)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".mlp.experts.", c.n_routed_experts):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_gguf_in(family, writer, tmp_path_factory, tmp_path, cls: str):
    """The converter's file loads as `cls` with transformers' logits (correction biases included); int8 from it
    quantizes the experts."""
    _, hf = family.checkpoint(tmp_path_factory)
    writer(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == cls
    assert model.config.num_hidden_layers == hf.config.num_hidden_layers
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[1].mlp.experts).__name__ == "Int8Experts"
    return model


def test_gguf(tmp_path_factory, tmp_path):
    model = check_gguf_in(PLAIN, write_glm4moe_gguf, tmp_path_factory, tmp_path, "Glm4MoeForCausalLM")
    c = model.config
    assert (c.attention_bias, c.use_qk_norm, c.head_dim, c.num_nextn_predict_layers) == (True, True, 32, 1)
    assert c.rope_parameters["partial_rotary_factor"] == 0.5


def check_gguf_out_refuses(refused, tmp_path_factory, tmp_path, byte_tokenizer, match):
    """A model llama.cpp's graph cannot run is refused, naming the field (test_gguf_out checks the F32 file of the
    others against the converter's)."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(refused.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=match):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_gguf_out_refuses_groups(tmp_path_factory, tmp_path, byte_tokenizer):
    check_gguf_out_refuses(GLM, tmp_path_factory, tmp_path, byte_tokenizer, "n_group")


# ---- CLI, config -------------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    long = RoutedFamily(
        GLM.config_cls, dict(GLM.kwargs, max_position_embeddings=2048), lora_targets=["q_proj"]
    )
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "Glm4MoeForCausalLM (glm4_moe)")


def test_default_config_is_transformers():
    """Glm4MoeConfig holds transformers' defaults (with GLM-4.5's head_dim: transformers' 96 heads do not divide
    its hidden_size, which leaves an odd rotary width); initializer_range, kept only where given, aside."""
    import transformers

    from autolm.models.glm4_moe import Glm4MoeConfig

    theirs = json.loads(transformers.Glm4MoeConfig(head_dim=128).to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Glm4MoeConfig(head_dim=128).to_dict() == theirs
    with pytest.raises(autolm.ConfigError, match="head_dim"):
        Glm4MoeConfig()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_routed_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(n_routed_experts=8, n_group=3), "n_group"),
        (dict(n_routed_experts=8, n_group=2, topk_group=3), "topk_group"),
        (dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
        (dict(n_shared_experts=0), "n_shared_experts"),
        (dict(moe_intermediate_size="8"), "moe_intermediate_size"),
        (dict(routed_scaling_factor=0), "routed_scaling_factor"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
        (dict(use_qk_norm=1), "use_qk_norm"),
        (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
        (
            dict(
                head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1},
            ),
            "partial_rotary",
        ),
    ],
)
def test_config_errors_name_the_key(bad, match):
    from autolm.models.glm4_moe import Glm4MoeConfig

    with pytest.raises(autolm.ConfigError, match=match):
        Glm4MoeConfig(**{"head_dim": 128, **bad})
