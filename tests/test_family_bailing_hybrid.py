"""Ling 3.0 (bailing_hybrid) against transformers and peft: KDA layers (one-projection forget gate, bounded or
softplus; one-projection output gate; short convs) beside latent attention with a plain q_proj, interleaved RoPE
and a sigmoid gate per head; dense and mixture feed-forward blocks by mlp_layer_types (grouped sigmoid routing,
renormalised or not, shared experts). Two checkpoints: BH (the schedule from layer_group_size, the bounded gate,
expert groups) and a variant (the softplus gate, a mixture first, listed layer kinds, values wider than keys, KDA
heads of their own head_dim, a 3-tap conv, two shared experts, top k not renormalised, another rope_theta). The
recurrent battery (pieces through the cache, the serving engine, the compiled one-token graphs carrying the
states), the eager one-token step, bf16, LoRA vs peft, quantized (int4: on these tiny random checkpoints the bf16 remainder of an int8 model errs
more than int8 itself), saving in the released names transformers writes (and reads: every checkpoint here is in
them), the multi-token prediction layer skipped, config.json as transformers writes it, config errors. GGUF as
llama.cpp's "bailingmoe3" (models.bailing_hybrid_gguf): the converter's file (write_bailingmoe3_gguf, from the
released names) loads with transformers' logits and runs in llama.cpp close to them, with its multi-token prediction
block skipped; autolm's file reads back equal and runs in llama.cpp (tied too); what llama.cpp's graph computes
otherwise is refused by field on GGUF out."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults
from safetensors.torch import load_file, save_file
from test_gguf_out import byte_tokenizer, merged_tokenizer  # noqa: F401  (merges: llama.cpp's "gpt2" vocabulary)

import autolm
from autolm.errors import ConfigError
from autolm.models.bailing_hybrid import BailingHybridConfig

SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
             head_dim=8, num_local_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
             layer_group_size=2, max_position_embeddings=128)  # fmt: skip
LORA = ["q_proj", "kv_b_proj", "o_proj", "g_proj", "f_proj", "gate_proj"]  # peft has no default
BH = Family("BailingHybridConfig", SIZES, lora_targets=LORA)
VARIANT = Family(
    "BailingHybridConfig",
    dict(SIZES, kda_safe_gate=False, layer_types=["full_attention", "linear_attention", "linear_attention"],
         mlp_layer_types=["sparse", "dense", "sparse"], v_head_dim=24, head_dim=12, short_conv_kernel_size=3,
         n_shared_experts=2, norm_topk_prob=False, routed_scaling_factor=1.5, rope_theta=5000.0,
         rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    lora_targets=["kv_a_proj_with_mqa", "v_proj", "b_proj", "down_proj"],
)  # fmt: skip
FAMILIES = {"bh": BH, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_gates_matter(tmp_path_factory):
    """With the attention's head gate or the KDA layers' forget-gate bound changed, the logits are not
    transformers' (each piece is exercised)."""
    directory, hf = BH.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits[mask.bool()]
        model.model.layers[1].self_attn.g_proj.weight.zero_()
        assert not torch.allclose(model(ids, attention_mask=mask).logits[mask.bool()], want, atol=1e-3)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.model.layers[0].self_attn.forget_gate.lower_bound = -1.0
    with torch.no_grad():
        assert not torch.allclose(model(ids, attention_mask=mask).logits[mask.bool()], want, atol=1e-3)


def test_generate(tmp_path_factory):
    BH.check_generate(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    """Pieces through the cache, the serving engine and the compiled one-token graphs with the KDA states."""
    BH.check_recurrent(tmp_path_factory, tmp_path)


def test_one_token_step(tmp_path_factory):
    VARIANT.check_one_token_step(tmp_path_factory)


def test_bf16(tmp_path_factory):
    BH.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    VARIANT.check_lora(tmp_path_factory, tmp_path)


def test_quantized(tmp_path_factory):
    BH.check_quantized(tmp_path_factory, "int4")


def test_save(tmp_path_factory, tmp_path):
    """Saved as transformers saves (the released names: word_embeddings, attention / dense, q/k/v_conv1d, the
    forget gate on the layer, per-expert tensors, expert_bias) and config.json's keys (linear_head_dim beside
    head_dim = qk_rope_head_dim); transformers' names in the state dict."""
    model, saved = VARIANT.check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.word_embeddings.weight", "model.layers.1.attention.f_proj.weight",
            "model.layers.0.attention.dense.weight", "model.layers.1.attention.k_conv1d.weight",
            "model.layers.2.mlp.experts.7.up_proj.weight", "model.layers.0.mlp.gate.expert_bias"} <= saved  # fmt: skip
    assert "model.layers.1.self_attn.forget_gate.f_proj.weight" in model.state_dict()
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["linear_head_dim"] == 12 and written["head_dim"] == 8 and written["num_experts"] == 8
    assert written["rope_parameters"]["rope_theta"] == 5000.0 and "q_lora_rank" not in written


def test_names_and_config(tmp_path_factory, tmp_path):
    model, _ = BH.check_names_and_config(tmp_path_factory, tmp_path)
    assert model.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert model.config.mlp_layer_types == ["dense", "sparse", "sparse"]


def test_mtp_layer_skipped(tmp_path_factory, tmp_path):
    """The released files' multi-token prediction layer (model.layers.<num_hidden_layers>.*) is not loaded; the
    logits stay transformers'."""
    directory, hf = BH.checkpoint(tmp_path_factory)
    sd = load_file(f"{directory}/model.safetensors")
    sd["model.layers.3.attention.q_proj.weight"] = torch.zeros(96, 64)
    sd["model.layers.3.mlp.gate.expert_bias"] = torch.zeros(8)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(f"{directory}/config.json").read())
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids, mask = padded_batch()
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-4, rtol=1e-4)


def test_config_defaults_are_transformers():
    check_config_defaults(BailingHybridConfig)
    c = BailingHybridConfig()
    assert (c.linear_head_dim, c.head_dim, c.linear_num_heads, c.linear_conv_kernel_dim) == (128, 64, 32, 4)
    assert c.layer_types[:6] == ["linear_attention"] * 5 + ["full_attention"]


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(q_lora_rank=16), "q_lora_rank"),
        (dict(rope_interleave=False), "rope_interleave"),
        (dict(layer_group_size=0), "layer_group_size"),
        (dict(kda_lower_bound="low"), "kda_lower_bound"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(mlp_layer_types=["dense"]), "mlp_layer_types"),
    ],
)
def test_config_errors(change, field):
    base = BailingHybridConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, hidden_size=64
    ).to_dict()
    with pytest.raises(ConfigError, match=field):
        BailingHybridConfig.from_dict({**base, **change})


# ---- GGUF: llama.cpp's BailingMoeV3Model converter (arch "bailingmoe3") -------------------------------------------

# what llama.cpp's bailingmoe3 holds: the bounded gate, KDA heads as the attention heads, leading dense layers; a
# layer count that is a multiple of layer_group_size (the converter makes the layers after the last whole group full
# attention, where transformers makes them KDA layers), KDA heads wider than the RoPE part, expert groups, two shared
# experts, a 3-tap conv, another bound and scale
GGUF_FAMILY = Family(
    "BailingHybridConfig",
    dict(SIZES, num_hidden_layers=4, head_dim=12, n_shared_experts=2, short_conv_kernel_size=3,
         routed_scaling_factor=1.5, kda_lower_bound=-3.0),
    lora_targets=LORA,
)  # fmt: skip
ARCH = "bailingmoe3"
# the released names in a layer -> llama.cpp's (gguf-py's tensor map for bailingmoe3; this gguf-py has none); g_proj
# and f_proj by the layer's kind, as BailingMoeV3Model.modify_tensors
_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "attention.q_proj": "attn_q",
    "attention.k_proj": "attn_k", "attention.v_proj": "attn_v", "attention.dense": "attn_output",
    **{f"attention.{p}_conv1d": f"ssm_conv1d_{p}" for p in "qkv"}, "attention.f_proj": "ssm_f_a",
    "attention.b_proj": "ssm_beta", "attention.o_norm": "ssm_norm", "attention.A_log": "ssm_a",
    "attention.dt_bias": "ssm_dt", "attention.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "attention.kv_a_layernorm": "attn_kv_a_norm", "attention.k_b_proj": "attn_k_b", "attention.v_b_proj": "attn_v_b",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "mlp.gate.expert_bias": "exp_probs_b", "eh_proj": "nextn.eh_proj", "enorm": "nextn.enorm", "hnorm": "nextn.hnorm",
    "final_layernorm": "layer_output_norm",
    **{f"mlp.shared_experts.{p}_proj": f"ffn_{p}_shexp" for p in ("gate", "up", "down")},
    **{f"mlp.experts.{p}_proj": f"ffn_{p}_exps" for p in ("gate", "up", "down")},
}  # fmt: skip
_TOP = {"model.word_embeddings.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}  # fmt: skip


def _gguf_keys(w, c, nextn: int) -> None:
    """TextModel.set_gguf_parameters (num_key_value_heads 1; head_dim: the released config.json's, the KDA heads'),
    then BailingMoeV3Model's, of transformers' config `c` in the released spelling; `nextn` multi-token prediction
    blocks counted in the block count and the per-layer keys."""
    import gguf

    a, n, lora, rope = ARCH, c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim
    w.add_block_count(n + nextn)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)  # score_function "sigmoid"
    w.add_value_length(c.linear_head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    full = [
        (i + 1) % c.layer_group_size == 0 or i >= n // c.layer_group_size * c.layer_group_size
        for i in range(n)
    ]
    assert full == [t == "full_attention" for t in c.layer_types]  # the converter's schedule is transformers'
    w.add_head_count_kv([int(f) for f in full] + [1] * nextn)
    w.add_vocab_size(c.vocab_size)
    w.add_ssm_conv_kernel(c.short_conv_kernel_size)
    w.add_kda_head_dim(c.linear_head_dim)
    w.add_bool(f"{a}.kda.safe_gate", c.kda_safe_gate)
    w.add_float32(f"{a}.kda.gate_lower_bound", c.kda_lower_bound)
    w.add_kv_lora_rank(lora)
    w.add_rope_dimension_count(rope)
    w.add_key_length(lora + rope)
    w.add_key_length_mla(c.qk_nope_head_dim + rope)
    w.add_value_length_mla(c.v_head_dim)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(c.moe_intermediate_size * c.n_shared_experts)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    if nextn:
        w.add_nextn_predict_layers(nextn)


def write_bailingmoe3_gguf(hf, path: str, nextn: int = 0) -> None:
    """The GGUF llama.cpp's BailingMoeV3Model converter (--outtype f32, --no-mtp) makes of transformers' checkpoint
    `hf` (the released names): its keys, the experts stacked, kv_b_proj split into attn_k_b / attn_v_b, the convs
    (1, d_inner, 1, K), A_log as exp(A_log) (heads, 1), dt_bias as ssm_dt.bias, f_proj / g_proj as ssm_f_a / ssm_g_a in
    the KDA layers, g_proj as attn_gate in the others; a plain vocabulary. `nextn`: with a multi-token prediction
    block (the last layer's tensors, eh_proj and its norms) after the layers, as without --no-mtp."""
    import re

    import gguf
    import numpy as np
    from gguf_mimic import add_toy_vocab, stacked_experts
    from gguf_moe import mla_pieces

    c = hf.config
    w = gguf.GGUFWriter(path, ARCH)
    _gguf_keys(w, c, nextn)
    add_toy_vocab(w)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    n, last, h = c.num_hidden_layers, f"model.layers.{c.num_hidden_layers - 1}.", c.hidden_size
    if nextn:  # a full-attention layer and a mixture, as the released block
        tensors.update(
            {k.replace(last, f"model.layers.{n}."): v for k, v in list(tensors.items()) if last in k}
        )
        tensors.update({f"model.layers.{n}.eh_proj.weight": torch.randn(h, 2 * h),
                        **{f"model.layers.{n}.{p}.weight": torch.ones(h) for p in ("enorm", "hnorm", "final_layernorm")}})  # fmt: skip
    for whole, stacked in stacked_experts(tensors, ".mlp.experts.", c.num_local_experts):
        for name, t in mla_pieces(whole, stacked, c.num_attention_heads, c.qk_nope_head_dim):
            if name in _TOP:
                w.add_tensor(_TOP[name], np.ascontiguousarray(t.float().numpy()))
                continue
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?", name)
            bid, stem, kind = int(m.group(1)), m.group(2), m.group(3) or "weight"
            if stem.endswith("_conv1d"):
                t = t.reshape(1, t.shape[0], 1, t.shape[-1])
            if stem.endswith("A_log"):
                t = torch.exp(t).reshape(-1, 1)
            if stem.endswith("dt_bias") or stem.endswith("expert_bias"):
                kind = "bias"
            out = _GGUF_NAMES.get(stem)
            if stem == "attention.g_proj":
                out = "attn_gate" if bid >= n or c.layer_types[bid] == "full_attention" else "ssm_g_a"
            name = f"blk.{bid}.{out}" if stem.endswith("A_log") else f"blk.{bid}.{out}.{kind}"
            w.add_tensor(name, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as BailingHybridForCausalLM (the layer kinds from the per-layer KV heads, the KDA and
    MLA sizes, the bound, the leading dense layer, the shared experts from their width, the groups) with transformers'
    logits, and llama.cpp's."""
    from test_gguf_remote_archs import _close_to_llama_cpp, _row, llama_cpp_logits

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    path = str(tmp_path / "model.gguf")
    write_bailingmoe3_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "BailingHybridForCausalLM"
    c = model.config
    assert c.layer_types == hf.config.layer_types and c.mlp_layer_types == [
        "dense",
        "sparse",
        "sparse",
        "sparse",
    ]
    assert (c.linear_head_dim, c.linear_num_heads, c.linear_conv_kernel_dim, c.kda_lower_bound) == (
        12,
        4,
        3,
        -3.0,
    )
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.head_dim) == (
        16,
        8,
        12,
        16,
        8,
    )
    assert (c.n_shared_experts, c.routed_scaling_factor, c.norm_topk_prob, c.n_group, c.topk_group) == (
        2, 1.5, True, 2, 1)  # fmt: skip
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    _close_to_llama_cpp(_row(model), llama_cpp_logits(path))


def test_gguf_mtp_block_skipped(tmp_path_factory, tmp_path):
    """The converter's file with the multi-token prediction block (as without --no-mtp: one more block, its KV head
    and nextn_predict_layers) loads as the same model (the block skipped) with transformers' logits."""
    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_bailingmoe3_gguf(hf, str(tmp_path / "mtp.gguf"), nextn=1)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mtp.gguf")
    assert model.config.num_hidden_layers == 4 and model.config.layer_types == hf.config.layer_types
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_out(tmp_path_factory, tmp_path, merged_tokenizer, tied):  # noqa: F811
    """save_gguf's file (the converter's keys and names: the KDA layers with no KV heads, ssm_a = exp(A_log), the two
    gates' names) loads back with the model's logits, and llama.cpp runs it with close logits; a tied head is written
    without output.weight (llama.cpp's loader takes token_embd)."""
    from test_gguf_remote_archs import _close_to_llama_cpp, _row, llama_cpp_logits

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    model = autolm.AutoModelForCausalLM.from_pretrained(GGUF_FAMILY.checkpoint(tmp_path_factory)[0])
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    path = str(tmp_path / "m.gguf")
    save_gguf(model, merged_tokenizer, path, "f32")
    g = GGUFFile(path)
    assert g.get("attention.head_count_kv") == [0, 1, 0, 1] and g.get("expert_gating_func") == 2
    assert g.get("expert_shared_feed_forward_length") == 32 and g.get("kda.safe_gate") is True
    shapes = {t.name: tuple(t.shape) for t in g.tensors}
    assert shapes["blk.0.ssm_a"] == (1, 4) and shapes["blk.0.ssm_g_a.weight"] == (64, 48)
    assert shapes["blk.1.attn_gate.weight"] == (64, 4) and "blk.1.attn_k_b.weight" in shapes
    assert ("output.weight" in shapes) is not tied
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back.config.tie_word_embeddings is tied
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        got = back(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _close_to_llama_cpp(_row(model), llama_cpp_logits(path))


@pytest.mark.parametrize(
    ("change", "refused"),
    [({"kda_safe_gate": False}, "kda_safe_gate"), ({"kda_lower_bound": 0.5}, "kda_lower_bound"),
     ({"linear_num_heads": 2}, "linear_num_heads"), ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
     ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 6e6}}, "rope_parameters"),
     ({"mlp_layer_types": ["sparse", "dense", "sparse", "sparse"]}, "mlp_layer_types"),
     ({"attention_bias": True}, "attention_bias")],
)  # fmt: skip
def test_gguf_out_refused(tmp_path_factory, tmp_path, byte_tokenizer, change, refused):  # noqa: F811
    """What llama.cpp's bailingmoe3 graph computes otherwise is refused, naming the field, and no file is left: the
    softplus gate, a bound not below 0, KDA heads other than the attention heads, an RMS epsilon but transformers'
    fixed l2-norm / latent one, a scaled RoPE, dense layers after a mixture, attention biases."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(GGUF_FAMILY.checkpoint(tmp_path_factory)[0])
    for key, value in change.items():
        setattr(model.config, key, value)
    with pytest.raises(ConfigError, match=refused):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
