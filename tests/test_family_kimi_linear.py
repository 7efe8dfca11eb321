"""Kimi Linear against transformers and peft: KDA layers (per-channel decay, short convs over separate q/k/v
projections, the sigmoid-gated output norm) beside MLA layers without RoPE (a plain q_proj in one checkpoint, the
low-rank query with attention biases in the other), dense and mixture feed-forward blocks by mlp_layer_types
(grouped sigmoid routing, renormalised or not, shared experts); the recurrent battery (pieces through the cache,
the serving engine), the chunked per-channel rule against the one-token recurrence, generation past a chunk,
the checkpoint's own names (block_sparse_moe, w1/w2/w3, q/k/v_conv1d, the forget gate on self_attn) and
config.json's attribute_map names, the Hub's linear_attn_config, config errors; GGUF as llama.cpp's "kimi-linear"
(its converter's file read, autolm's file read back, both run by llama.cpp where llama_cpp is installed, the
refusals of what its graph cannot run)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import SPECS, VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_gguf_out import byte_tokenizer, merged_tokenizer  # noqa: F401  (merges: llama.cpp's "gpt2" vocabulary)

import autolm
from autolm.errors import ConfigError

# conftest's tiny Kimi Linear, without its pad id (the battery's checkpoints keep transformers' default)
SIZES = {k: v for k, v in SPECS["kimi_linear"][1].items() if k != "pad_token_id"}
LORA = ["q_proj", "v_proj", "kv_a_proj_with_mqa", "o_proj", "g_a_proj"]  # peft has no default for kimi_linear
KIMI = Family("KimiLinearConfig", SIZES, lora_targets=LORA)
# the low-rank query with biases, a mixture first and last (not renormalised, two shared experts), a 3-tap conv
KIMI_Q = Family(
    "KimiLinearConfig",
    dict(
        SIZES,
        q_lora_rank=24,
        attention_bias=True,
        layer_types=["full_attention", "linear_attention", "linear_attention"],
        mlp_layer_types=["sparse", "dense", "sparse"],
        norm_topk_prob=False,
        n_shared_experts=2,
        routed_scaling_factor=1.5,
        linear_conv_kernel_dim=3,
    ),
    lora_targets=LORA,
)


@pytest.mark.parametrize("family", [KIMI, KIMI_Q], ids=["plain_q", "low_rank_q"])
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    KIMI.check_generate(tmp_path_factory)


def test_generate_past_a_chunk(tmp_path_factory):
    """40 new tokens after a 30-token prompt (the chunked scan, then the one-token recurrence) are transformers';
    the decoded logits equal the whole sequence's in one forward."""
    KIMI_Q.check_long_generation(tmp_path_factory, new=40, exact_length=True, whole_atol=1e-3)


def test_pieces(tmp_path_factory):
    """70 tokens in pieces through the cache give one forward's logits and transformers'; the KDA layers keep the
    conv's last K - 1 inputs and a (heads, d, d) fp32 state, the MLA layer its keys and values."""
    cache = KIMI.check_pieces(tmp_path_factory)
    conv, state = cache.state(0)
    assert tuple(conv.shape) == (2, 3 * 32, 3) and state.dtype == torch.float32
    assert tuple(state.shape) == (2, 4, 8, 8)
    assert cache.state(1) is None and cache.keys[1].shape[-1] == 24 and cache.keys[0].shape[-1] == 0


def test_chunked_rule_per_channel_decay():
    """The chunked rule with a decay per key channel (chunks of 64, from a random state, 70 tokens) gives the
    token-by-token recurrence's outputs and final state; a decay per head equals the same decay in every channel."""
    from autolm.nn.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule

    g = torch.Generator().manual_seed(0)
    B, T, H, dk, dv = 2, 70, 3, 8, 6
    q, k = torch.randn(B, T, H, dk, generator=g), torch.randn(B, T, H, dk, generator=g)
    v = torch.randn(B, T, H, dv, generator=g)
    decay = -torch.rand(B, T, H, dk, generator=g) * 0.5
    beta = torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, dk, dv, generator=g)
    a, sa = chunk_gated_delta_rule(q, k, v, decay, beta, state)
    b, sb = recurrent_gated_delta_rule(q, k, v, decay, beta, state)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
    per_head = decay[..., 0]
    c, sc = chunk_gated_delta_rule(q, k, v, per_head, beta, state)
    d, sd = chunk_gated_delta_rule(q, k, v, per_head[..., None].expand(-1, -1, -1, dk), beta, state)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc, sd, atol=1e-5, rtol=1e-5)


def test_recurrent(tmp_path_factory, tmp_path):
    KIMI.check_recurrent(tmp_path_factory, tmp_path)


def test_one_token_step(tmp_path_factory):
    KIMI.check_one_token_step(tmp_path_factory)


def test_bf16(tmp_path_factory):
    KIMI.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    KIMI_Q.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    KIMI.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """The checkpoint's names in the files autolm saves (transformers' names in the state dict), config.json's
    keys and values as transformers wrote them."""
    _, saved = KIMI_Q.check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.1.self_attn.q_conv1d.weight", "model.layers.1.self_attn.A_log",
            "model.layers.2.block_sparse_moe.experts.3.w3.weight"} <= saved  # fmt: skip
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (
        written["num_experts"] == 4
        and written["moe_renormalize"] is False
        and "rope_parameters" not in written
    )


def test_names_and_config(tmp_path_factory, tmp_path):
    model, _ = KIMI.check_names_and_config(tmp_path_factory, tmp_path)
    assert model.config.mlp_layer_types == ["dense", "sparse", "sparse"]


def test_disk_offload(tmp_path_factory, tmp_path):
    KIMI.check_disk_offload(tmp_path_factory, tmp_path)


def test_tensor_parallel_plan():
    """transformers' plan: the dense MLPs and shared experts split (the routed experts cut their own rows), both
    kinds of attention whole on every rank; test_distributed runs it over 2 ranks."""
    import transformers

    from autolm.models.kimi_linear import KimiLinearForCausalLM

    theirs = transformers.KimiLinearConfig.base_model_tp_plan
    assert KimiLinearForCausalLM.tp_patterns == {k: v for k, v in theirs.items() if ".experts" not in k}


def test_config_defaults_are_transformers():
    from autolm.models.kimi_linear import KimiLinearConfig

    check_config_defaults(KimiLinearConfig)


HUB = dict(
    model_type="kimi_linear", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, num_experts=4, num_experts_per_token=2,
    num_expert_group=1, first_k_dense_replace=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    linear_attn_config={"head_dim": 8, "num_heads": 2, "short_conv_kernel_size": 3, "kda_layers": [1, 2, 4],
                        "full_attn_layers": [3]},
)  # fmt: skip


def test_hub_config(tmp_path):
    """Moonshot's config.json (linear_attn_config with 1-based layer lists, first_k_dense_replace) reads as
    transformers reads it; the model built from it gives transformers' logits."""
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(HUB))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = autolm.AutoConfig.from_pretrained(tmp_path)
    for key in (
        "layer_types",
        "mlp_layer_types",
        "linear_head_dim",
        "linear_num_heads",
        "linear_conv_kernel_dim",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(theirs).eval()
    hf.save_pretrained(tmp_path / "m")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids, mask = padded_batch()
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        b = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(mlp_layer_types=["dense", "moe", "sparse", "sparse"]), "mlp_layer_types"),
        (dict(mlp_layer_types=["dense"]), "mlp_layer_types"),
        (dict(linear_attn_config=None, linear_head_dim=0), "linear_head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(layer_types=["mamba"] * 4), "layer_types"),
        (dict(linear_attn_config={"kda_layers": [1, 9], "full_attn_layers": [2]}), "linear_attn_config"),
    ],
)
def test_config_errors_name_the_field(change, field):
    from autolm.models.kimi_linear import KimiLinearConfig

    with pytest.raises(ConfigError, match=field):
        KimiLinearConfig.from_dict({**HUB, **change})


# ---- GGUF: llama.cpp's "kimi-linear" ------------------------------------------------------------------------------

# what llama.cpp's graph runs: KDA heads as the attention heads, a plain q_proj, the top k renormalised, no expert
# groups, leading dense layers; with a 3-tap conv, two shared experts and a scale of 1.5
GGUF_FAMILY = Family(
    "KimiLinearConfig",
    dict(SIZES, n_group=1, n_shared_experts=2, linear_conv_kernel_dim=3, routed_scaling_factor=1.5),
    lora_targets=LORA,
)
_EXPERTS = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


def hub_hparams(hf) -> dict:
    """The converter's hparams (AutoConfig's to_dict) for `hf` as Moonshot's config.json gives them: transformers'
    config with the Hub keys the converter reads that transformers does not write (linear_attn_config with 1-based
    layer lists, first_k_dense_replace, the router's sigmoid)."""
    hp = hf.config.to_dict()
    types, kinds = hp["layer_types"], hp["mlp_layer_types"]
    lead = kinds.index("sparse") if "sparse" in kinds else len(kinds)
    assert kinds == ["dense"] * lead + ["sparse"] * (len(kinds) - lead)
    hp["linear_attn_config"] = {
        "head_dim": hp["linear_head_dim"], "num_heads": hp["linear_num_heads"],
        "short_conv_kernel_size": hp["linear_conv_kernel_dim"],
        "kda_layers": [i + 1 for i, t in enumerate(types) if t == "linear_attention"],
        "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"],
    }  # fmt: skip
    return {**hp, "first_k_dense_replace": lead, "moe_router_activation_func": "sigmoid"}


def _metadata(w, hp) -> None:
    """TextModel.set_gguf_parameters, then KimiLinearModel's (num_key_value_heads 1, then per layer)."""
    import gguf

    n, rope, lora = hp["num_hidden_layers"], hp["qk_rope_head_dim"], hp["kv_lora_rank"]
    for key, field in (("block_count", "num_hidden_layers"), ("context_length", "model_max_length"),
                       ("embedding_length", "hidden_size"), ("feed_forward_length", "intermediate_size"),
                       ("head_count", "num_attention_heads"), ("layer_norm_rms_eps", "rms_norm_eps"),
                       ("expert_count", "num_experts"), ("expert_used_count", "num_experts_per_token"),
                       ("expert_group_used_count", "topk_group")):  # fmt: skip
        getattr(w, f"add_{key}")(hp[field])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_value_length(hp["head_dim"])  # transformers' head_dim: qk_rope_head_dim
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(hp["vocab_size"])
    full = hp["linear_attn_config"]["full_attn_layers"]
    w.add_head_count_kv([1 if i + 1 in full else 0 for i in range(n)])
    w.add_ssm_conv_kernel(hp["linear_attn_config"]["short_conv_kernel_size"])
    w.add_kda_head_dim(hp["linear_attn_config"]["head_dim"])
    w.add_kv_lora_rank(lora)
    w.add_rope_dimension_count(rope)
    w.add_key_length(lora + rope)
    w.add_key_length_mla(hp["qk_nope_head_dim"] + rope)
    w.add_value_length_mla(hp["v_head_dim"])
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_expert_shared_count(hp["num_shared_experts"])
    w.add_leading_dense_block_count(hp["first_k_dense_replace"])
    w.add_expert_weights_scale(hp["routed_scaling_factor"])


def _tensor(name: str, t: torch.Tensor, hp) -> list[tuple[str, torch.Tensor]]:
    """KimiLinearModel.modify_tensors for one checkpoint tensor (experts already stacked): (name for gguf-py's
    map, tensor)."""
    from gguf_moe import mla_pieces

    name = re.sub(r"\.block_sparse_moe\.(\w+_proj)\.", r".mlp.\1.", name)  # Moonshot's dense layers' names
    name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    if name.endswith(("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight")):
        t = t.reshape(1, t.shape[0], 1, t.shape[-1])
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    name = name.replace(".dt_bias", ".dt_proj.bias")
    return mla_pieces(name, t, hp["num_key_value_heads"], hp["qk_nope_head_dim"])


def write_kimi_linear_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's KimiLinearModel converter (--outtype f32) makes of `hf` with Moonshot's config.json
    (hub_hparams): its keys (_metadata), the q/k/v convs as (1, d_inner, 1, K), A_log as -exp(A_log), dt_bias as
    ssm_dt.bias, kv_b_proj split per head, the experts stacked, the rest by gguf-py's map; a plain vocabulary."""
    import gguf
    from gguf_mimic import add_toy_vocab, stacked_experts
    from safetensors.torch import load_file

    hp = hub_hparams(hf)
    w = gguf.GGUFWriter(path, "kimi-linear")
    _metadata(w, hp)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.KIMI_LINEAR, hp["num_hidden_layers"])
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".block_sparse_moe.experts.", hp["num_experts"]):
        m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(w\d)\.weight", name)
        pieces = [(f"blk.{m.group(1)}.{_EXPERTS[m.group(2)]}.weight", t)] if m else None
        for piece, value in pieces or _tensor(name, t, hp):
            if not m:
                piece = names.get_name(piece, try_suffixes=(".weight", ".bias"))
            w.add_tensor(piece, np.ascontiguousarray(value.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as KimiLinearForCausalLM (the layer kinds from the per-layer KV heads, the KDA
    sizes, the leading dense layer, the shared experts' width) with transformers' logits, and llama.cpp's."""
    from test_gguf_remote_archs import _close_to_llama_cpp, _row, llama_cpp_logits

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    path = str(tmp_path / "model.gguf")
    write_kimi_linear_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "KimiLinearForCausalLM"
    c = model.config
    assert c.layer_types == hf.config.layer_types and c.mlp_layer_types == ["dense", "sparse", "sparse"]
    assert (c.linear_head_dim, c.linear_num_heads, c.linear_conv_kernel_dim) == (8, 4, 3)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.q_lora_rank) == (
        16,
        8,
        12,
        16,
        None,
    )
    assert (c.n_shared_experts, c.routed_scaling_factor, c.norm_topk_prob) == (2, 1.5, True)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    _close_to_llama_cpp(_row(model), llama_cpp_logits(path))


def test_gguf_out(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """save_gguf's file (the converter's keys, the KDA layers with no KV heads) loads back with the model's logits,
    and llama.cpp runs it with close logits."""
    from test_gguf_remote_archs import _close_to_llama_cpp, _row, llama_cpp_logits

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    model = autolm.AutoModelForCausalLM.from_pretrained(GGUF_FAMILY.checkpoint(tmp_path_factory)[0])
    path = str(tmp_path / "m.gguf")
    save_gguf(model, merged_tokenizer, path, "f32")
    g = GGUFFile(path)
    assert g.get("attention.head_count_kv") == [0, 1, 0] and g.get("expert_gating_func") == 2
    assert {"blk.0.ssm_a", "blk.0.ssm_dt.bias", "blk.1.attn_k_b.weight"} <= {t.name for t in g.tensors}
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        got = back(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _close_to_llama_cpp(_row(model), llama_cpp_logits(path))


@pytest.mark.parametrize(
    ("change", "refused"),
    [({"q_lora_rank": 24}, "q_lora_rank"), ({"norm_topk_prob": False}, "norm_topk_prob"),
     ({"n_group": 2}, "n_group"), ({"linear_num_heads": 2}, "linear_num_heads"),
     ({"mlp_layer_types": ["sparse", "dense", "sparse"]}, "mlp_layer_types"),
     ({"n_shared_experts": 0}, "n_shared_experts"), ({"attention_bias": True}, "attention_bias"),
     ({"tie_word_embeddings": True}, "tie_word_embeddings")],
)  # fmt: skip
def test_gguf_out_refused(tmp_path_factory, tmp_path, byte_tokenizer, change, refused):  # noqa: F811
    """What llama.cpp's kimi-linear graph cannot run is refused, naming the field, and no file is left: a low-rank
    query, top k not renormalised, expert groups, KDA heads other than the attention heads, dense layers after a
    mixture, no shared experts, attention biases, no output matrix."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(GGUF_FAMILY.checkpoint(tmp_path_factory)[0])
    for key, value in change.items():
        setattr(model.config, key, value)
    with pytest.raises(ConfigError, match=refused):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
