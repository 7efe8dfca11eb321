"""AFMoE (Arcee's Trinity) against transformers and peft: GQA with per-head q/k norms and the sigmoid output gate
(`gate_proj`), head_dim != hidden / heads; three local layers (a 5-slot window shorter than the prompts, RoPE) then
a global one (no RoPE); the four norms around each sublayer; muP's embedding scale; a dense first layer then three
mixture layers of 8 experts (sigmoid scores steered by a random expert_bias, renormalised, times route_scale) plus
2 shared experts; the checkpoint as transformers writes it (one tensor per expert). Also a model with the global
layer every second one, attention biases, two dense layers and no muP. The standard battery, GGUF as llama.cpp's
AfmoeModel converter writes it (in, and out of autolm: the same file), and the CLI (Trinity's chat template is not
among the test data: ChatML stands in)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_mimic import add_text_model, add_toy_vocab, stacked_experts
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm
from autolm.models.afmoe import AfmoeConfig

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_dense_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=64,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=2,
    route_scale=2.5,
    global_attn_every_n_layers=4,  # layers 0-2 local, 3 global (NoPE)
    sliding_window=5,
    mup_enabled=True,
    # the released config's keys transformers ignores (llama.cpp's converter reads them)
    route_norm=True,
    score_func="sigmoid",
    n_group=1,
    topk_group=1,
)
# peft has no default for afmoe; nor can it target the attention's gate_proj: its MoE conversion for the type takes
# every gate_proj for the experts' (fused with up_proj into gate_up_proj) and refuses it without up_proj
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TRINITY = Family("AfmoeConfig", SIZES, lora_targets=TARGETS)
# what llama.cpp's afmoe cannot run: another global-layer interval, attention biases, no muP
HYBRID = Family(
    "AfmoeConfig",
    dict(SIZES, global_attn_every_n_layers=2, attention_bias=True, num_dense_layers=2, mup_enabled=False),
    lora_targets=TARGETS,
)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer without merges (what GGUF out writes fast)."""
    return _byte_tokenizer(tmp_path_factory.mktemp("byte_tokenizer") / "tokenizer")


@pytest.mark.parametrize("family", [TRINITY, HYBRID], ids=["trinity", "hybrid"])
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    TRINITY.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    TRINITY.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("family", [TRINITY, HYBRID], ids=["trinity", "hybrid"])
def test_one_token_step(family, tmp_path_factory):
    family.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    TRINITY.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    TRINITY.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    TRINITY.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    TRINITY.check_disk_offload(tmp_path_factory, tmp_path)


def test_layers_routing_and_gate(tmp_path_factory):
    """Layer 0 dense, the others mixtures with shared experts; local layers windowed and rotated, the global one
    neither; the checkpoint's random expert_bias loaded (transformers' values) and it changes the logits, as do the
    attention's output gate and muP's scale."""
    directory, hf = TRINITY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    layers = model.model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["GatedMLP", *["AfmoeSparseMoeBlock"] * 3]
    assert all(hasattr(layer.mlp, "shared_experts") for layer in layers[1:])
    assert [layer.self_attn.sliding_window for layer in layers] == [5, 5, 5, None]
    assert [layer.self_attn.rope for layer in layers] == ["default", "default", "default", None]
    for i in (1, 2, 3):
        ours, theirs = layers[i].mlp.expert_bias, hf.model.layers[i].mlp.expert_bias
        assert ours.abs().min() > 0 and torch.equal(ours, theirs)
        assert not ours.requires_grad  # as transformers: not trained
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for layer in layers[1:]:
            layer.mlp.expert_bias.zero_()
        no_bias = model(ids, attention_mask=mask).logits
        layers[0].self_attn.gate_proj.weight.zero_()
        no_gate = model(ids, attention_mask=mask).logits
        model.config.mup_enabled = False
        no_mup = model(ids, attention_mask=mask).logits
    for a, b in ((before, no_bias), (no_bias, no_gate), (no_gate, no_mup)):
        assert not torch.allclose(a, b, atol=1e-3)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the checkpoint's per-expert tensors and only its config keys in the
    files autolm saves."""
    from safetensors import safe_open

    TRINITY.check_save(tmp_path_factory, tmp_path)
    directory, hf = TRINITY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        assert {
            "model.layers.1.mlp.experts.7.gate_proj.weight",
            "model.layers.2.mlp.expert_bias",
            "model.layers.3.mlp.router.gate.weight",
            "model.layers.0.self_attn.gate_proj.weight",
        } <= set(ours.keys())
    keys = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(keys[1]) - {"transformers_version"} == set(keys[0]) - {"transformers_version"}
    assert keys[1]["route_norm"] is True and keys[1]["score_func"] == "sigmoid"


# ---- GGUF: llama.cpp's AfmoeModel converter, emulated -----------------------------------------------------------


def write_afmoe_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter (AfmoeModel, --outtype f32) makes of transformers' AFMoE `hf`, from the
    checkpoint files: LlamaModel's keys (TextModel's sizes, head counts, RoPE base, RMS epsilon, expert counts, the
    gating function from score_func, the head size as key/value length; the vocabulary size, rope.dimension_count),
    then the shared experts, their length, the leading dense layers, route_norm and route_scale, the window; no q/k
    permutation; each layer's experts stacked, expert_bias as exp_probs_b.bias; a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c, hp = hf.config, json.load(open(f"{hf.name_or_path}/config.json"))
    w = gguf.GGUFWriter(path, "afmoe")
    add_text_model(w, c)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if hp.get("n_group") is not None:
        w.add_expert_group_count(hp["n_group"])
    if hp.get("topk_group") is not None:
        w.add_expert_group_used_count(hp["topk_group"])
    if hp.get("score_func") == "sigmoid":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(hp["head_dim"])
    w.add_expert_shared_count(c.num_shared_experts)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_leading_dense_block_count(c.num_dense_layers)
    if hp.get("route_norm") is not None:
        w.add_expert_weights_norm(hp["route_norm"])
    w.add_expert_weights_scale(c.route_scale)
    if hp.get("sliding_window") is not None:
        w.add_sliding_window(hp["sliding_window"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.AFMOE, c.num_hidden_layers)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".mlp.experts.", c.num_experts):
        name = name.replace(".expert_bias", ".expert_bias.bias")
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as AfmoeForCausalLM with transformers' logits (llama.cpp's fixed layer pattern,
    muP and the window read back); int8 from it quantizes the experts."""
    _, hf = TRINITY.checkpoint(tmp_path_factory)
    write_afmoe_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "AfmoeForCausalLM"
    c = model.config
    assert (c.layer_types, c.sliding_window, c.mup_enabled) == (hf.config.layer_types, 5, True)
    assert (c.head_dim, c.num_shared_experts, c.num_dense_layers, c.route_scale) == (32, 2, 1, 2.5)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[1].mlp.experts).__name__ == "Int8Experts"


def test_gguf_without_renormalisation_is_refused(tmp_path_factory, tmp_path):
    """A file whose config.json had no route_norm (llama.cpp would not renormalise the top k) is refused by name."""
    import shutil
    from types import SimpleNamespace

    directory, hf = TRINITY.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    del config["route_norm"]
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    write_afmoe_gguf(SimpleNamespace(config=hf.config, name_or_path=str(tmp_path / "plain")),
                     str(tmp_path / "m.gguf"))  # fmt: skip
    with pytest.raises(autolm.ConfigError, match="expert_weights_norm"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")


@pytest.mark.parametrize(
    "refused", ["global_attn_every_n_layers", "attention_bias", "mup_enabled", "layer RoPE"]
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(refused, tmp_path_factory, tmp_path, byte_tokenizer):
    """Another global-layer interval (llama.cpp's afmoe makes every 4th layer global, the others rotated),
    attention biases (it reads none), no muP (it always scales the embeddings): refused, naming each field, and no
    file."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(HYBRID.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


# ---- CLI, config -------------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    long = Family(TRINITY.config_cls, dict(TRINITY.kwargs, max_position_embeddings=2048))
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "AfmoeForCausalLM (afmoe)")


def test_default_config_is_transformers():
    """AfmoeConfig holds transformers' defaults (initializer_range aside); layer_types derived as transformers
    derives them."""
    import transformers

    theirs = json.loads(transformers.AfmoeConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert AfmoeConfig().to_dict() == theirs
    for kw in (dict(num_hidden_layers=6, global_attn_every_n_layers=3), dict(num_hidden_layers=2)):
        assert AfmoeConfig.from_dict(kw).layer_types == transformers.AfmoeConfig(**kw).layer_types


# Trinity-Mini's config.json (released spelling: rope_theta at the top level, keys transformers ignores)
TRINITY_MINI = {
    "architectures": ["AfmoeForCausalLM"], "model_type": "afmoe", "global_attn_every_n_layers": 4, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
    "layer_types": ["sliding_attention"] * 3 + ["full_attention"], "max_position_embeddings": 131072,
    "moe_intermediate_size": 1024, "mup_enabled": True, "n_group": 1, "num_attention_heads": 32,
    "num_dense_layers": 2, "num_expert_groups": 1, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 4, "num_key_value_heads": 4, "num_limited_groups": 1, "num_shared_experts": 1,
    "rms_norm_eps": 1e-5, "rope_theta": 10000, "route_norm": True, "route_scale": 2.826, "score_func": "sigmoid",
    "sliding_window": 2048, "tie_word_embeddings": False, "topk_group": 1, "use_grouped_mm": True,
    "vocab_size": 200192,
}  # fmt: skip


def test_released_config_reads_and_round_trips():
    """The released config.json: its fields read (RoPE from rope_theta), the keys transformers ignores kept, and
    written back as read."""
    c = AfmoeConfig.from_dict(TRINITY_MINI)
    assert (c.rope_theta, c.mup_enabled, c.route_scale, c.num_dense_layers) == (10000, True, 2.826, 2)
    assert [c.layer_window(i) for i in range(4)] == [2048, 2048, 2048, None]
    assert [c.layer_rope(i) for i in range(4)] == ["default", "default", "default", None]
    assert c.extra["route_norm"] is True and c.extra["score_func"] == "sigmoid"
    assert c.to_dict() == {**TRINITY_MINI, **{k: v for k, v in c.to_dict().items() if k not in TRINITY_MINI}}
    assert set(c.to_dict()) - set(TRINITY_MINI) <= {"attention_bias", "attention_dropout", "bos_token_id",
        "eos_token_id", "pad_token_id", "output_router_logits", "rope_scaling", "use_cache"}  # fmt: skip


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_experts=0), "experts"),
        (dict(num_dense_layers=-1), "num_dense_layers"),
        (dict(num_dense_layers=None), "num_dense_layers"),
        (dict(num_shared_experts=0), "num_shared_experts"),
        (dict(moe_intermediate_size="8"), "moe_intermediate_size"),
        (dict(route_scale=0), "route_scale"),
        (dict(route_scale="2"), "route_scale"),
        (dict(global_attn_every_n_layers=0), "global_attn_every_n_layers"),
        (dict(mup_enabled="yes"), "mup_enabled"),
        (dict(attention_bias=1), "attention_bias"),
        (dict(layer_types=["sliding_attention"] * 3), "layer_types"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(autolm.ConfigError, match=match):
        AfmoeConfig.from_dict({"num_hidden_layers": 4, **bad})
