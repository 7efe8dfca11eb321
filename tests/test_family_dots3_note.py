"""dots3 Note's language model (dots3_note_text; dots3_note: the image-text-audio files) against transformers and peft:
MLA with the scaled latents, the normed RoPE key and the per-head output gate; indexed layers (GLM-5's interleaved
indexer keeping index_topk keys: prompts longer than it drop keys), sliding layers with MLA sizes of their own
(per_layer_config: other heads, ranks and head sizes, their own RoPE width and base) and a window shorter than the
prompts, dense and grouped sigmoid-routed layers with shared experts of their own width. A variant: plain full
attention beside the sliding layers (use_dsa off), attention biases, values wider than the keys, no renormalisation,
a dense layer after a mixture, a tied head. The battery (logits, generate, bf16, the eager one-token step with the
indexers' keys in the cache, LoRA, quantized, save, disk offload, names and config.json), the released config.json's
spelling read as transformers reads it, the released image-text file (flat config, towers and MTP tensors skipped),
transformers' config defaults, the config's checks. No compiled-step test: the compiled graphs do not serve the
indexed layers (they read a second cache layer). GGUF as llama.cpp's dots3note (a third checkpoint: both kinds with
one q_lora_rank and RoPE width, leading dense layers, ungrouped routing): the converter's file (write_dots3_gguf, with
and without the latent scales folded) loads with its config and computes as llama.cpp runs it (the indexer's RoPE rows
as halves: models.dots3_note_gguf); autolm's file is the converter's of the halves-ordered checkpoint, reads back equal
and runs in llama.cpp with transformers' logits; what llama.cpp's dots3note computes otherwise is refused by field on
GGUF out and in."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import padded_batch, positions
from gguf_mimic import add_mla_lengths
from test_family_deepseek_v32 import check_padded_step
from test_family_minimax_m2 import RoutedFamily
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm
from autolm.models.dots3_note import Dots3NoteTextConfig

SWA = dict(num_attention_heads=2, num_key_value_heads=2, q_lora_rank=24, kv_lora_rank=20, head_dim=24,
           qk_nope_head_dim=12, v_head_dim=20, qk_rope_head_dim=12)  # fmt: skip
SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=12, head_dim=32, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
             shared_experts_intermediate_size=24, max_position_embeddings=64, index_topk=4, index_head_dim=16,
             index_n_heads=4, sliding_window=3, per_layer_config=dict.fromkeys((2, 3, 4), SWA))  # fmt: skip
TARGETS = ["q_a_proj", "kv_b_proj", "o_proj", "g_proj", "wq_b"]  # peft has no default for dots3_note
DOTS = RoutedFamily("Dots3NoteTextConfig", SIZES, lora_targets=TARGETS)
VARIANT = RoutedFamily(
    "Dots3NoteTextConfig",
    dict(SIZES, num_hidden_layers=4, layer_types=["indexed_attention", "full_attention", "sliding_attention",
         "indexed_attention"], per_layer_config={2: dict(SWA, v_head_dim=32)}, attention_bias=True, v_head_dim=32,
         norm_topk_prob=False, routed_scaling_factor=2.5, mlp_layer_types=["sparse", "dense", "sparse", "dense"],
         tie_word_embeddings=True, index_topk=3, rope_parameters={
             "indexed_attention": dict(rope_type="default", rope_theta=500.0),
             "full_attention": dict(rope_type="default", rope_theta=1000.0),
             "sliding_attention": dict(rope_type="default", rope_theta=100.0)}),
    lora_targets=["q_b_proj", "kv_a_proj_with_mqa", "weights_proj", "g_proj"],
)  # fmt: skip
FAMILIES = {"dots3": DOTS, "variant": VARIANT}
# three layers (two indexed, one sliding): the deeper tiny models' bf16 compute alone moves the indexers' and
# routers' choices past what check_quantized allows
QUANT = RoutedFamily("Dots3NoteTextConfig", dict(SIZES, num_hidden_layers=3, per_layer_config={2: SWA}))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_layers_are_the_kinds(tmp_path_factory):
    """layers 0, 1 and 5 indexed (each query past the 4th keeps index_topk keys), 2-4 sliding with their own sizes;
    plain causal attention in an indexed layer is not transformers' (the logits above see the selection)."""
    directory, hf = DOTS.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    attns = [layer.self_attn for layer in model.model.layers]
    assert [a.indexer is not None for a in attns] == [True, True, False, False, False, True]
    assert [a.sliding_window for a in attns] == [None, None, 3, 3, 3, None]
    assert [a.num_heads for a in attns] == [4, 4, 2, 2, 2, 4]
    keep = {}
    attns[0].indexer.register_forward_hook(lambda m, args, out: keep.__setitem__(0, out))
    ids, mask = padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert keep[0][0, 0].sum(-1).tolist() == [1, 2, 3, 4] + [4] * 9
    attns[0].indexer.forward = lambda x, q, ctx: torch.ones(
        1, 1, x.shape[1], x.shape[1], dtype=torch.bool
    ).tril()
    with torch.no_grad():
        ours = model(ids[:1], attention_mask=mask[:1]).logits
        theirs = hf(ids[:1], attention_mask=mask[:1]).logits
    assert not torch.allclose(ours, theirs, atol=1e-3)


def test_generate(tmp_path_factory):
    """The main checkpoint only (its greedy and beam search run long in transformers); the variant's decoding is
    checked against its forward by test_one_token_step."""
    DOTS.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    DOTS.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)
    check_padded_step(FAMILIES[name], tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    QUANT.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    DOTS.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save; the saved files hold the checkpoint's names: indexers in the indexed layers only, the gates and
    the RoPE keys' norms."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    indexed = {"dots3": {"0", "1", "5"}, "variant": {"0", "3"}}[name]
    assert {k.split(".")[2] for k in saved if ".indexer." in k} == indexed
    assert {
        "model.layers.2.self_attn.g_proj.weight",
        "model.layers.2.self_attn.k_rope_only_layernorm.weight",
    } <= saved


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes; config.json round-trips (per_layer_config, rope_parameters by kind with
    transformers' partial_rotary_factor)."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    kinds = [type(layer.mlp).__name__ == "GatedMLP" for layer in model.model.layers]
    assert kinds == [t == "dense" for t in model.config.mlp_layer_types]


# the released config.json's spelling (no layer_types, per_layer_config or rope_parameters)
RELEASED = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12, head_dim=32, n_routed_experts=8, num_experts_per_tok=2, index_topk=4, index_head_dim=16,
                index_n_heads=4, first_k_dense_replace=2, moe_layer_freq=1, use_dsa=True, use_sliding_window=True,
                sliding_window_size=3, swa_num_attention_heads=2, swa_num_key_value_heads=2, swa_q_lora_rank=24,
                swa_kv_lora_rank=20, swa_head_dim=24, swa_qk_nope_head_dim=12, swa_qk_rope_head_dim=12,
                swa_v_head_dim=20, rope_theta=1000.0, swa_rope_theta=100.0, moe_shared_expert_intermediate_size=24,
                apply_mla_qkv_lora_rescale=True, scoring_func="sigmoid", topk_method="noaux_tc",
                vocab_size=160, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip


@pytest.mark.parametrize(
    "given",
    [{}, dict(use_dsa=False), dict(use_sliding_window=False), dict(moe_layer_freq=[0, 1, 1, 0, 1, 1, 1]),
     dict(sliding_window=5, sliding_window_size=3)],
)  # fmt: skip
def test_released_spelling_is_read_as_transformers(given):
    import transformers

    d = {**RELEASED, **given}
    theirs = json.loads(transformers.Dots3NoteTextConfig(**d).to_json_string())
    ours = Dots3NoteTextConfig.from_dict(d).to_dict()
    for key in ("layer_types", "mlp_layer_types", "per_layer_config", "rope_parameters", "sliding_window",
                "shared_experts_intermediate_size", "apply_mla_qkv_lora_rescale"):  # fmt: skip
        assert ours[key] == theirs[key], key
    assert set(theirs) - set(ours) <= {"transformers_version", "initializer_range"}


def test_released_image_text_file(tmp_path_factory, tmp_path):
    """The released dots3_note file: the language model's settings at the top level beside vision_config and
    audio_config, its tensors under model.* beside vision_encoder.*, audio_encoder.* and the MTP layer (model.mtp.*,
    model.layers.N): read as transformers' Dots3NoteConfig's text_config, with transformers' logits."""
    import transformers
    from safetensors.torch import load_file, save_file

    directory, hf = DOTS.checkpoint(tmp_path_factory)
    cfg = json.loads(open(os.path.join(directory, "config.json")).read())
    flat = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}
    vision = dict(embed_dim=16, num_heads=2, adapter_in_dim=16, adapter_out_dim=64)
    flat.update(model_type="dots3_note", architectures=["Dots3NoteForCausalLM"], vision_config=vision,
                audio_config=dict(adapter_out_dim=64), image_token_id=151660)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(flat))
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    tensors.update({"vision_encoder.blocks.0.norm_1.weight": torch.ones(4), "audio_encoder.conv.weight": torch.ones(2),
                    "model.mtp.embed_tokens.weight": torch.ones(3), "model.layers.46.mlp.gate.weight": torch.ones(2)})  # fmt: skip
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = autolm.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    text = transformers.Dots3NoteConfig(**{k: v for k, v in flat.items() if k != "model_type"}).text_config
    assert model.config.layer_types == text.layer_types
    assert model.config.mlp_layer_types == text.mlp_layer_types
    inner = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}
    nested = autolm.Dots3NoteConfig.from_dict({"text_config": inner, "vision_config": vision})
    assert nested.to_dict() == model.config.to_dict()  # transformers' own nesting reads the same
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)


def test_default_config_is_transformers():
    """Every key transformers writes by default (its per-layer attributes refuse check_config_defaults' reads)."""
    import transformers

    theirs = json.loads(transformers.Dots3NoteTextConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Dots3NoteTextConfig().to_dict() == theirs


@pytest.mark.parametrize(
    "key, bad",
    [
        ("per_layer_config", {"2": {"num_heads": 2}}),
        ("per_layer_config", {"9": {"num_attention_heads": 2}}),
        ("per_layer_config", {"2": dict(SWA, head_dim=30)}),  # not nope + rope in a sliding layer
        ("per_layer_config", {"2": dict(SWA, num_key_value_heads=1)}),
        ("per_layer_config", {"3": dict(SWA, qk_rope_head_dim=8, qk_nope_head_dim=16)}),  # not layer 2's RoPE
        ("layer_types", ["indexed_attention", "local"]),
        ("mlp_layer_types", ["dense", "moe"]),
        ("index_head_dim", 4),
        ("rope_parameters", {"indexed_attention": {"rope_type": "default", "rope_theta": 10.0}}),
        ("q_lora_rank", None),
        ("n_group", 3),
    ],
)
def test_config_errors_name_the_key(key, bad):
    small = dict(SIZES, num_hidden_layers=4, per_layer_config={2: SWA, 3: SWA})
    Dots3NoteTextConfig.from_dict(small)
    if key == "layer_types":
        small.update(num_hidden_layers=2, per_layer_config={})
    with pytest.raises(autolm.ConfigError, match=key):
        Dots3NoteTextConfig.from_dict({**small, key: bad})


# ---- GGUF: llama.cpp's Dots3NoteModel converter (arch "dots3note") --------------------------------------------------

# what llama.cpp's dots3note holds: both kinds with one q_lora_rank and qk_rope_head_dim (the sliding layers' heads,
# kv rank and head sizes their own), two leading dense layers, ungrouped routing, shared experts as wide as the routed
# ones, an indexer key of 64 (its Hadamard rotation), a head_dim no file holds, RoPE bases by kind, a scaled routing
GGUF_SWA = dict(SWA, q_lora_rank=32, qk_rope_head_dim=8, head_dim=20)
GGUF_FAMILY = RoutedFamily(
    "Dots3NoteTextConfig",
    dict(SIZES, n_group=1, topk_group=1, shared_experts_intermediate_size=16, index_head_dim=64, routed_scaling_factor=2.5,
         per_layer_config=dict.fromkeys((2, 3, 4), GGUF_SWA), mlp_layer_types=["dense"] * 2 + ["sparse"] * 4,
         rope_parameters={"indexed_attention": dict(rope_type="default", rope_theta=500.0),
                          "sliding_attention": dict(rope_type="default", rope_theta=100.0)}),
)  # fmt: skip
_MLA = (
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "v_head_dim",
    "qk_rope_head_dim",
)
# transformers' names -> llama.cpp's, inside a block (the gguf package here has no DOTS3NOTE map)
_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_a_proj": "attn_q_a",
          "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
          "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
          "self_attn.k_b_proj": "attn_k_b", "self_attn.v_b_proj": "attn_v_b", "self_attn.o_proj": "attn_output",
          "self_attn.k_rope_only_layernorm": "attn_k_norm", "self_attn.g_proj": "attn_gate",
          "self_attn.indexer.wq_b": "indexer.attn_q_b", "self_attn.indexer.wk": "indexer.attn_k",
          "self_attn.indexer.k_norm": "indexer.k_norm", "self_attn.indexer.weights_proj": "indexer.proj",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
          "mlp.gate.e_score_correction": "exp_probs_b",
          "mlp.experts.gate_proj": "ffn_gate_exps", "mlp.experts.up_proj": "ffn_up_exps",
          "mlp.experts.down_proj": "ffn_down_exps", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
          "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}  # fmt: skip


def _kinds(c: dict) -> tuple[list[bool], dict, dict]:
    """(sliding flag per layer, the indexed layers' MLA sizes, the sliding layers') of a config.json."""
    swa = [t == "sliding_attention" for t in c["layer_types"][: c["num_hidden_layers"]]]
    main = {k: c[k] for k in _MLA}
    first = next((e for k, e in c["per_layer_config"].items() if swa[int(k)]), {})
    return swa, main, {**main, **{k: v for k, v in first.items() if k in _MLA}}


def _converter_keys(w, c: dict, n: int) -> None:
    """Dots3NoteModel.set_gguf_parameters of the released config.json's values (TextModel's, DeepseekV2Model's, its
    own), the keys the gguf package here has no writer for written raw."""
    import gguf

    swa, main, sw = _kinds(c)
    rope = c["rope_parameters"]
    w.add_block_count(n)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count([sw["num_attention_heads"] if s else main["num_attention_heads"] for s in swa])
    w.add_head_count_kv(1)
    w.add_rope_freq_base(rope["indexed_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_expert_group_count(c["n_group"])
    w.add_expert_group_used_count(c["topk_group"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
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
    w.add_uint32("dots3note.attention.sliding_window", c["sliding_window"])
    w.add_array("dots3note.attention.sliding_window_pattern", swa)
    w.add_uint32("dots3note.attention.kv_lora_rank_swa", sw["kv_lora_rank"])
    w.add_uint32("dots3note.attention.key_length_swa", sw["kv_lora_rank"] + sw["qk_rope_head_dim"])
    w.add_uint32("dots3note.attention.value_length_swa", sw["kv_lora_rank"])
    w.add_uint32("dots3note.attention.key_length_mla_swa", sw["qk_nope_head_dim"] + sw["qk_rope_head_dim"])
    w.add_uint32("dots3note.attention.value_length_mla_swa", sw["v_head_dim"])
    w.add_indexer_head_count(c["index_n_heads"])
    w.add_indexer_key_length(c["index_head_dim"])
    w.add_indexer_top_k(c["index_topk"])
    w.add_array("dots3note.attention.indexer.types", [not s for s in swa])


def write_dots3_gguf(hf, path: str, halves: bool = False, rescale: bool = True) -> None:
    """The GGUF llama.cpp's Dots3NoteModel converter (--outtype f32) makes of transformers' dots3 Note `hf`, from its
    files (the config as the released config.json spells it: the converter reads swa_* sizes, sliding_window_size,
    swa_rope_theta): the keys of _converter_keys; the tensors as it maps them: sqrt(hidden_size / rank) folded into
    the latent norms where `rescale` (apply_mla_qkv_lora_rescale), kv_b_proj split per layer with that layer's heads
    and sizes, the experts stacked, no RoPE row moved, the tied head left out. `halves`: of the checkpoint with the
    indexer's rotated rows as llama.cpp's halves (what llama.cpp runs as transformers runs `hf`: autolm's GGUF out)."""
    import math
    import re

    import gguf
    import numpy as np
    from gguf_mimic import add_toy_vocab, stacked_experts
    from gguf_moe import mla_pieces
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    n = c["num_hidden_layers"]
    w = gguf.GGUFWriter(path, "dots3note")
    _converter_keys(w, c, n)
    add_toy_vocab(w)
    swa, main, sw = _kinds(c)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    if halves:
        tensors = _reordered(tensors, hf.config, to_file=True)
    moe = c["moe_intermediate_size"]
    for name, t in stacked_experts(tensors, ".mlp.experts.", c["n_routed_experts"]):
        if name == "lm_head.weight" and c["tie_word_embeddings"]:
            continue
        if name.endswith("experts.gate_up_proj"):
            stem = name[: -len("gate_up_proj")]
            pieces = [(stem + "gate_proj.weight", t[:, :moe]), (stem + "up_proj.weight", t[:, moe:])]
        elif name.endswith("experts.down_proj"):
            pieces = [(name + ".weight", t)]
        else:
            m = re.match(r"model\.layers\.(\d+)\.", name)
            sizes = sw if m and swa[int(m.group(1))] else main
            if rescale and name.endswith("a_layernorm.weight"):
                t = t * math.sqrt(c["hidden_size"] / t.shape[0])
            pieces = mla_pieces(name, t, sizes["num_attention_heads"], sizes["qk_nope_head_dim"])
        for piece, value in pieces:
            piece = piece.replace("gate.e_score_correction_bias", "gate.e_score_correction.bias")
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", piece)
            if m:
                out = f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
            else:
                top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
                out = top[piece.rsplit(".", 1)[0]] + ".weight"
            w.add_tensor(out, np.ascontiguousarray(value.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_ROTATED = (("indexer.wq_b", "indexer.attn_q_b"), ("indexer.wk", "indexer.attn_k"), ("indexer.k_norm", "indexer.k_norm"))  # fmt: skip


def _reordered(tensors: dict, config, to_file: bool) -> dict:
    """transformers' tensors with the indexer's rotated rows moved from pairs to llama.cpp's halves (to_file), or
    back (autolm.models.dots3_note_gguf.row_order)."""
    from autolm.models.dots3_note_gguf import row_order

    out = {}
    for name, t in tensors.items():
        stem = next((s for module, s in _ROTATED if f".{module}." in name), None)
        order = None if stem is None else row_order(stem, config)
        out[name] = t if order is None else t[torch.argsort(order) if to_file else order].contiguous()
    return out


def write_dots3_gguf_halves(hf, path: str) -> None:
    write_dots3_gguf(hf, path, halves=True)


@pytest.mark.parametrize("rescale", [True, False])
def test_gguf_converters_file(tmp_path_factory, tmp_path, rescale):
    """The converter's file loads as Dots3NoteForCausalLM with the config's fields, and computes as llama.cpp does:
    transformers' logits (1e-4) on the checkpoint whose indexer rows are read as halves (models.dots3_note_gguf), and
    without apply_mla_qkv_lora_rescale, whose latent norms are then also read divided by the scales llama.cpp
    lacks; llama.cpp's logits close on both files; neither is transformers' model of the checkpoint (llama.cpp's
    converter and graph disagree with transformers there)."""
    import copy
    import math

    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    path = str(tmp_path / "conv.gguf")
    write_dots3_gguf(hf, path, rescale=rescale)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="conv.gguf")
    assert type(model).__name__ == "Dots3NoteForCausalLM"
    c = model.config
    want = Dots3NoteTextConfig.from_dict(json.load(open(f"{hf.name_or_path}/config.json")))
    for key in ("layer_types", "mlp_layer_types", "sliding_window", "index_topk", "index_head_dim", "index_n_heads",
                "routed_scaling_factor", "norm_topk_prob", "n_shared_experts", "shared_experts_intermediate_size",
                "rms_norm_eps", "tie_word_embeddings", *_MLA):  # fmt: skip
        assert getattr(c, key) == pytest.approx(getattr(want, key)), key
    assert [[getattr(c.layer_config(i), k) for k in _MLA] for i in range(6)] == [
        [getattr(want.layer_config(i), k) for k in _MLA] for i in range(6)
    ]
    assert {k: v["rope_theta"] for k, v in c.rope_parameters.items()} == {"indexed_attention": 500.0, "sliding_attention": 100.0}  # fmt: skip
    read_as_halves = copy.deepcopy(hf)
    state = _reordered(hf.state_dict(), hf.config, to_file=False)
    if not rescale:  # the norms llama.cpp runs unscaled
        state = {
            k: v / math.sqrt(64 / v.shape[0]) if k.endswith("a_layernorm.weight") else v
            for k, v in state.items()
        }
    read_as_halves.load_state_dict(state)
    with torch.no_grad():
        ours = model(ROW).logits[0]
        torch.testing.assert_close(ours, read_as_halves(ROW).logits[0], atol=1e-4, rtol=1e-4)
        assert (
            ours - hf(ROW).logits[0]
        ).abs().max() > 1e-2  # the converter's file is not transformers' model
    _close_to_llama_cpp(ours, llama_cpp_logits(path))


def test_gguf_out(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """autolm's file is the converter's of the checkpoint with the indexer's rotated rows as halves (metadata and
    tensors: the latent scales folded), reads back as the same model, and llama.cpp runs it with transformers'
    logits (close)."""
    import numpy as np
    from gguf.gguf_reader import GGUFReader
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf

    directory, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    out = save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    write_dots3_gguf_halves(hf, str(tmp_path / "conv.gguf"))
    ours, conv = GGUFReader(out), GGUFReader(str(tmp_path / "conv.gguf"))
    keys = lambda r: {k: (f.types, f.contents()) for k, f in r.fields.items() if k.startswith("dots3note.")}  # noqa: E731
    assert keys(ours) == keys(conv)
    tensors = lambda r: {t.name: np.asarray(t.data).tobytes() for t in r.tensors}  # noqa: E731
    assert tensors(ours).keys() == tensors(conv).keys()
    for name, data in tensors(ours).items():  # the folded norms to float rounding
        assert np.allclose(
            np.frombuffer(data, np.float32), np.frombuffer(tensors(conv)[name], np.float32), atol=1e-6
        ), name
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    assert back.config.layer_types == model.config.layer_types
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-5)
        row = hf(ROW).logits[0]
    _close_to_llama_cpp(row, llama_cpp_logits(out))


@pytest.mark.parametrize(
    ("field", "value"),
    [("layer_types", ["indexed_attention", "full_attention", *["sliding_attention"] * 3, "indexed_attention"]),
     ("q_lora_rank", {k: dict(GGUF_SWA, q_lora_rank=24) for k in "234"}),
     ("qk_rope_head_dim", {k: dict(GGUF_SWA, qk_rope_head_dim=4, qk_nope_head_dim=16) for k in "234"}),
     ("n_group", 2), ("topk_group", 2), ("mlp_layer_types", ["dense", "sparse", "dense", "sparse", "sparse", "sparse"]),
     ("shared_experts_intermediate_size", 24), ("attention_bias", True), ("index_head_dim", 48),
     ("rope_parameters", {"indexed_attention": dict(rope_type="linear", rope_theta=500.0, factor=2.0),
                          "sliding_attention": dict(rope_type="default", rope_theta=100.0)})],
)  # fmt: skip
def test_gguf_out_refuses_what_llama_cpp_computes_otherwise(tmp_path_factory, tmp_path, field, value):
    """A config llama.cpp's dots3note would run otherwise (or not load) is a ConfigError naming the field; no file.
    (The sliding layers' own q_lora_rank or qk_rope_head_dim is set through per_layer_config.)"""

    def change(c):
        if field in ("q_lora_rank", "qk_rope_head_dim"):
            c.per_layer_config = {**c.per_layer_config, **value}
        else:
            setattr(c, field, value)

    GGUF_FAMILY.check_gguf_refused(tmp_path_factory, tmp_path, field, change)


@pytest.mark.parametrize(
    ("given", "message"),
    [({"attention.sliding_window_pattern": None}, "layer_types"),
     ({"attention.indexer.types": [True, True]}, "layer_types"), ({"attention.head_count": [4, 2], "attention.sliding_window_pattern": [False, False],
      "attention.indexer.types": [True, True]}, "num_attention_heads"),
     ({"attention.kv_lora_rank_swa": None}, "per_layer_config"), ({"rope.scaling.type": "yarn"}, "rope_parameters")],
)  # fmt: skip
def test_gguf_files_refused(given, message):
    """dots3note files llama.cpp does not load, or runs as no dots3 Note: refused naming the field."""
    from autolm.models.dots3_note_gguf import derive

    keys = {"expert_gating_func": 2, "attention.key_length_mla": 24, "attention.q_lora_rank": 32,
            "attention.indexer.top_k": 4, "attention.indexer.types": [True, False],
            "attention.sliding_window_pattern": [False, True], "attention.kv_lora_rank_swa": 16,
            "attention.key_length_mla_swa": 20, "attention.value_length_mla_swa": 8, "rope.freq_base_swa": 1e3, **given}  # fmt: skip
    heads = keys.pop("attention.head_count", [4, 4])
    rope = {"rope_theta": 1e4, **({"rope_type": "yarn"} if "rope.scaling.type" in given else {})}
    d = {"num_hidden_layers": 2, "head_dim": 8, "num_attention_heads": heads, "rope_parameters": rope}
    with pytest.raises(autolm.ConfigError, match=message):
        derive(d, lambda key, default=None: keys.get(key, default))
