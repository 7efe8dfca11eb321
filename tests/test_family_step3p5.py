"""Step 3.5 (StepFun) against transformers' Step3p7ForConditionalGeneration (transformers has no text-only model:
the image-text model runs text, a one-layer vision tower beside it) and peft. XS: full / sliding / sliding / full
layers (a 5-slot window shorter than the prompts), 6 query heads on the sliding layers and 4 on the full ones (2
KV heads), the full layers rotating half of each head (base 500000), the sliding ones all of it (base 10000),
Gemma-style norms, per-head q/k norms, a per-head sigmoid output gate, scores scaled by query_pre_attn_scalar 12
(not head_dim 16); a dense first layer, then mixtures of 8 experts (sigmoid scores steered by a random correction
bias, renormalised, times 2.5) plus a shared MLP, with SwiGLU clamps per layer on the experts and on the shared /
dense MLPs (small enough to bite). G: the same but scaled by head_dim (what llama.cpp's "step35" runs), for GGUF.
The checkpoint as transformers writes it (the experts stacked under moe.*, the router's bias as moe.router_bias,
the shared MLP as share_expert, the vision tower beside). Config defaults, the Hub's config.json spelling, errors
by name; GGUF in (the converter's file) and out, with the llama.cpp oracle where llama_cpp is installed."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import VOCAB, padded_batch, positions, randomize
from family_checks import _CACHE, Family
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm
from autolm.models.step3p5 import Step3p5Config, Step3p5ForCausalLM

TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    share_expert_dim=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    sliding_window=5,
    num_sliding_attention_heads=6,
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    swiglu_limits=[None, 0.5, None, 0.25],
    swiglu_limits_shared=[0.375, None, 0.5, 0.25],
    moe_router_scaling_factor=2.5,
    rope_theta=[500000.0, 10000.0, 10000.0, 500000.0],
    partial_rotary_factors=[0.5, 1.0, 1.0, 0.5],
    query_pre_attn_scalar=12,
)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)  # fmt: skip


class StepFamily(Family):
    """The Family battery on Step3p7ForConditionalGeneration's checkpoint (text_config from `kwargs`)."""

    def checkpoint(self, tmp_path_factory, dtype=None):
        import transformers

        key = ("step3p7", repr(sorted(self.kwargs.items())), str(dtype))
        if key not in _CACHE:
            text = dict(self.kwargs, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
            cfg = transformers.Step3p7Config(text_config=text, vision_config=VISION)
            torch.manual_seed(0)
            model = transformers.Step3p7ForConditionalGeneration(cfg)
            randomize(model)
            with torch.no_grad():  # a buffer randomize leaves at zero: steer the routing
                for layer in model.model.language_model.layers:
                    if hasattr(layer.mlp, "gate"):
                        layer.mlp.gate.e_score_correction_bias.copy_(
                            torch.randn(self.kwargs["n_routed_experts"])
                        )
            if dtype is not None:
                model = model.to(dtype)
            d = str(tmp_path_factory.mktemp("step3p7"))
            model.save_pretrained(d)
            ref = transformers.Step3p7ForConditionalGeneration.from_pretrained(
                d, dtype="auto", attn_implementation="eager"
            )
            _CACHE[key] = (d, ref.eval())
        return _CACHE[key]


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj"]  # peft has no default for step3p5
XS = StepFamily("Step3p7Config", TEXT, lora_targets=TARGETS)
# llama.cpp's scale; clamps that bite less (XS's flip a near-tie in the routing under llama.cpp's float16 cache)
G = StepFamily("Step3p7Config", dict(TEXT, query_pre_attn_scalar=None, swiglu_limits=[None, 2.0, None, 1.0],
                                     swiglu_limits_shared=[1.5, None, 2.0, 1.0]), lora_targets=TARGETS)  # fmt: skip


@pytest.mark.parametrize("family", [XS, G], ids=["xs", "g"])
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    XS.check_generate(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    XS.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    XS.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    XS.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    XS.check_quantized(tmp_path_factory, bits)


def test_bf16(tmp_path_factory):
    """bf16 logits no further from the fp32 model's than transformers' bf16 logits are (some slack)."""
    import transformers

    directory, hf = XS.checkpoint(tmp_path_factory)
    ids, mask = padded_batch()
    real = mask.bool()
    half = transformers.Step3p7ForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16,
                                                                       attn_implementation="eager")  # fmt: skip
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    with torch.no_grad():
        truth = hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = half(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[real].float()
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real].float()
    assert (ours - truth).abs().mean() <= 1.5 * (theirs - truth).abs().mean() + 1e-3


def test_layers_heads_clamps_and_gate(tmp_path_factory):
    """Per-layer heads, windows, RoPE tables, scale and clamps as configured; the random router bias loaded (from
    moe.router_bias) and it changes the logits, as do the clamps and the output gate."""
    directory, hf = XS.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model) is Step3p5ForCausalLM
    layers = model.model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["ClampedGatedMLP", *["SparseMoeBlock"] * 3]
    assert [layer.self_attn.num_heads for layer in layers] == [4, 6, 6, 4]
    assert [layer.self_attn.sliding_window for layer in layers] == [None, 5, 5, None]
    assert layers[0].self_attn.scaling == 12**-0.5
    assert [layer.mlp.experts.limit for layer in layers[1:]] == [0.5, None, 0.25]
    assert [layers[0].mlp.limit] + [layer.mlp.shared_experts.limit for layer in layers[1:]] == [
        0.375,
        None,
        0.5,
        0.25,
    ]
    theirs = hf.model.language_model.layers[1].mlp.gate.e_score_correction_bias
    assert layers[1].mlp.gate.e_score_correction_bias.abs().min() > 0
    assert torch.equal(layers[1].mlp.gate.e_score_correction_bias, theirs)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for layer in layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        no_bias = model(ids, attention_mask=mask).logits
        for layer in layers[1:]:
            layer.mlp.experts.limit = layer.mlp.shared_experts.limit = None
        no_clamp = model(ids, attention_mask=mask).logits
        layers[0].self_attn.g_proj.weight.zero_()
        no_gate = model(ids, attention_mask=mask).logits
    for a, b in ((before, no_bias), (no_bias, no_clamp), (no_clamp, no_gate)):
        assert not torch.allclose(a, b, atol=1e-3)


def test_save_round_trip_and_config(tmp_path_factory, tmp_path):
    """Saved, the model loads back bit-identical as the text family (model_type step3p5); its config.json holds the
    checkpoint's text_config keys and values."""
    directory, hf = XS.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "saved")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert back.config.model_type == "step3p5"
    sd = model.state_dict()
    assert sd.keys() == back.state_dict().keys()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())
    ours = {k.removeprefix("model."): tuple(v.shape) for k, v in sd.items() if k != "lm_head.weight"}
    theirs = {k.removeprefix("model.language_model."): tuple(v.shape) for k, v in hf.state_dict().items()
              if k.startswith("model.language_model.")}  # fmt: skip
    assert ours == theirs
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())["text_config"]
    for key, value in original.items():
        if key != "per_layer_config":
            assert written[key] == value, key
    assert {int(k): v for k, v in written["per_layer_config"].items()} == {
        int(k): v for k, v in original["per_layer_config"].items()
    }


def test_config_defaults():
    """Every field autolm's config writes by default holds transformers' Step3p7TextConfig default (its
    per_layer_config as transformers writes it)."""
    import transformers

    theirs = transformers.Step3p7TextConfig().to_dict()
    for key, value in Step3p5Config().to_dict().items():
        if key not in ("model_type", "transformers_version"):
            assert theirs[key] == value, key


def test_hub_config_spelling():
    """The Hub's config.json spelling (per-layer rope_theta / partial_rotary_factors, moe_layers_enum,
    attention_other_setting, lists padded with an MTP layer) reads as transformers reads it."""
    import transformers

    hub = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_attention_groups=2, head_dim=16,
               num_nextn_predict_layers=1, moe_layers_enum="2,3,4", sliding_window=8,
               layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                            "full_attention"],
               rope_theta=[5e5, 1e4, 1e4, 5e5, 5e5], partial_rotary_factors=[0.5, 1.0, 1.0, 0.5, 0.5],
               attention_other_setting={"num_attention_heads": 8, "num_attention_groups": 2},
               swiglu_limits=[0.0, 0.0, 7.0, 7.0, 0.0], hidden_act="swigluoai")  # fmt: skip
    ours = Step3p5Config.from_dict(dict(hub))
    theirs = transformers.Step3p7TextConfig(**{k: v for k, v in hub.items() if k != "num_attention_groups"},
                                            num_key_value_heads=2)  # fmt: skip
    for key in ("layer_types", "mlp_layer_types", "mtp_layer_types", "mtp_mlp_layer_types", "rope_parameters",
                "num_sliding_attention_heads", "swiglu_limits", "hidden_act", "num_key_value_heads"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert [ours.layer_heads(i) for i in range(4)] == [4, 8, 8, 4]


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(gating="per-element"), "gating"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(num_sliding_attention_heads=3), "num_sliding_attention_heads"),
        (dict(swiglu_limits=[1.0]), "swiglu_limits"),
        (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
    ],
)
def test_config_errors_name_the_field(change, field):
    with pytest.raises(autolm.ConfigError, match=field):
        Step3p5Config.from_dict({**TEXT, **change})


# ---- GGUF ----------------------------------------------------------------------------------------------------

_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.g_proj": "attn_gate",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "moe.gate": "ffn_gate_inp", "moe.router_bias": "exp_probs_b", "moe.gate_proj": "ffn_gate_exps",
          "moe.up_proj": "ffn_up_exps", "moe.down_proj": "ffn_down_exps", "share_expert.gate_proj": "ffn_gate_shexp",
          "share_expert.up_proj": "ffn_up_shexp", "share_expert.down_proj": "ffn_down_shexp"}  # fmt: skip


def write_step35_gguf(directory: str, path: str) -> None:
    """The GGUF llama.cpp's Step35Model converter makes (--outtype f32) of the checkpoint, as from the release's
    config.json spelling (per-layer rope_theta / partial_rotary_factors, norm_expert_weight true): TextModel's keys,
    heads per layer, the window and its pattern, the experts' keys, the clamps; norms + 1, the router's bias as
    exp_probs_b.bias, the rest by gguf-py's map; a toy vocabulary."""
    import gguf
    from gguf_mimic import add_toy_vocab
    from safetensors.torch import load_file

    hp = json.load(open(f"{directory}/config.json"))["text_config"]
    n, types = hp["num_hidden_layers"], hp["layer_types"]
    w = gguf.GGUFWriter(path, "step35")
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(n)
    w.add_head_count([hp["num_sliding_attention_heads"] if t == "sliding_attention" else hp["num_attention_heads"]
                      for t in types])  # fmt: skip
    w.add_head_count_kv([hp["num_key_value_heads"]] * n)
    w.add_rope_freq_base(hp["rope_parameters"]["full_attention"]["rope_theta"])
    if "sliding_attention" in hp["rope_parameters"]:
        w.add_rope_freq_base_swa(hp["rope_parameters"]["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_expert_count(hp["n_routed_experts"])
    w.add_expert_used_count(hp["num_experts_per_tok"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_sliding_window(hp["sliding_window"] or 0)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_expert_shared_feed_forward_length(hp["share_expert_dim"])
    w.add_expert_weights_scale(hp["moe_router_scaling_factor"])
    w.add_expert_weights_norm(True)
    types = hp["mlp_layer_types"]
    w.add_leading_dense_block_count(types.index("sparse") if "sparse" in types else len(types))
    w.add_moe_every_n_layers(1)
    if hp.get("swiglu_limits") is not None:
        w.add_swiglu_clamp_exp([float(v or 0.0) for v in hp["swiglu_limits"]])
    if hp.get("swiglu_limits_shared") is not None:
        w.add_swiglu_clamp_shexp([float(v or 0.0) for v in hp["swiglu_limits_shared"]])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    for name, t in load_file(f"{directory}/model.safetensors").items():
        if name.startswith(("vision_model.", "vit_large_projector.")):
            continue
        t = t.float() + 1.0 if name.endswith("norm.weight") else t.float()
        base, kind = name.rsplit(".", 1) if not name.endswith("router_bias") else (name, "bias")
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
        out = f"blk.{m.group(1)}.{_NAMES[m.group(2)]}" if m else _NAMES[base]
        w.add_tensor(f"{out}.{kind}", np.ascontiguousarray(t.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """The converter's file loads as Step3p5ForCausalLM with transformers' logits (heads per layer, layer types by
    the pattern, RoPE by layer type, dense / sparse layers, clamps, routing scale read back); autolm's GGUF out reads
    back as the same model; llama.cpp runs both files with close logits."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf

    directory, hf = G.checkpoint(tmp_path_factory)
    path = str(tmp_path / "model.gguf")
    write_step35_gguf(directory, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model) is Step3p5ForCausalLM
    c, h = model.config, hf.config.text_config
    for name in ("layer_types", "mlp_layer_types", "head_dim", "num_sliding_attention_heads", "swiglu_limits",
                 "swiglu_limits_shared", "moe_router_scaling_factor", "share_expert_dim", "sliding_window",
                 "query_pre_attn_scalar"):  # fmt: skip
        assert getattr(c, name) == getattr(h, name), name
    with torch.no_grad():
        ours, theirs = model(ROW).logits[0], hf(input_ids=ROW).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    out = save_gguf(autolm.AutoModelForCausalLM.from_pretrained(directory), merged_tokenizer,
                    str(tmp_path / "out.gguf"), "f32")  # fmt: skip
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    assert back.config.layer_types == h.layer_types
    with torch.no_grad():
        torch.testing.assert_close(back(ROW).logits[0], theirs, atol=1e-4, rtol=1e-4)
    _close_to_llama_cpp(ours, llama_cpp_logits(path))
    _close_to_llama_cpp(ours, llama_cpp_logits(out))


@pytest.mark.parametrize(
    "change, refused",
    [
        (dict(query_pre_attn_scalar=12), "query_pre_attn_scalar"),
        (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
         "rope_parameters"),
        (dict(sliding_window=None), "layer_types"),
        (dict(layer_types=["full_attention"] * 4), "layer_types"),  # llama.cpp's step35 asserts a sliding layer
    ],
)  # fmt: skip
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    change,
    refused,
    tmp_path_factory,
    tmp_path,
    merged_tokenizer,  # noqa: F811
):
    """Another score scale (llama.cpp scales by head_dim), the full layers rotating other than half of each head,
    sliding layers with no window, no sliding layer (llama.cpp's graph asserts one): refused, naming the field, and no file."""
    from autolm.gguf_writer import save_gguf

    config = autolm.AutoModelForCausalLM.from_pretrained(G.checkpoint(tmp_path_factory)[0]).config.to_dict()
    model = Step3p5ForCausalLM(Step3p5Config.from_dict({**config, **change}))
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, merged_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
