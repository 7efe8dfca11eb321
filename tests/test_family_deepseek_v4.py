"""DeepSeek-V4 (deepseek_v4) against transformers and peft: the shared-KV sliding attention with sinks and the grouped
output projection on every layer; the HCA layers' compressed entries and the CSA layers' overlapping entries with the
lightning indexer's selection; hyper-connections with the Sinkhorn mixing; hash-routed and top-k routed clamped
experts. Two checkpoints with both routers: BASE (HCA, CSA, sliding, CSA; 2 streams; index_topk 2 under 3 entries, so
the indexer chooses) and VARIANT (CSA, HCA, CSA; 3 streams, sigmoid scoring, YaRN on the compressed RoPE, half the
head turned, a tight swiglu_limit, 4 output groups, a tied head, HCA windows of 4). The router tables (tid2eid,
correction biases) are random. The battery (logits over a padded batch, generate with beams, bf16, the eager one-token
step with the compressors' projections in the cache, LoRA vs peft, quantized, save with DeepSeek's names, the released
names, disk offload, config.json), transformers' config defaults and legacy keys, the config's checks. No compiled
step (as DeepSeek-V3.2: its graphs do not serve a layer reading a second cache layer); no GGUF yet (llama.cpp's
deepseek4)."""

from __future__ import annotations

import json

import family_checks
import pytest
import torch
from conftest import padded_batch, positions, randomize
from family_checks import Family, check_config_defaults

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
