"""DeepSeek-V4 (deepseek_v4) against transformers and peft: the shared-KV sliding attention with sinks and the grouped
output projection on every layer; the HCA layers' compressed entries and the CSA layers' overlapping entries with the
lightning indexer's selection; hyper-connections with the Sinkhorn mixing; hash-routed and top-k routed clamped
experts. Two checkpoints with both routers: BASE (HCA, CSA, sliding, CSA; 2 streams; index_topk 2 under 3 entries, so
the indexer chooses) and VARIANT (CSA, HCA, CSA; 3 streams, sigmoid scoring, YaRN on the compressed RoPE, half the
head turned, a tight swiglu_limit, 4 output groups, a tied head, HCA windows of 4). The router tables (tid2eid,
correction biases) are random. The battery (logits over a padded batch, generate with beams, bf16, the eager one-token
step with the compressors' projections in the cache, LoRA vs peft, quantized, save with DeepSeek's names, the released
names, disk offload, config.json), transformers' config defaults and legacy keys, the config's checks. No compiled
step (as DeepSeek-V3.2: its graphs do not serve a layer reading a second cache layer). GGUF as llama.cpp's deepseek4
(GGUF_FAMILY: ratios 4 and 128, leading hashed layers, YaRN on the compressed RoPE, an untied head): the converter's
file (write_deepseek4_gguf, its experts in MXFP4) loads with its config and transformers' logits on the checkpoint
whose experts are those MXFP4 values, autolm's file is the converter's (experts as floats) and reads back equal, and
llama.cpp runs both with transformers' logits over a prompt that completes an HCA window; what llama.cpp's deepseek4
computes otherwise is refused by field on GGUF out and on reading."""

from __future__ import annotations

import json

import family_checks
import pytest
import torch
from conftest import padded_batch, positions, randomize
from family_checks import Family, check_config_defaults
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm
from autolm import step
from autolm.models.deepseek_v4 import DeepseekV4Config
from autolm.models.deepseek_v4_layers import Compressor


def randomize_v4(model: torch.nn.Module, seed: int = 0) -> None:
    """conftest's randomize, then the routers' buffers: correction biases, and tid2eid as distinct experts."""
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
            elif name.endswith("tid2eid"):
                experts = model.config.n_routed_experts
                b.copy_(
                    torch.stack(
                        [torch.randperm(experts, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]
                    )
                )


class V4Family(Family):
    def checkpoint(self, tmp_path_factory, dtype=None):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(family_checks, "randomize", randomize_v4)
            return super().checkpoint(tmp_path_factory, dtype)


CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
SIZES = dict(hidden_size=64, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
             q_lora_rank=32, partial_rotary_factor=0.25, o_groups=2, o_lora_rank=16, n_routed_experts=8,
             num_experts_per_tok=2, layer_types=[HCA, CSA, SWA, CSA], mlp_layer_types=["hash_moe", "moe", "moe", "hash_moe"],
             compress_rates={CSA: 4, HCA: 8}, sliding_window=6, index_n_heads=4, index_head_dim=16, index_topk=2,
             hc_mult=2, hc_sinkhorn_iters=5, max_position_embeddings=64)  # fmt: skip
BASE = V4Family("DeepseekV4Config", SIZES, lora_targets=["q_a_proj", "q_b_proj", "kv_proj", "o_b_proj"])
VARIANT = V4Family(
    "DeepseekV4Config",
    dict(SIZES, num_hidden_layers=3, layer_types=[CSA, HCA, CSA], mlp_layer_types=["moe", "hash_moe", "moe"],
         hc_mult=3, scoring_func="sigmoid", partial_rotary_factor=0.5, swiglu_limit=0.05, o_groups=4, o_lora_rank=8,
         compress_rates={CSA: 4, HCA: 4}, sliding_window=4, index_topk=1, tie_word_embeddings=True,
         max_position_embeddings=256, rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=32, beta_slow=1,
                                                          original_max_position_embeddings=64)),
    lora_targets=["gate_proj", "up_proj", "down_proj", "weights_proj"],
)  # fmt: skip
FAMILIES = {"base": BASE, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_compression_and_selection_matter(tmp_path_factory):
    """The CSA layers' queries keep at most index_topk of the entries they may see (fewer than they may see past
    the 12th position); without the compressed entries, or with every seeable entry kept, or with the hash table
    changed, the logits are not transformers'."""
    directory, hf = BASE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    kept = {}
    indexer = model.model.layers[1].self_attn.compressor.indexer
    select = indexer.select
    indexer.select = lambda *a: kept.setdefault("mask", select(*a))
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        model(ids, attention_mask=mask, position_ids=positions(mask))
    counts = kept["mask"][0].sum(-1)  # the 13-token row: entries complete at positions 3, 7, 11
    assert counts.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    del indexer.select

    def changed(patch) -> float:
        with pytest.MonkeyPatch.context() as mp:
            patch(mp)
            with torch.no_grad():
                ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        return float((ours - theirs).abs().max())

    forward = Compressor.forward
    assert changed(lambda mp: None) < 1e-4
    assert changed(lambda mp: mp.setattr(Compressor, "forward", lambda self, *a: (
        lambda e, s: (e, torch.zeros_like(s)))(*forward(self, *a)))) > 1e-3  # fmt: skip
    assert changed(lambda mp: mp.setattr(indexer, "index_topk", 8)) > 1e-3
    table = model.model.layers[0].mlp.gate.tid2eid
    assert (
        changed(lambda mp: mp.setattr(model.model.layers[0].mlp.gate, "tid2eid", table.flip(-1) % 7)) > 1e-3
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    BASE.check_bf16(tmp_path_factory)


def check_padded_step(family, tmp_path_factory) -> None:
    """The eager step over a left-padded batch, teacher-forced past several windows: each token's logits equal
    transformers' own steps over its DeepseekV4HCACache / CSACache (not its whole forward: its one-token HCA step sees
    every entry made so far, where a padded row's whole forward hides the last by position); the cache's extra layers
    hold the compressors' projections (none on the sliding layers), and the compiled graphs are not offered."""
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    n, c = model.config.num_hidden_layers, model.config
    widths = {SWA: 0, HCA: 2 * c.head_dim, CSA: 4 * c.head_dim + 4 * c.index_head_dim}
    assert model.attention_shapes()[n:] == [(1, widths[t]) for t in c.layer_types]
    assert not step.compilable(model)
    ids, mask = padded_batch(seed=3)
    more = torch.randint(3, 100, (ids.shape[0], 10), generator=torch.Generator().manual_seed(4))
    full_mask = torch.cat([mask, torch.ones_like(more)], 1)
    pos = positions(full_mask)
    model.decode_mode = "eager"
    with torch.inference_mode():
        theirs = hf(ids, attention_mask=mask, position_ids=pos[:, : ids.shape[1]], use_cache=True)
        cache = model.make_cache(ids.shape[0], full_mask.shape[1] + 1)
        model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache)
        decode = step.decoder(model, cache, mask)
        for i in range(10):
            t = ids.shape[1] + i
            args = dict(attention_mask=full_mask[:, : t + 1], position_ids=pos[:, t : t + 1])
            theirs = hf(more[:, i : i + 1], past_key_values=theirs.past_key_values, use_cache=True, **args)
            got = decode(more[:, i : i + 1], full_mask[:, : t + 1], pos[:, t : t + 1], cache)
            torch.testing.assert_close(got, theirs.logits[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)
    check_padded_step(FAMILIES[name], tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name, bits", [("variant", "int8"), ("base", "int4")])
def test_quantized(tmp_path_factory, name, bits):
    FAMILIES[name].check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """check_save; the saved file holds DeepSeek's names (as transformers saves them), tid2eid as integers."""
    _, saved = BASE.check_saved_files(tmp_path_factory, tmp_path)
    assert {
        "head.weight",
        "model.layers.0.hc_attn_fn",
        "model.layers.1.attn.indexer.compressor.ape",
        "model.layers.1.attn.indexer.wq_b.weight",
        "model.layers.1.ffn.gate.bias",
        "model.layers.3.ffn.experts.7.w3.weight",
        "model.layers.3.ffn.gate.tid2eid",
        "model.layers.2.attn.attn_sink",
    } <= saved
    from safetensors import safe_open

    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.ffn.gate.tid2eid").dtype == torch.int64


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes; config.json round-trips."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    import transformers

    check_config_defaults(DeepseekV4Config)
    theirs = json.loads(transformers.DeepseekV4Config().to_json_string())
    theirs.pop("transformers_version")
    assert DeepseekV4Config().to_dict() == theirs


@pytest.mark.parametrize("n", [1, 2, 5])
def test_layer_patterns_and_legacy_keys_are_transformers(n):
    """Default layer patterns; transformers' legacy keys (compress_ratios, num_hash_layers, compress_rate_*,
    qk_rope_head_dim, a flat YaRN rope_parameters) fold in as it folds them."""
    import transformers

    small = dict(hidden_size=64, num_attention_heads=4, head_dim=32, num_hidden_layers=n, index_head_dim=16)
    legacy = dict(small, compress_ratios=[0, 4, 128, 4, 0][:n], num_hash_layers=1, compress_rate_csa=8,
                  qk_rope_head_dim=16, rope_parameters=dict(rope_type="yarn", factor=2.0,
                                                            original_max_position_embeddings=32))  # fmt: skip
    for kwargs in (small, legacy):
        ours = DeepseekV4Config.from_dict(dict(kwargs)).to_dict()
        theirs = json.loads(transformers.DeepseekV4Config(**kwargs).to_json_string())
        theirs.pop("transformers_version")
        assert ours == theirs


@pytest.mark.parametrize(
    "key, bad",
    [("layer_types", ["sliding_attention"]), ("mlp_layer_types", ["dense", "moe"]), ("scoring_func", "softmax"),
     ("o_groups", 3), ("compress_rates", {CSA: 0, HCA: 8}), ("partial_rotary_factor", 0.3), ("hc_mult", 0)],
)  # fmt: skip
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, head_dim=32, num_hidden_layers=2, n_routed_experts=8,
                 num_experts_per_tok=2, index_head_dim=16, partial_rotary_factor=0.25)  # fmt: skip
    DeepseekV4Config(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        DeepseekV4Config.from_dict({**small, key: bad})


def test_released_names_load(tmp_path_factory, tmp_path):
    """The released files' top-level names (`embed.weight`, `layers.N.`, `norm.weight`, `hc_head_fn`, with an
    `mtp.` layer transformers skips) load to the same logits."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    directory, _ = BASE.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "released")
    tensors = load_file(f"{directory}/model.safetensors")
    moved = {re.sub(r"^model\.(hc_head\.hc_|embed_tokens)", lambda m: "hc_head_" if "hc" in m[1] else "embed", k)
             .removeprefix("model."): v for k, v in tensors.items()}  # fmt: skip
    moved["mtp.0.attn.wq_a.weight"] = torch.zeros(2, 2)
    assert {"embed.weight", "hc_head_fn", "norm.weight", "layers.0.attn.wq_a.weight"} <= set(moved)
    save_file(moved, str(tmp_path / "released" / "model.safetensors"), metadata={"format": "pt"})
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "released")(
            ids, attention_mask=mask
        ).logits
        theirs = autolm.AutoModelForCausalLM.from_pretrained(directory)(ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)


def test_disk_offload(tmp_path_factory, tmp_path):
    """Half the layers on disk: the in-memory model's logits and tokens (the extra cache layers follow theirs)."""
    BASE.check_disk_offload(tmp_path_factory, tmp_path)


# ---- GGUF: llama.cpp's DeepseekV4Model converter (arch "deepseek4") ------------------------------------------------

# what llama.cpp's deepseek4 holds: its ratios (4, 128), 4 streams, an indexer key of 64, the hashed layers leading,
# YaRN on the compressed RoPE (as the released config's flat rope_scaling), a SwiGLU limit that bites, expert rows of
# whole MXFP4 blocks, an untied head; index_n_heads and index_topk such that no two entries a query might keep tie
# (the indexer's relu makes exact ties, which torch and ggml break differently)
GGUF_FAMILY = V4Family(
    "DeepseekV4Config",
    dict(SIZES, moe_intermediate_size=32, compress_rates={CSA: 4, HCA: 128}, swiglu_limit=0.5, hc_mult=4,
         index_head_dim=64, index_n_heads=8, index_topk=3, mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
         max_position_embeddings=256, rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=32, beta_slow=1,
                                                           original_max_position_embeddings=64)),
)  # fmt: skip
# a prompt past the first HCA window (128 slots: its entry complete at position 127)
LONG = torch.randint(3, 160, (1, 136), generator=torch.Generator().manual_seed(7))
_RATIO = {SWA: 0, CSA: 4, HCA: 128}
# the converter's _map_dsv4_tensor_name: the released names (below "layers.N.") -> llama.cpp's
_DSV4 = {
    **{f"hc_{p}_{q}": f"hc_{p}_{q}.weight" for p in ("attn", "ffn") for q in ("fn", "base", "scale")},
    "attn.attn_sink": "attn_sinks.weight", "attn.wq_a.weight": "attn_q_a.weight", "attn.wq_b.weight": "attn_q_b.weight",
    "attn.q_norm.weight": "attn_q_a_norm.weight", "attn.wkv.weight": "attn_kv.weight",
    "attn.kv_norm.weight": "attn_kv_a_norm.weight", "attn.wo_a.weight": "attn_output_a.weight",
    "attn.wo_b.weight": "attn_output_b.weight",
    **{f"attn.{src}compressor.{a}": f"{dst}_compressor_{b}.weight"
       for src, dst in (("", "attn"), ("indexer.", "indexer"))
       for a, b in (("ape", "ape"), ("wkv.weight", "kv"), ("wgate.weight", "gate"), ("norm.weight", "norm"))},
    "attn.indexer.wq_b.weight": "indexer.attn_q_b.weight", "attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "ffn.gate.weight": "ffn_gate_inp.weight",
    "ffn.gate.bias": "exp_probs_b.bias", "ffn.shared_experts.w1.weight": "ffn_gate_shexp.weight",
    "ffn.shared_experts.w2.weight": "ffn_down_shexp.weight", "ffn.shared_experts.w3.weight": "ffn_up_shexp.weight",
}  # fmt: skip
_DSV4_TOP = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "head.weight": "output.weight",
             **{f"hc_head_{p}": f"output_hc_{p}.weight" for p in ("fn", "base", "scale")}}  # fmt: skip


def _released(tensors: dict) -> dict:
    """transformers' saved names as the released files' (test_released_names_load's move; transformers saves the
    attention's kv_norm as `attn.norm`, which the converter does not map)."""
    import re

    return {re.sub(r"^model\.(hc_head\.hc_|embed_tokens)", lambda m: "hc_head_" if "hc" in m[1] else "embed", k)
            .removeprefix("model.").replace(".attn.norm.", ".attn.kv_norm."): v for k, v in tensors.items()}  # fmt: skip


def _keys(w, c: dict) -> None:
    """TextModel.set_gguf_parameters, then DeepseekV4Model.set_gguf_parameters, of config.json `c` (the released
    config's legacy compress_ratios, num_hash_layers and flat YaRN rope_scaling added: the converter reads them)."""
    import gguf

    n, arch, limit = c["num_hidden_layers"], "deepseek4", float(c["swiglu_limit"])
    w.add_block_count(n)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    yarn = c["rope_scaling"]
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(yarn["factor"])
    w.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(yarn["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(yarn["beta_slow"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_uint32(f"{arch}.expert_gating_func", 4)  # SQRTSOFTPLUS (this gguf-py's enum lacks it)
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(c["qk_rope_head_dim"])
    w.add_q_lora_rank(c["q_lora_rank"])
    w.add_sliding_window(c["sliding_window"])
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    w.add_expert_weights_norm(c["norm_topk_prob"])
    w.add_array(f"{arch}.swiglu_clamp_exp", [limit] * n)
    w.add_array(f"{arch}.swiglu_clamp_shexp", [limit] * n)
    w.add_indexer_head_count(c["index_n_heads"])
    w.add_indexer_key_length(c["index_head_dim"])
    w.add_indexer_top_k(c["index_topk"])
    w.add_uint32(f"{arch}.attention.output_group_count", c["o_groups"])
    w.add_uint32(f"{arch}.attention.output_lora_rank", c["o_lora_rank"])
    w.add_array(f"{arch}.attention.compress_ratios", c["compress_ratios"])
    w.add_float32(f"{arch}.attention.compress_rope_freq_base", c["compress_rope_theta"])
    w.add_uint32(f"{arch}.hyper_connection.count", c["hc_mult"])
    w.add_uint32(f"{arch}.hyper_connection.sinkhorn_iterations", c["hc_sinkhorn_iters"])
    w.add_float32(f"{arch}.hyper_connection.epsilon", c["hc_eps"])
    w.add_uint32(f"{arch}.hash_layer_count", c["num_hash_layers"])
    w.add_uint32(f"{arch}.embedding_length_out", c["hidden_size"] * c["hc_mult"])
    w.add_vocab_size(c["vocab_size"])


def write_deepseek4_gguf(hf, path: str, mxfp4: bool = True) -> None:
    """The GGUF llama.cpp's DeepseekV4Model converter makes of transformers' DeepSeek-V4 `hf`, from the checkpoint
    files under the released names: _keys, the tensors as _map_dsv4_tensor_name names them (F32 as the checkpoint
    holds them), tid2eid of the hashed layers as I32, the experts stacked and repacked in MXFP4 (`mxfp4`; it repacks
    the released FP4 experts; False: kept in F32, autolm's GGUF out), the multi-token prediction layers skipped."""
    import re

    import gguf
    import numpy as np
    from gguf_mimic import add_toy_vocab
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    compress = c["rope_parameters"]["compress"]
    c.update(compress_ratios=[_RATIO[t] for t in c["layer_types"]],
             num_hash_layers=c["mlp_layer_types"].count("hash_moe"),
             rope_scaling={"type": "yarn", **{k: compress[k] for k in ("factor", "beta_fast", "beta_slow",
                                                                     "original_max_position_embeddings")}})  # fmt: skip
    w = gguf.GGUFWriter(path, "deepseek4")
    _keys(w, c)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE if mxfp4 else gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    tensors = _released(load_file(f"{hf.name_or_path}/model.safetensors"))
    for name, t in tensors.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if name.startswith("mtp.") or (m and re.fullmatch(r"ffn\.experts\.\d+\.w[123]\.weight", m[2])):
            continue
        if m and m[2] == "ffn.gate.tid2eid":
            w.add_tensor(f"blk.{m[1]}.ffn_gate_tid2eid.weight", t.to(torch.int32).numpy())
            continue
        out = _DSV4_TOP[name] if m is None else f"blk.{m[1]}.{_DSV4[m[2]]}"
        w.add_tensor(out, np.ascontiguousarray(t.float().numpy()))
    for i in range(c["num_hidden_layers"]):
        for part, stem in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
            a = torch.stack(
                [tensors[f"layers.{i}.ffn.experts.{e}.{part}.weight"] for e in range(c["n_routed_experts"])]
            )
            a = a.float().numpy()
            if mxfp4:
                q = gguf.GGMLQuantizationType.MXFP4
                w.add_tensor(f"blk.{i}.{stem}.weight", gguf.quants.quantize(a, q), raw_dtype=q)
            else:
                w.add_tensor(f"blk.{i}.{stem}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_deepseek4_gguf_f32(hf, path: str) -> None:
    write_deepseek4_gguf(hf, path, mxfp4=False)


def _as_mxfp4(hf):
    """A copy of `hf` whose experts hold the MXFP4 values the converter's file holds."""
    import copy

    import gguf

    q, out = gguf.GGMLQuantizationType.MXFP4, copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if ".experts." in name:
                a = p.detach().float().numpy()
                p.copy_(
                    torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, q), q)).reshape(p.shape)
                )
    return out


def llama_cpp_long(path: str) -> torch.Tensor:
    """llama.cpp's logits for LONG (test_gguf_remote_archs' child with room for it)."""
    import subprocess
    import sys

    import numpy as np
    import test_gguf_remote_archs as remote

    pytest.importorskip("llama_cpp")
    child = remote._CHILD.replace("n_ctx=64, n_batch=64", "n_ctx=256, n_batch=256")
    ids = ",".join(str(t) for t in LONG[0].tolist())
    run = subprocess.run([sys.executable, "-c", child, path, ids, path + ".npy"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.from_numpy(np.load(path + ".npy"))


def test_gguf_converters_file(tmp_path_factory, tmp_path):
    """The converter's file loads as DeepseekV4ForCausalLM with the config's fields and transformers' logits (1e-4)
    on the checkpoint whose experts hold the file's MXFP4 values, over a prompt past the first HCA window; the
    compressed entries matter there; llama.cpp's logits on the file are close."""
    from test_gguf_remote_archs import _close_to_llama_cpp

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    path = str(tmp_path / "conv.gguf")
    write_deepseek4_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="conv.gguf")
    assert type(model).__name__ == "DeepseekV4ForCausalLM"
    c, theirs = model.config, hf.config
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "head_dim", "hc_mult",
                "hc_eps", "hc_sinkhorn_iters", "o_groups", "o_lora_rank", "q_lora_rank", "index_n_heads", "index_topk",
                "index_head_dim", "swiglu_limit", "routed_scaling_factor", "sliding_window", "compress_rope_theta",
                "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings"):  # fmt: skip
        want = getattr(theirs, key)
        assert getattr(c, key) == (want if isinstance(want, (dict, list)) else pytest.approx(want)), key
    with torch.no_grad():
        ours = model(LONG).logits[0]
        torch.testing.assert_close(ours, _as_mxfp4(hf)(LONG).logits[0], atol=1e-4, rtol=1e-4)
        hca = model.model.layers[0].self_attn.compressor
        model.model.layers[0].self_attn.compressor = None
        assert (model(LONG).logits[0, 127:] - ours[127:]).abs().max() > 1e-3  # the HCA entry counts
        model.model.layers[0].self_attn.compressor = hca
    _close_to_llama_cpp(
        ours, llama_cpp_long(path), kept=True
    )  # MXFP4 experts: 8-bit activations in llama.cpp


def test_gguf_out(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """autolm's file is the converter's (its keys and types, the tensors' F32 bytes with the experts as floats, tid2eid
    as I32), reads back as the same model, and llama.cpp runs it with transformers' logits (close)."""
    import numpy as np
    from gguf.gguf_reader import GGUFReader
    from test_gguf_remote_archs import _close_to_llama_cpp

    from autolm.gguf_writer import save_gguf

    directory, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    out = save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    write_deepseek4_gguf_f32(hf, str(tmp_path / "conv.gguf"))
    ours, conv = GGUFReader(out), GGUFReader(str(tmp_path / "conv.gguf"))
    keys = lambda r: {k: (f.types, f.contents()) for k, f in r.fields.items() if k.startswith("deepseek4.")}  # noqa: E731
    assert keys(ours) == keys(conv)
    tensors = lambda r: {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in r.tensors}  # noqa: E731
    assert tensors(ours) == tensors(conv)
    assert {int(t.tensor_type) for t in ours.tensors if "tid2eid" in t.name} == {26}
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    assert back.config.layer_types == model.config.layer_types
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-5)
        row = hf(LONG).logits[0]
    _close_to_llama_cpp(row, llama_cpp_long(out))


_MAIN_YARN = {"main": dict(rope_type="yarn", factor=2.0, rope_theta=1e4, partial_rotary_factor=0.25),
              "compress": dict(rope_type="default", rope_theta=1.6e5, partial_rotary_factor=0.25)}  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value"),
    [("scoring_func", "sigmoid"), ("compress_rates", {CSA: 4, HCA: 8}), ("tie_word_embeddings", True),
     ("mlp_layer_types", ["moe", "hash_moe", "moe", "moe"]), ("norm_topk_prob", False), ("n_shared_experts", 2),
     ("hidden_act", "gelu"), ("swiglu_limit", 0.0), ("rope_parameters", _MAIN_YARN), ("num_key_value_heads", 2),
     ("hc_mult", 2), ("o_groups", 8), ("index_head_dim", 32)],
)  # fmt: skip
def test_gguf_out_refuses_what_llama_cpp_computes_otherwise(tmp_path_factory, tmp_path, field, value):
    """A config llama.cpp's deepseek4 would run otherwise (or not load) is a ConfigError naming the field; no file."""
    GGUF_FAMILY.check_gguf_refused(tmp_path_factory, tmp_path, field, lambda c: setattr(c, field, value))


@pytest.mark.parametrize(
    ("given", "message"),
    [({"expert_gating_func": 2}, "scoring_func"), ({"attention.compress_ratios": [0, 8]}, "compress_rates"),
     ({"expert_weights_norm": False}, "norm_topk_prob"), ({"swiglu_clamp_exp": [1.0, 2.0]}, "swiglu_limit"),
     ({"swiglu_clamp_shexp": [0.0, 0.0]}, "swiglu_limit"), ({"hyper_connection.count": 2}, "hc_mult"),
     ({"nextn_predict_layers": 1}, "num_nextn_predict_layers")],
)  # fmt: skip
def test_gguf_files_refused(given, message):
    """deepseek4 files llama.cpp does not load, or runs as no transformers DeepSeek-V4: refused naming the field."""
    from autolm.models.deepseek_v4_gguf import derive

    keys = {"expert_gating_func": 4, "attention.compress_ratios": [0, 4], "expert_weights_norm": True,
            "rope.dimension_count": 8, "swiglu_clamp_exp": [1.0, 1.0], **given}  # fmt: skip
    d = {
        "num_hidden_layers": 2,
        "head_dim": 32,
        "hc_mult": keys.get("hyper_connection.count", 4),
        "rope_parameters": {"rope_theta": 1e4},
    }
    with pytest.raises(autolm.ConfigError, match=message):
        derive(d, lambda key, default=None: keys.get(key, default))


def test_hidden_states_are_transformers_streams(tmp_path_factory):
    BASE.check_hidden_states(tmp_path_factory)
