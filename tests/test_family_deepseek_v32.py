"""DeepSeek-V3.2-Exp (deepseek_v32) against transformers and peft: DeepSeek-V3's latent attention (always the low-rank
query) with the DSA indexer keeping the top index_topk keys of each query (prompts longer than it: keys are dropped),
dense layers by mlp_layer_types (derived from first_k_dense_replace, or given), the grouped sigmoid-routed experts
(a random correction bias) with a shared expert. A variant: an indexer of qk_rope_head_dim features only (all turned)
and index_topk 3, attention biases, values wider than the keys, no renormalisation, YaRN with mscale_all_dim, a tied
head. The battery (logits, generate, bf16, the eager one-token step with the indexer's keys in the cache, LoRA on the
indexer's projections too, quantized, save, disk offload, names and config.json), transformers' config defaults, the
config's checks. No compiled-step test: the compiled graphs do not serve these layers (they read a second cache
layer). GGUF: the file llama.cpp's converter (DeepseekV32Model) writes of a DeepSeek-V3.2 (config.json naming the
sigmoid scoring, as the released one) loads with transformers' logits; test_gguf_out and test_gguf_llamacpp check
autolm's own file against that converter's and llama.cpp's logits (over prompts longer than index_topk)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import check_config_defaults
from test_family_minimax_m2 import RoutedFamily

import autolm
from autolm import step
from autolm.models.deepseek_v32 import DeepseekV32Config

SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_group=2, topk_group=1,
             num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, max_position_embeddings=64,
             index_topk=4, index_head_dim=16, index_n_heads=8)  # fmt: skip
# peft has no default target modules for deepseek_v32; the indexer's projections among them
DS32 = RoutedFamily(
    "DeepseekV32Config", SIZES, lora_targets=["q_a_proj", "kv_b_proj", "o_proj", "wq_b", "wk"]
)
VARIANT = RoutedFamily(
    "DeepseekV32Config",
    dict(SIZES, attention_bias=True, v_head_dim=32, norm_topk_prob=False, tie_word_embeddings=True,
         mlp_layer_types=["sparse", "dense", "sparse"], max_position_embeddings=256, index_topk=3, index_head_dim=8,
         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                              beta_fast=32, beta_slow=1, original_max_position_embeddings=64)),
    lora_targets=["q_b_proj", "o_proj", "kv_a_proj_with_mqa", "weights_proj"],
)  # fmt: skip
FAMILIES = {"ds32": DS32, "variant": VARIANT}
# what llama.cpp's deepseek32 holds: the released config.json's sigmoid scoring, the leading dense layers, an
# indexer head of a power of two from 64 (the size of the Hadamard rotation llama.cpp turns its queries and keys by)
GGUF_FAMILY = RoutedFamily("DeepseekV32Config", dict(SIZES, scoring_func="sigmoid", index_head_dim=64))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_indexer_drops_keys(tmp_path_factory):
    """On a 13-token prompt each query past the 4th keeps exactly index_topk (4) keys, not always the latest ones;
    with plain causal attention instead the logits are not transformers' (the comparison above sees the selection)."""
    directory, hf = DS32.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    indexer = model.model.layers[1].self_attn.indexer
    masks = []
    handle = indexer.register_forward_hook(lambda m, args, out: masks.append(out))
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    kept = masks[0][0, 0]  # row 0: 13 real tokens
    assert kept.sum(-1).tolist() == [1, 2, 3, 4] + [4] * 9
    assert not all(kept[t, t - 3 : t + 1].all() for t in range(4, 13))  # not a sliding window
    assert kept.tril().equal(kept)  # causal
    for layer in model.model.layers:
        layer.self_attn.keep = lambda x, ctx: torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        dense = model(ids[:1], attention_mask=mask[:1]).logits[real[:1]]
        theirs = hf(ids[:1], attention_mask=mask[:1]).logits[real[:1]]
    assert (dense - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    DS32.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step_padded_batch(tmp_path_factory, name):
    check_padded_step(FAMILIES[name], tmp_path_factory)


def check_padded_step(family, tmp_path_factory) -> None:
    """The eager step over a left-padded batch, teacher-forced: each token's logits equal transformers' on the whole
    sequence; the cache's extra layers (one per indexer) hold the indexer's keys, and the compiled graphs are not
    offered for these layers."""
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    n = model.config.num_hidden_layers
    indexed = [layer.self_attn.indexer is not None for layer in model.model.layers]
    assert model.attention_shapes()[n:] == [(1, model.config.index_head_dim if i else 0) for i in indexed]
    assert not step.compilable(model)
    ids, mask = padded_batch(seed=3)
    more = torch.randint(3, 100, (ids.shape[0], 6), generator=torch.Generator().manual_seed(4))
    full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    with torch.no_grad():
        theirs = hf(full_ids, attention_mask=full_mask, position_ids=positions(full_mask)).logits[:, -6:]
    model.decode_mode = "eager"
    with torch.inference_mode():
        cache = model.make_cache(ids.shape[0], full_ids.shape[1] + 1)
        model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache)
        held = [bool(cache.keys[n + i][:, :, : ids.shape[1]].abs().sum() > 0) for i in range(n)]
        assert held == indexed  # the indexers' keys; nothing for a layer without one
        decode = step.decoder(model, cache, mask)
        pos = positions(full_mask)
        for i in range(6):
            t = ids.shape[1] + i
            got = decode(more[:, i : i + 1], full_mask[:, : t + 1], pos[:, t : t + 1], cache)
            torch.testing.assert_close(got, theirs[:, i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    DS32.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    DS32.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save; the saved files hold the checkpoint's names (per-expert tensors, the indexers' projections and
    norms) and its config.json."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.2.self_attn.indexer.wq_b.weight", "model.layers.2.self_attn.indexer.k_norm.bias",
            "model.layers.2.mlp.experts.7.gate_proj.weight"} <= saved  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes; config.json round-trips; the layers' kinds from mlp_layer_types."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    kinds = [type(layer.mlp).__name__ == "GatedMLP" for layer in model.model.layers]
    assert kinds == [t == "dense" for t in model.config.mlp_layer_types]
    assert model.config.mlp_layer_types == (["dense", "sparse", "sparse"] if name == "ds32"
                                            else ["sparse", "dense", "sparse"])  # fmt: skip


def test_default_config_is_transformers():
    """DeepseekV32Config() holds transformers' defaults (DeepSeek-V3.2's sizes, head_dim, layer_types and
    mlp_layer_types written); initializer_range, kept only where given, aside; a rope_interleave key is ignored,
    as transformers ignores it."""
    import transformers

    check_config_defaults(DeepseekV32Config)
    theirs = json.loads(transformers.DeepseekV32Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert DeepseekV32Config().to_dict() == theirs
    assert DeepseekV32Config.from_dict({"rope_interleave": False}).rope_interleave is True


@pytest.mark.parametrize(
    "key, bad",
    [
        ("q_lora_rank", None),
        ("index_topk", 0),
        ("index_n_heads", "8"),
        ("index_head_dim", 4),  # fewer than qk_rope_head_dim
        ("mlp_layer_types", ["dense", "moe"]),
        ("layer_types", ["full_attention"] * 2),
        ("num_key_value_heads", 2),
        ("n_group", 3),
    ],
)
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, n_routed_experts=8,
                 n_group=2, topk_group=1, num_experts_per_tok=2, qk_rope_head_dim=8, index_head_dim=16)  # fmt: skip
    DeepseekV32Config(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        DeepseekV32Config.from_dict({**small, key: bad})


def write_deepseek_v32_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's DeepseekV32Model converter (--outtype f32) makes of transformers' DeepSeek-V3.2 `hf`:
    DeepseekV2Model's (test_family_deepseek_v3's mimic) as "deepseek32", the indexer's keys added, its tensors by
    gguf-py's names (GLM-5's map: this gguf-py has no DEEPSEEK32; the names are the same)."""
    from test_family_deepseek_v3 import write_deepseek_v3_gguf

    def indexer(w, c) -> None:
        w.add_indexer_head_count(c["index_n_heads"])
        w.add_indexer_key_length(c["index_head_dim"])
        w.add_indexer_top_k(c["index_topk"])

    write_deepseek_v3_gguf(hf, path, "deepseek32", "GLM_DSA", indexer)


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file (the indexer's tensors blk.N.indexer.*) loads as DeepseekV32ForCausalLM with
    transformers' logits over a prompt longer than index_topk."""
    from gguf.gguf_reader import GGUFReader

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_deepseek_v32_gguf(hf, str(tmp_path / "model.gguf"))
    names = {t.name for t in GGUFReader(str(tmp_path / "model.gguf")).tensors}
    assert {
        "blk.0.indexer.attn_q_b.weight",
        "blk.0.indexer.k_norm.bias",
        "blk.2.indexer.proj.weight",
    } <= names
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "DeepseekV32ForCausalLM" and model.config.index_topk == 4
    ids, mask = padded_batch()
    assert mask.sum(-1).max() > 4
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("field", ["index_head_dim", "mlp_layer_types"])
def test_gguf_out_refused(tmp_path_factory, tmp_path, field):
    """What llama.cpp's deepseek32 cannot run is refused, naming the field, and no file: an indexer head llama.cpp
    has no Hadamard rotation of (16: it aborts), a dense layer after a mixture (its dense layers are leading)."""
    import os

    from test_family_phi import _byte_tokenizer

    from autolm.gguf_writer import save_gguf

    family = DS32 if field == "index_head_dim" else GGUF_FAMILY
    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    if field == "mlp_layer_types":
        model.config.mlp_layer_types = ["sparse", "dense", "sparse"]
    tok = _byte_tokenizer(tmp_path / "tokenizer")
    with pytest.raises(autolm.ConfigError, match=field):
        save_gguf(model, tok, str(tmp_path / "m.gguf"), "f32")
    assert not os.path.exists(tmp_path / "m.gguf")
