"""Hy v4 (hy_v4) against transformers and peft: GLM-5's indexed latent attention (tests.test_family_glm_moe_dsa) with
rotate-half RoPE, the indexer turning its last features, a gated output and sinks; hyper-connections over hc_mult
streams; the clamped SwiGLU experts. Two checkpoints: the defaults' layer pattern (dense then sparse, layers 0 and 1
full, 2 shared) with 4 streams; a variant with 2 streams, explicit indexer_types and mlp_layer_types, a tight
swiglu_limit (the clamp bites), attention biases, wider values, YaRN, a tied head. The battery (logits over a padded
batch whose 13-token rows exceed index_topk, generate, bf16, the eager one-token step with the indexers' keys in the
cache, LoRA vs peft, quantized, save, names and config.json), transformers' config defaults, the config's checks. No
compiled step (as DeepSeek-V3.2: its graphs do not serve a layer reading its indexer's cache layer). GGUF as llama.cpp's
hy_v4 (a third checkpoint with leading dense layers, shared indexers, two streams, a biting SwiGLU limit): the
converter's file (write_hy_v4_gguf) loads with its config and computes as llama.cpp runs it (RoPE's rows as pairs:
models.hy_v4_gguf); autolm's file is the converter's of the pair-ordered checkpoint, reads back equal and runs in
llama.cpp with transformers' logits; what llama.cpp's hy_v4 computes otherwise is refused by field on GGUF out and
in."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import padded_batch
from family_checks import check_config_defaults
from gguf_mimic import add_mla_lengths
from test_family_deepseek_v32 import check_padded_step
from test_family_minimax_m2 import RoutedFamily
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm
from autolm.models.hy_v4 import HYV4Config

SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
             max_position_embeddings=64, index_topk=4, index_head_dim=16, index_n_heads=8)  # fmt: skip
HY = RoutedFamily(
    "HYV4Config", SIZES, lora_targets=["q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "wq_b", "wk"]
)
VARIANT = RoutedFamily(
    "HYV4Config",
    dict(SIZES, num_hidden_layers=4, hc_mult=2, hc_magnitude=1.5, swiglu_limit=0.05, attention_bias=True,
         v_head_dim=32, tie_word_embeddings=True, indexer_types=["full", "shared", "shared", "full"],
         mlp_layer_types=["sparse", "dense", "sparse", "sparse"], max_position_embeddings=256, index_topk=3,
         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                              beta_fast=32, beta_slow=1, original_max_position_embeddings=64)),
    lora_targets=["q_b_proj", "o_proj", "kv_a_proj_with_mqa", "weights_proj", "up_proj"],
)  # fmt: skip
FAMILIES = {"hy": HY, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_indexer_selection_and_clamp_matter(tmp_path_factory):
    """Past the 4th query each query keeps index_topk keys (not a window), layer 2 reuses layer 1's selection; with
    plain causal attention, or the SwiGLU unclamped in the variant, the logits are not transformers'."""
    directory, hf = HY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    attns = [layer.self_attn for layer in model.model.layers]
    assert [a.indexer is None for a in attns] == [False, False, True]
    masks = {}
    for i, a in enumerate(attns):
        a.register_forward_pre_hook(lambda m, args, i=i: masks.__setitem__(i, m.keep(*args)))
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    kept = masks[1][0, 0]
    assert kept.sum(-1).tolist() == [1, 2, 3, 4] + [4] * 9
    assert not all(kept[t, t - 3 : t + 1].all() for t in range(4, 13))
    assert masks[2].equal(masks[1]) and not masks[1].equal(masks[0])
    for a in attns:
        a.keep = lambda x, ctx: torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        dense = model(ids[:1], attention_mask=mask[:1]).logits[real[:1]]
        theirs = hf(ids[:1], attention_mask=mask[:1]).logits[real[:1]]
    assert (dense - theirs).abs().max() > 1e-3
    directory, hf = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.limit = None
    with torch.no_grad():
        loose = model(ids, attention_mask=mask).logits[real]
        theirs = hf(ids, attention_mask=mask).logits[real]
    assert (loose - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    HY.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)
    check_padded_step(FAMILIES[name], tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name, bits", [("variant", "int8"), ("hy", "int4")])
def test_quantized(tmp_path_factory, name, bits):
    FAMILIES[name].check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """check_save; the saved files hold the checkpoint's names: indexers only in the full layers, the
    hyper-connections', gates' and sinks' names as transformers writes them."""
    _, saved = VARIANT.check_saved_files(tmp_path_factory, tmp_path)
    assert {k.split(".")[2] for k in saved if ".indexer." in k} == {"0", "3"}
    assert {
        "model.hc_pre.hc_head.hc_head_fn",
        "model.layers.0.hc_pre.hc_attn_layer.hc_fn",
        "model.layers.3.hc_pre.hc_mlp_layer.hc_scale",
        "model.layers.1.mlp.linear_gate.weight",
        "model.layers.0.self_attn.linear_gate.weight",
        "model.layers.2.self_attn.learnable_sink_param",
    } <= set(saved)
    assert not any(".attn_hc." in k or ".gate_proj." in k or k.endswith(".sinks") for k in saved)  # fmt: skip


def test_released_names_load(tmp_path_factory, tmp_path):
    """The released files' names (`hc_attn_layer.hc_pre.hc_fn`, `hc_head.hc_pre.hc_head_fn`: "hc_pre" after the
    module, which transformers' mapping drops wherever it sits) load to the same logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory, _ = HY.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "released")
    tensors = load_file(f"{directory}/model.safetensors")
    moved = {re.sub(r"\.hc_pre\.(hc_\w+?)\.", r".\1.hc_pre.", k): v for k, v in tensors.items()}
    assert "model.layers.0.hc_attn_layer.hc_pre.hc_fn" in moved and "model.hc_head.hc_pre.hc_head_fn" in moved
    save_file(moved, str(tmp_path / "released" / "model.safetensors"), metadata={"format": "pt"})
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "released")(
            ids, attention_mask=mask
        ).logits
        theirs = autolm.AutoModelForCausalLM.from_pretrained(directory)(ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes; config.json round-trips."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert model.config.rope_interleave is False


@pytest.mark.parametrize("n", [1, 3, 6, 10])
def test_layer_patterns_are_transformers(n):
    import transformers

    small = dict(
        hidden_size=64, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=n
    )
    ours, theirs = HYV4Config.from_dict(small), transformers.HYV4Config(**small)
    assert ours.indexer_types == theirs.indexer_types and ours.mlp_layer_types == theirs.mlp_layer_types
    assert ours.head_dim == theirs.head_dim and ours.num_key_value_heads == theirs.num_key_value_heads


def test_default_config_is_transformers():
    import transformers

    check_config_defaults(HYV4Config)
    theirs = json.loads(transformers.HYV4Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    ours = HYV4Config().to_dict()
    ours.pop("initializer_range", None)
    assert ours == theirs


@pytest.mark.parametrize(
    "key, bad",
    [("indexer_types", ["shared", "full"]), ("hc_mult", 0), ("swiglu_limit", "x"), ("index_topk", -1)],
)
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
                 qk_rope_head_dim=8, index_head_dim=16)  # fmt: skip
    HYV4Config(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        HYV4Config.from_dict({**small, key: bad})


# ---- GGUF: llama.cpp's HYV4Model converter (arch "hy_v4") ----------------------------------------------------------

# what llama.cpp's hy_v4 holds: leading dense layers (two), shared indexer layers, two streams and their magnitude, a
# SwiGLU limit that bites, values wider than the keys; an untied head
GGUF_FAMILY = RoutedFamily(
    "HYV4Config",
    dict(SIZES, num_hidden_layers=4, hc_mult=2, hc_magnitude=1.5, swiglu_limit=0.05, v_head_dim=32, index_topk=5,
         indexer_types=["full", "shared", "full", "shared"], mlp_layer_types=["dense", "dense", "sparse", "sparse"]),
)  # fmt: skip
# the converter's names for what gguf-py's GLM-5 map (this gguf-py has no HY_V4) does not name: the released files'
# (transformers' save names every gate_proj linear_gate, the hyper-connections hc_pre.<module>)
_HY_NAMES = (
    (r"\.self_attn\.learnable_sink_param$", ".attn_sinks.weight"),
    (r"\.self_attn\.linear_gate\.weight$", ".attn_gate.weight"),
    (r"\.linear_gate\.", ".gate_proj."),
    (r"\.hc_pre\.hc_(attn|mlp)_layer\.hc_(fn|base|scale)$", r".hc_\1_\2.weight"),
    (r"\.hc_mlp_", ".hc_ffn_"),
    (r"^model\.hc_pre\.hc_head\.hc_head_(fn|base|scale)$", r"output_hc_\1.weight"),
    (r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.gate.e_score_correction.bias"),
)


def write_hy_v4_gguf(hf, path: str, paired: bool = False) -> None:
    """The GGUF llama.cpp's HYV4Model converter (--outtype f32) makes of transformers' Hy v4 `hf`, from the checkpoint
    files: DeepseekV2Model's keys (MLA as MQA, the latent's key / value lengths, the expert keys, no group counts
    where both are 1, leading_dense_block_count from mlp_layer_types), then its own (the sigmoid gating, the SwiGLU
    limit per layer, the hyper-connections, the indexer and its types); the tensors as it maps them: gate_up_proj
    split into ffn_gate_exps / ffn_up_exps, kv_b_proj into attn_k_b / attn_v_b, no RoPE row permuted, the gate,
    sinks and hyper-connections under their hy_v4 names, the tied head left out. `paired`: of the checkpoint with its
    rotated rows as llama.cpp's pairs (what llama.cpp runs as transformers runs `hf`: autolm's GGUF out)."""
    import re

    import gguf
    import numpy as np
    from gguf_mimic import add_toy_vocab
    from gguf_moe import mla_pieces
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    n = c["num_hidden_layers"]
    w = gguf.GGUFWriter(path, "hy_v4")
    w.add_block_count(n)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(1)
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    types = c["mlp_layer_types"]
    w.add_leading_dense_block_count(types.index("sparse") if "sparse" in types else len(types))
    w.add_vocab_size(c["vocab_size"])
    w.add_q_lora_rank(c["q_lora_rank"])
    add_mla_lengths(w, c)
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    if c["norm_topk_prob"]:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(c["qk_rope_head_dim"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if c["swiglu_limit"] > 0:
        w.add_array("hy_v4.swiglu_clamp_exp", [float(c["swiglu_limit"])] * n)
    w.add_uint32("hy_v4.hyper_connection.count", c["hc_mult"])
    w.add_float32("hy_v4.hyper_connection.epsilon", c["hc_eps"])
    w.add_float32("hy_v4.hyper_connection.magnitude", c["hc_magnitude"])
    w.add_indexer_head_count(c["index_n_heads"])
    w.add_indexer_key_length(c["index_head_dim"])
    w.add_indexer_top_k(c["index_topk"])
    w.add_array("hy_v4.attention.indexer.types", [t == "full" for t in c["indexer_types"]])
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM_DSA, n)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    if paired:
        tensors = _reordered(tensors, hf.config, to_file=True)
    heads, nope, moe = c["num_attention_heads"], c["qk_nope_head_dim"], c["moe_intermediate_size"]
    for name, t in tensors.items():
        if name.startswith("model.mtp_layers.") or (name == "lm_head.weight" and c["tie_word_embeddings"]):
            continue
        for pattern, repl in _HY_NAMES:
            name = re.sub(pattern, repl, name)
        if name.endswith("experts.gate_up_proj"):
            pieces = [(name[: -len("gate_up_proj")] + "gate_proj.weight", t[:, :moe]),
                      (name[: -len("gate_up_proj")] + "up_proj.weight", t[:, moe:])]  # fmt: skip
        else:
            pieces = mla_pieces(
                name + (".weight" if name.endswith("experts.down_proj") else ""), t, heads, nope
            )
        for piece, value in pieces:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(hc_\w+\.weight|attn_\w+\.weight)", piece)
            if m:
                out = f"blk.{m.group(1)}.{m.group(2)}"
            elif piece.startswith("output_hc_"):
                out = piece
            else:
                base, kind = piece.rsplit(".", 1)
                out = f"{names.get_name(base)}.{kind}"
            w.add_tensor(out, np.ascontiguousarray(value.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# transformers' tensors holding RoPE's rows -> llama.cpp's stem (autolm.models.hy_v4_gguf.row_order)
_ROTATED = (("self_attn.q_b_proj", "attn_q_b"), ("self_attn.kv_a_proj_with_mqa", "attn_kv_a_mqa"),
            ("indexer.wq_b", "indexer.attn_q_b"), ("indexer.wk", "indexer.attn_k"), ("indexer.k_norm", "indexer.k_norm"))  # fmt: skip


def _reordered(tensors: dict, config, to_file: bool) -> dict:
    """transformers' tensors with the rotated rows moved from halves to llama.cpp's pairs (to_file), or back."""
    from autolm.models.hy_v4_gguf import row_order

    out = {}
    for name, t in tensors.items():
        stem = next((s for module, s in _ROTATED if f".{module}." in name), None)
        order = None if stem is None else row_order(stem, config)
        out[name] = t if order is None else t[torch.argsort(order) if to_file else order].contiguous()
    return out


def write_hy_v4_gguf_paired(hf, path: str) -> None:
    write_hy_v4_gguf(hf, path, paired=True)


def test_gguf_converters_file(tmp_path_factory, tmp_path):
    """The converter's file loads as HYV4ForCausalLM with the config's fields, and computes as llama.cpp does (pairs
    of the rotated rows: hy_v4_gguf's docstring): transformers' logits (1e-4) on the checkpoint whose rotated rows
    are read as pairs, llama.cpp's close; not transformers' on the checkpoint itself (llama.cpp's converter and graph
    disagree with transformers there)."""
    import copy

    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    path = str(tmp_path / "conv.gguf")
    write_hy_v4_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="conv.gguf")
    assert type(model).__name__ == "HYV4ForCausalLM"
    c, theirs = model.config, hf.config
    for key in ("hc_mult", "hc_magnitude", "hc_eps", "swiglu_limit", "indexer_types", "mlp_layer_types", "v_head_dim",
                "qk_nope_head_dim", "qk_rope_head_dim", "q_lora_rank", "kv_lora_rank", "index_topk", "index_head_dim",
                "index_n_heads", "routed_scaling_factor", "norm_topk_prob", "n_shared_experts", "rms_norm_eps"):  # fmt: skip
        assert getattr(c, key) == pytest.approx(getattr(theirs, key)), key
    read_as_pairs = copy.deepcopy(hf)
    read_as_pairs.load_state_dict(_reordered(hf.state_dict(), hf.config, to_file=False))
    with torch.no_grad():
        ours = model(ROW).logits[0]
        torch.testing.assert_close(ours, read_as_pairs(ROW).logits[0], atol=1e-4, rtol=1e-4)
        assert (ours - hf(ROW).logits[0]).abs().max() > 1e-2
    _close_to_llama_cpp(ours, llama_cpp_logits(path))


def test_gguf_out(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """autolm's file is the converter's of the checkpoint with its rotated rows as pairs (metadata and tensors), reads
    back as the same model, and llama.cpp runs it with transformers' logits (close)."""
    import numpy as np
    from gguf.gguf_reader import GGUFReader
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf

    directory, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    out = save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    write_hy_v4_gguf_paired(hf, str(tmp_path / "conv.gguf"))
    ours, conv = GGUFReader(out), GGUFReader(str(tmp_path / "conv.gguf"))
    keys = lambda r: {k: (f.types, f.contents()) for k, f in r.fields.items() if k.startswith("hy_v4.")}  # noqa: E731
    assert keys(ours) == keys(conv)
    tensors = lambda r: {t.name: np.asarray(t.data).tobytes() for t in r.tensors}  # noqa: E731
    assert tensors(ours) == tensors(conv)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    assert back.config.indexer_types == model.config.indexer_types
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-5)
        row = hf(ROW).logits[0]
    _close_to_llama_cpp(row, llama_cpp_logits(out))


@pytest.mark.parametrize(
    ("field", "value"),
    [("tie_word_embeddings", True), ("mlp_layer_types", ["dense", "sparse", "dense", "sparse"]), ("q_lora_rank", None),
     ("rope_parameters", VARIANT.kwargs["rope_parameters"]), ("index_head_dim", 8), ("attention_bias", True)],
)  # fmt: skip
def test_gguf_out_refuses_what_llama_cpp_computes_otherwise(tmp_path_factory, tmp_path, field, value):
    """A config llama.cpp's hy_v4 would run otherwise (or not load) is a ConfigError naming the field; no file."""
    GGUF_FAMILY.check_gguf_refused(tmp_path_factory, tmp_path, field, lambda c: setattr(c, field, value))


@pytest.mark.parametrize(
    ("given", "message"),
    [({"attention.indexer.types": None}, "indexer_types"), ({"swiglu_clamp_exp": [1.0, 2.0]}, "swiglu_limit"),
     ({"attention.indexer.top_k": None}, "index_topk"), ({"attention.q_lora_rank": None}, "q_lora_rank")],
)  # fmt: skip
def test_gguf_files_refused(given, message):
    """hy_v4 files llama.cpp does not load, or runs as no Hy v4: refused naming the field."""
    from autolm.models.hy_v4_gguf import derive

    keys = {"expert_gating_func": 2, "attention.key_length_mla": 24, "attention.q_lora_rank": 32,
            "attention.indexer.top_k": 4, "attention.indexer.types": [True, False], **given}  # fmt: skip
    d = {
        "num_hidden_layers": 2,
        "head_dim": 8,
        "num_attention_heads": 4,
        "rope_parameters": {"rope_theta": 1e4},
    }
    with pytest.raises(autolm.ConfigError, match=message):
        derive(d, lambda key, default=None: keys.get(key, default))


def test_hidden_states_are_transformers_streams(tmp_path_factory):
    HY.check_hidden_states(tmp_path_factory)
