"""MiniMax-M3's language model (minimax_m3_vl_text) against transformers and peft: Gemma-normed per-head q/k norms,
dense and mixture layers by mlp_layer_types (the clamped SwiGLU, the router's random correction bias, the scaled
routed weights, a shared expert), and the block-sparse layers whose lightning indexer keeps the top
index_topk_blocks blocks of index_block_size keys plus the local ones, over prompts longer than what it keeps (13
tokens, 2 blocks of 2 kept). A variant: every layer sparse, an indexer narrower than the heads (8 of 16) with one
head per attention head, blocks of 3, two local blocks, half-rotary RoPE, a tied head, other SwiGLU constants.

transformers anchors the indexer's blocks to key slots and its reach to positions, so its left-padded batches are
not its rows (a padded row's queries see only padding blocks: the TODO in its MiniMaxM3VLIndexer); autolm's blocks
follow the row's real tokens, so each row of a padded batch (forward, generate, the eager one-token step) is checked
against transformers on that row alone, and the battery (bf16, LoRA vs peft, quantized, generate with beams) runs
on unpadded prompts. No compiled-step test: the compiled graphs do not serve the sparse layers (they read the
indexer's cache layer too). Also: the released layout (block_sparse_moe with per-expert w1/w3/w2, index_* tensor
names, sparse_attention_config / moe_layer_freq) inside the image-text wrapper (minimax_m3_vl, vision tensors
skipped), config defaults and errors. GGUF (llama.cpp's "minimax-m3"): the converter's file of a checkpoint
llama.cpp can run (its layer pattern, SwiGLU constants, one indexer head per key/value head) loads with
transformers' logits, autolm's GGUF out reads back, llama.cpp (flash attention on: its sparse selection needs it)
runs both on one unpadded row close to autolm, and what llama.cpp would compute differently is refused by field."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import family_checks
import numpy as np
import pytest
import torch
from conftest import padded_batch, positions
from safetensors.torch import load_file, save_file
from test_family_minimax_m2 import RoutedFamily
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm
from autolm import step
from autolm.models.minimax_m3 import MiniMaxM3VLTextConfig

SIZES = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_local_experts=8, num_experts_per_tok=2, dense_intermediate_size=48,
             shared_intermediate_size=24, index_n_heads=2, index_head_dim=16, index_block_size=2, index_topk_blocks=2,
             index_local_blocks=1, max_position_embeddings=64, swiglu_limit=1.0,
             layer_types=["minimax_m3_sparse", "full_attention", "minimax_m3_sparse"],
             mlp_layer_types=["dense", "sparse", "sparse"])  # fmt: skip
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_up_proj"]  # peft has no default for the type
M3 = RoutedFamily("MiniMaxM3VLTextConfig", SIZES, lora_targets=TARGETS)
VARIANT = RoutedFamily(
    "MiniMaxM3VLTextConfig",
    dict(SIZES, index_n_heads=4, index_head_dim=8, index_block_size=3, index_local_blocks=2, tie_word_embeddings=True,
         routed_scaling_factor=1.5, swiglu_alpha=1.2, swiglu_limit=3.0, layer_types=["minimax_m3_sparse"] * 3,
         mlp_layer_types=["sparse", "dense", "sparse"],
         rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
    lora_targets=["k_proj", "down_proj"],
)  # fmt: skip
FAMILIES = {"m3": M3, "variant": VARIANT}


@pytest.fixture
def unpadded(monkeypatch):
    """The battery's batches as their first row alone, unpadded (see the module docstring)."""
    monkeypatch.setattr(
        family_checks, "padded_batch", lambda seed=0, lengths=(13,), **kw: padded_batch(seed, lengths[:1])
    )


def rows_alone(hf, ids, mask, **kwargs):
    """transformers' logits of each row of a left-padded batch run alone."""
    with torch.no_grad():
        return [hf(ids[i][mask[i].bool()][None], **kwargs).logits[0] for i in range(ids.shape[0])]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    """A left-padded batch (13, 9 and 4 tokens): each row's logits are transformers' on the row alone."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    for i, theirs in enumerate(rows_alone(hf, ids, mask)):
        torch.testing.assert_close(ours[i][mask[i].bool()], theirs, atol=1e-4, rtol=1e-4)


def test_indexer_drops_blocks(tmp_path_factory):
    """On 13 tokens a query past the 4th keeps 2 blocks of 2 (the local one among them), not always the latest; with
    plain causal attention the logits are not transformers' (the comparison above sees the selection)."""
    directory, hf = M3.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    masks = []
    handle = model.model.layers[2].self_attn.indexer.register_forward_hook(
        lambda m, a, out: masks.append(out)
    )
    ids = padded_batch(lengths=(13,))[0]
    with torch.no_grad():
        model(ids)
    handle.remove()
    kept = masks[0][0, 0]
    assert kept.sum(-1).tolist() == [1, 2, 3, 4] + [3, 4] * 4 + [3]  # the local block is the query's own
    assert kept.tril().equal(kept) and not all(kept[t, t - 3 : t + 1].all() for t in range(5, 13))
    for layer in model.model.layers:
        layer.self_attn.indexer = None
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() > 1e-3


def test_generate(tmp_path_factory, unpadded):
    """The battery's greedy and beam search, on a prompt."""
    M3.check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_padded_rows(tmp_path_factory, name):
    """Greedy over a left-padded batch: each row's tokens are transformers' on the row alone."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=2, lengths=(11, 6))
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for i in range(2):
        row = ids[i][mask[i].bool()][None]
        theirs = hf.generate(row, max_new_tokens=8, do_sample=False)[0, row.shape[1] :]
        assert torch.equal(ours[i, ids.shape[1] :], theirs)


def test_bf16(tmp_path_factory, unpadded):
    M3.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step_padded_batch(tmp_path_factory, name):
    """The eager step over a left-padded batch, teacher-forced: each token's logits are transformers' on the row
    alone; the cache's extra layers hold the sparse layers' index keys (none for a full-attention layer), and the
    compiled graphs are not offered."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    n = model.config.num_hidden_layers
    indexed = [layer.self_attn.indexer is not None for layer in model.model.layers]
    assert model.attention_shapes()[n:] == [(1, model.config.index_head_dim if i else 0) for i in indexed]
    assert not step.compilable(model)
    ids, mask = padded_batch(seed=3)
    more = torch.randint(3, 100, (ids.shape[0], 6), generator=torch.Generator().manual_seed(4))
    full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    theirs = rows_alone(hf, full_ids, full_mask)
    model.decode_mode = "eager"
    with torch.inference_mode():
        cache = model.make_cache(ids.shape[0], full_ids.shape[1] + 1)
        model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache)
        held = [bool(cache.keys[n + i][:, :, : ids.shape[1]].abs().sum() > 0) for i in range(n)]
        assert held == indexed
        decode = step.decoder(model, cache, mask)
        pos = positions(full_mask)
        for i in range(6):
            t = ids.shape[1] + i
            got = decode(more[:, i : i + 1], full_mask[:, : t + 1], pos[:, t : t + 1], cache)
            for b in range(ids.shape[0]):
                torch.testing.assert_close(got[b], theirs[b][i - 6], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name, unpadded):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_quantized(tmp_path_factory, unpadded):
    M3.check_quantized(tmp_path_factory, "int8")


def test_disk_offload(tmp_path_factory, tmp_path):
    M3.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name, unpadded):
    """check_save; the saved files hold transformers' names (stacked experts, the router's bias, the indexers')."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.2.self_attn.indexer.q_norm.weight", "model.layers.2.mlp.experts.gate_up_proj",
            "model.layers.2.mlp.gate.e_score_correction_bias", "model.layers.2.mlp.shared_experts.down_proj.weight"} <= saved  # fmt: skip


def test_released_layout_in_image_text_wrapper(tmp_path_factory, tmp_path):
    """The released files: an image-text config.json (text_config with sparse_attention_config and moe_layer_freq,
    tie_word_embeddings at the top), the language model under language_model.model.*, the mixture as
    block_sparse_moe (per-expert w1/w3/w2, the bias on the block), the indexer as index_*, vision and mtp tensors:
    transformers' logits."""
    directory, hf = M3.checkpoint(tmp_path_factory)
    text = json.loads(open(f"{directory}/config.json").read())
    text.pop("layer_types"), text.pop("mlp_layer_types")
    text["sparse_attention_config"] = dict(sparse_num_index_heads=2, sparse_index_dim=16, sparse_block_size=2,
                                           sparse_topk_blocks=2, sparse_local_block=1, sparse_attention_freq=[1, 0, 1])  # fmt: skip
    text["moe_layer_freq"] = [0, 1, 1]
    for k in [k for k in text if k.startswith("index_")]:
        text.pop(k)
    files = {}
    for name, t in load_file(f"{directory}/model.safetensors").items():
        name = name.replace("self_attn.indexer.", "self_attn.index_").replace(
            ".mlp.gate.e_score", ".mlp.e_score"
        )
        if ".mlp.experts." in name:
            for e in range(t.shape[0]):
                parts = t[e].chunk(2, 0) if name.endswith("gate_up_proj") else (t[e],)
                for w, p in zip(("w1", "w3") if len(parts) == 2 else ("w2",), parts, strict=True):
                    files[name.replace("gate_up_proj", "").replace("down_proj", "") + f"{e}.{w}.weight"] = (
                        p.clone()
                    )
            continue
        name = name.replace(".mlp.", ".block_sparse_moe.") if ".layers.0." not in name else name
        files[
            name.replace("model.", "language_model.model.", 1).replace("lm_head", "language_model.lm_head")
        ] = t
    files["vision_tower.vision_model.pre_layrnorm.weight"] = torch.ones(4)
    files["mtp.layers.0.norm.weight"] = torch.ones(4)
    save_file(files, str(tmp_path / "model.safetensors"))
    outer = dict(model_type="minimax_m3_vl", architectures=["MiniMaxM3SparseForConditionalGeneration"], text_config=text,
                 vision_config={}, tie_word_embeddings=False)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(outer))
    model = autolm.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert (
        model.config.layer_types == SIZES["layer_types"]
        and model.config.mlp_layer_types == SIZES["mlp_layer_types"]
    )
    ids = padded_batch(lengths=(13,))[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_config_defaults_and_round_trip():
    """Every field autolm writes holds transformers' default (rotary_dim kept as read, not turned into a partial
    factor: transformers' model rotates all of head_dim); config.json round trips."""
    import transformers

    theirs = transformers.MiniMaxM3VLTextConfig()
    for key, value in MiniMaxM3VLTextConfig().to_dict().items():
        if key not in ("model_type", "transformers_version"):
            assert getattr(theirs, key) == value, key
    c = MiniMaxM3VLTextConfig.from_dict({"head_dim": 128, "rotary_dim": 64, "num_hidden_layers": 2})
    assert "partial_rotary_factor" not in c.rope_parameters
    assert MiniMaxM3VLTextConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()


@pytest.mark.parametrize(
    ("key", "bad"),
    [("index_n_heads", 3), ("index_block_size", 0), ("mlp_layer_types", ["dense", "moe"]), ("swiglu_limit", -1.0),
     ("layer_types", ["minimax_m3_sparse", "linear_attention"])],
)  # fmt: skip
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, head_dim=16,
                 num_local_experts=8, num_experts_per_tok=2, index_n_heads=2)  # fmt: skip
    MiniMaxM3VLTextConfig(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        MiniMaxM3VLTextConfig.from_dict({**small, key: bad})


# ---- GGUF: llama.cpp's "minimax-m3" ----------------------------------------------------------------------------

# what llama.cpp's graph runs: the sparse layers exactly the mixture ones past the leading dense one, gpt-oss's SwiGLU
# constants, one indexer head per key/value head turned over the whole (rotary) head, the dense MLP as wide as an
# expert (the converter writes feed_forward_length from intermediate_size), a shared MLP of two experts' width
GGUF_FAMILY = RoutedFamily(
    "MiniMaxM3VLTextConfig",
    dict(SIZES, layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"], swiglu_limit=7.0,
         dense_intermediate_size=32, shared_intermediate_size=64, rotary_dim=16, routed_scaling_factor=1.5),
)  # fmt: skip
_GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.down_proj": "ffn_down",
    "self_attn.indexer.q_proj": "indexer.q_proj", "self_attn.indexer.k_proj": "indexer.k_proj",
    "self_attn.indexer.q_norm": "indexer.q_norm", "self_attn.indexer.k_norm": "indexer.k_norm",
    "mlp.gate": "ffn_gate_inp", "mlp.gate.e_score_correction": "exp_probs_b", "mlp.experts.down_proj": "ffn_down_exps",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}  # fmt: skip
_HALVES = {"mlp.gate_up_proj": ("ffn_gate", "ffn_up"), "mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
           "mlp.shared_experts.gate_up_proj": ("ffn_gate_shexp", "ffn_up_shexp")}  # fmt: skip


def write_minimax_m3_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's MiniMaxM3Model converter makes of `hf` (--outtype f32): MiniMax-M2's keys (TextModel's,
    the head size, the experts' counts and length, the sigmoid gating, rope.dimension_count as rotary_dim), the
    shared experts' count, the routed scale and renormalisation, the indexer's five keys, the leading dense layers;
    1 added to every norm weight; the experts' w1/w3/w2 stacked (here split off transformers' stacked gate_up), the
    dense and shared MLPs' gate / up apart, the correction bias as exp_probs_b.bias; the installed gguf package
    predates the arch: names by gguf-py's map written here. A plain vocabulary."""
    import gguf
    from gguf_mimic import add_text_model, add_toy_vocab

    c, hp = hf.config, json.load(open(f"{hf.name_or_path}/config.json"))
    w = gguf.GGUFWriter(path, "minimax-m3")
    add_text_model(w, c)
    w.add_expert_count(hp["num_local_experts"])
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_expert_feed_forward_length(hp["intermediate_size"])
    w.add_rope_dimension_count(hp["rotary_dim"])
    w.add_expert_shared_count(hp["shared_intermediate_size"] // hp["intermediate_size"])  # n_shared_experts
    w.add_expert_weights_scale(hp["routed_scaling_factor"])
    w.add_expert_weights_norm(True)
    for key, field in (("head_count", "index_n_heads"), ("key_length", "index_head_dim"),
                       ("top_k", "index_topk_blocks"), ("block_size", "index_block_size"),
                       ("local_blocks", "index_local_blocks")):  # fmt: skip
        w.add_uint32(f"minimax-m3.attention.indexer.{key}", hp[field])
    w.add_leading_dense_block_count(hp["mlp_layer_types"].index("sparse"))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        name = name.replace("e_score_correction_bias", "e_score_correction.bias").removesuffix(".weight")
        t = t + 1 if name.endswith("norm") else t
        base, _, kind = name.rpartition(".") if name.endswith(".bias") else (name, "", "weight")
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
        stem, part = (f"blk.{m.group(1)}.", m.group(2)) if m else ("", base)
        pieces = (
            zip(_HALVES[part], t.chunk(2, -2), strict=True) if part in _HALVES else [(_GGUF_NAMES[part], t)]
        )
        for out, p in pieces:
            w.add_tensor(f"{stem}{out}.{kind}", np.ascontiguousarray(p.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits_fa(path: str) -> torch.Tensor:
    """test_gguf_remote_archs' llama_cpp_logits with flash attention on (llama.cpp's sparse selection runs only
    then; without it llama.cpp attends densely)."""
    from test_gguf_remote_archs import _CHILD, ROW

    pytest.importorskip("llama_cpp")
    child = _CHILD.replace("verbose=False", "flash_attn=True, verbose=False")
    assert child != _CHILD
    ids = ",".join(str(t) for t in ROW[0].tolist())
    run = subprocess.run([sys.executable, "-c", child, path, ids, path + ".npy"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.from_numpy(np.load(path + ".npy"))


def test_gguf_in_and_out_with_llama_cpp(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """The converter's file loads as the family with transformers' logits and config; autolm's GGUF out reads back
    the same model; llama.cpp runs both files on one unpadded row (13 tokens: the indexers drop blocks) close to
    autolm's logits (its rows of a padded batch are each row alone, as llama.cpp's sequences)."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp

    from autolm.gguf_writer import save_gguf

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_minimax_m3_gguf(hf, str(tmp_path / "conv.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="conv.gguf")
    assert type(model).__name__ == "MiniMaxM3VLForCausalLM"
    c, theirs = model.config, hf.config
    for key in ("layer_types", "mlp_layer_types", "shared_intermediate_size", "dense_intermediate_size", "head_dim",
                "index_n_heads", "index_head_dim", "index_block_size", "index_topk_blocks", "index_local_blocks"):  # fmt: skip
        assert getattr(c, key) == getattr(theirs, key), key
    assert c.routed_scaling_factor == pytest.approx(1.5)
    with torch.no_grad():
        ours = model(ROW).logits[0]
        torch.testing.assert_close(ours, hf(ROW).logits[0], atol=1e-4, rtol=1e-4)
    out = save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    with torch.no_grad():
        torch.testing.assert_close(back(ROW).logits[0], ours, atol=1e-5, rtol=1e-5)
    _close_to_llama_cpp(ours, llama_cpp_logits_fa(str(tmp_path / "conv.gguf")))
    _close_to_llama_cpp(ours, llama_cpp_logits_fa(out))


@pytest.mark.parametrize(
    ("field", "value"),
    [("swiglu_limit", 3.0), ("layer_types", ["full_attention", "full_attention", "minimax_m3_sparse"]),
     ("mlp_layer_types", ["sparse", "dense", "sparse"]), ("index_n_heads", 4), ("index_head_dim", 8),
     ("shared_intermediate_size", 24), ("tie_word_embeddings", True)],
)  # fmt: skip
def test_gguf_out_refuses_what_llama_cpp_computes_otherwise(tmp_path, merged_tokenizer, field, value):  # noqa: F811
    """A config llama.cpp's minimax-m3 graph would run differently is a ConfigError naming the field; no file."""
    from autolm.gguf_writer import save_gguf
    from autolm.models.minimax_m3 import MiniMaxM3VLForCausalLM

    config = MiniMaxM3VLTextConfig(**{**GGUF_FAMILY.kwargs, field: value, "vocab_size": 160})
    with pytest.raises(autolm.ConfigError, match=field):
        save_gguf(MiniMaxM3VLForCausalLM(config), merged_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
