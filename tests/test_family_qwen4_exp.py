"""Qwen4-Exp (text) against transformers and peft: Qwen 3.5 MoE's hybrid layers with residual streams and gated
residuals (hc_count 2 and 3), the QSA indexer on the attention layers (prompts longer than its budget: keys are
dropped), per-layer n-gram embeddings on two linear layers (EOS inside the prompts), and the DeltaNet's sigmoid
output gate; the recurrent battery (the indexer's keys kept in the cache), the one-token step, LoRA, quantization,
the sharded n-gram tables in the saved files, the image-text checkpoint's language model, and config errors.
(No compiled-step test: the compiled one-token graphs do not serve families with recurrent layers; no GGUF.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, positions, randomize
from family_checks import Family

import autolm
from autolm.errors import ConfigError

SIZES = dict(
    hidden_size=32,
    num_hidden_layers=3,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5,
                     "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    hc_count=2,
    hc_lowrank=8,
    ple_layer_ids=[1, 3],
    ple_embed_dim=16,
    heads_per_ngram=2,
    ngram_vocab_size_base=50,
    make_ngram_vocab_size_divisible_by=8,
    split_ngram_parts=4,
    indexer_n_heads=2,
    indexer_kv_heads=1,
    indexer_head_dim=16,
    indexer_budget=4,
    indexer_compress_ratio=2,
)  # fmt: skip
LORA = ["q_proj", "v_proj", "in_proj_qkv", "out_proj", "index_qk_proj", "key_proj", "input_mix_weight_up"]
Q4 = Family("Qwen4ExpTextConfig", SIZES, lora_targets=LORA)
# three streams, 4-grams of one head each, blocks of 3 (budget 3), attention every 2nd layer, a sigmoid output gate,
# RoPE on every dimension (no partial_rotary_factor: transformers' Qwen4-Exp default, not Qwen 3.5's 0.25)
OTHER = Family("Qwen4ExpTextConfig", dict(SIZES, layer_types=None, full_attention_interval=2, num_hidden_layers=4,
                                          hc_count=3, ngram_size=4, heads_per_ngram=1, ple_embed_dim=12,
                                          output_gate_type="sigmoid", indexer_budget=3, indexer_compress_ratio=3,
                                          attention_bias=True, split_ngram_parts=2,
                                          rope_parameters={"rope_type": "default", "rope_theta": 100.0}))  # fmt: skip

# no per-layer embeddings (transformers keeps one conv state per layer then)
NO_PLE = Family("Qwen4ExpTextConfig", dict(SIZES, ple_layer_ids=[]))


def _with_eos(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch whose prompts hold EOS (id 2) inside: the n-grams start again after it."""
    ids, mask = padded_batch(seed, lengths=(17, 12, 6))
    ids[0, 4], ids[0, 9], ids[1, 8], ids[2, 15] = 2, 2, 2, 2
    return ids, mask


@pytest.mark.parametrize("family", [Q4, OTHER, NO_PLE], ids=["q4", "other", "no_ple"])
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = _with_eos()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)


def test_inputs_embeds(tmp_path_factory):
    """inputs_embeds without input_ids: the per-layer embeddings find the token ids (transformers'
    reverse_embedding); other vectors are refused by name."""
    from autolm.errors import GenerationError

    directory, hf = Q4.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = _with_eos()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        ours = model(inputs_embeds=embeds, attention_mask=mask).logits
        torch.testing.assert_close(ours, model(ids, attention_mask=mask).logits)
        theirs = hf(inputs_embeds=hf.get_input_embeddings()(ids), attention_mask=mask).logits
        torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
        with pytest.raises(GenerationError, match="token id"):
            model(inputs_embeds=embeds + 1e-3)


def test_indexer_drops_keys(tmp_path_factory):
    """On a 17-token prompt the indexer keeps 2 blocks of 2 and the incomplete tail: later queries see at most 5
    keys; with the mask of plain causal attention instead, the logits are not transformers' (the test above
    compares them where keys are dropped)."""
    directory, _ = Q4.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    masks = []
    indexer = model.model.layers[1].self_attn.indexer
    handle = indexer.register_forward_hook(lambda m, args, out: masks.append(out))
    ids, mask = _with_eos()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
    handle.remove()
    seen = masks[0].sum(-1)[0, 0]  # row 0 (17 real tokens): keys each query sees
    assert seen.max() == 5 and seen[-1] == 5 and seen[3] == 4
    indexer.select = lambda q, blocks, real, slots: torch.ones(*real.shape[:1], 1, len(slots), real.shape[1],
                                                               dtype=torch.bool).tril(real.shape[1] - len(slots))  # fmt: skip
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    assert not torch.allclose(full[0, -1], ours[0, -1], atol=1e-3)


def test_generate(tmp_path_factory):
    Q4.check_generate(tmp_path_factory)


def test_generate_other(tmp_path_factory):
    OTHER.check_generate(tmp_path_factory)


def test_generate_past_a_chunk(tmp_path_factory):
    """40 new tokens after a 30-token prompt: transformers' tokens; the decoded logits (the indexer over the
    cached keys) equal those of the whole sequence in one forward."""
    Q4.check_long_generation(tmp_path_factory, new=40, exact_length=True, whole_atol=1e-3)


def test_pieces(tmp_path_factory):
    """70 tokens in pieces through the cache (the indexer's keys and RoPE tables, the n-gram ids and the PLE
    conv's inputs kept there) give one forward's logits and transformers'."""
    cache = Q4.check_pieces(tmp_path_factory)
    assert ("ple", 0) in cache.states and ("ple", 2) in cache.states
    assert cache.keys[3].shape[-1] == 16 + 2 * 8  # layer 1's indexer: raw keys, cos and sin


def test_recurrent(tmp_path_factory, tmp_path):
    Q4.check_recurrent(tmp_path_factory, tmp_path)


def test_one_token_step(tmp_path_factory):
    Q4.check_one_token_step(tmp_path_factory)


def test_bf16(tmp_path_factory):
    Q4.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    Q4.check_lora(tmp_path_factory, tmp_path)


# for the quantization checks: the indexer keeping every key of these prompts and every expert used, so that bf16's
# rounding (which the int8 kernel applies to the activations) flips no discrete choice of this random model (on
# Q4 it flips the indexer's and routers' choices: 6% of the logits in bf16 alone, transformers' bf16 as much)
SMOOTH = Family("Qwen4ExpTextConfig", dict(SIZES, indexer_budget=16, num_experts_per_tok=4))


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    SMOOTH.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    Q4.check_disk_offload(tmp_path_factory, tmp_path)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the files' tensors are transformers' (per-expert tensors, the n-gram
    tables in split_ngram_parts shards); only transformers' config keys."""
    from safetensors import safe_open

    Q4.check_save(tmp_path_factory, tmp_path)
    directory, hf = Q4.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        name = "model.layers.2.ple.ple_embedding.ngram_embedding.shard_3.weight"
        assert torch.equal(ours.get_tensor(name), theirs.get_tensor(name))
    keys = [set(json.load(open(f"{d}/config.json"))) for d in (directory, tmp_path / "saved")]
    assert keys[1] - {"transformers_version"} == keys[0] - {"transformers_version"}


def test_image_text_checkpoint(tmp_path):
    """model_type qwen4_exp: the language model of Qwen4ExpForConditionalGeneration, the vision tower skipped;
    saved as the text model transformers' Qwen4ExpForCausalLM loads."""
    import transformers

    text = dict(SIZES, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                  num_position_embeddings=16)  # fmt: skip
    config = transformers.Qwen4ExpConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    hf = transformers.Qwen4ExpForConditionalGeneration(config)
    randomize(hf)
    hf.save_pretrained(tmp_path / "it")
    hf.eval()
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "it")
    assert type(model).__name__ == "Qwen4ExpForCausalLM"
    ids, mask = _with_eos()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(
            ours, hf(input_ids=ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4
        )
        model.save_pretrained(tmp_path / "text")
        text_model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "text", attn_implementation="eager"
        )
        assert type(text_model).__name__ == "Qwen4ExpForCausalLM"
        theirs = text_model(input_ids=ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_config_defaults_are_transformers():
    from family_checks import check_config_defaults

    from autolm.models.qwen4_exp import Qwen4ExpTextConfig

    check_config_defaults(Qwen4ExpTextConfig)
    assert Qwen4ExpTextConfig().layer_types[3] == "indexed_attention"


def test_config_json_round_trip(tmp_path_factory):
    """config.json as transformers wrote it reads back and writes the same keys and values."""
    from autolm.models.qwen4_exp import Qwen4ExpTextConfig

    directory, _ = Q4.checkpoint(tmp_path_factory)
    written = json.load(open(f"{directory}/config.json"))
    config = Qwen4ExpTextConfig.from_dict(written)
    assert config.layer_types[1] == "indexed_attention" and config.ple_layer_ids == [1, 3]
    out = config.to_dict()
    for key in ("layer_types", "ple_layer_ids", "indexer_budget", "hc_count", "number_of_conv_states"):
        assert out[key] == written[key], key


def test_config_errors_name_the_key():
    from autolm.models.qwen4_exp import Qwen4ExpConfig, Qwen4ExpTextConfig

    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16, eos_token_id=2,
                 layer_types=["linear_attention", "indexed_attention"], indexer_n_heads=2, indexer_kv_heads=1,
                 indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2)  # fmt: skip
    cases = {
        "layer_types": dict(layer_types=["linear_attention", "sliding_attention"]),
        "output_gate_type": dict(output_gate_type="gelu"),
        "hc_count": dict(hc_count=1),
        "indexer_budget": dict(indexer_budget=None),
        "indexer_kv_heads": dict(indexer_kv_heads=2),
        "indexer_compress_ratio": dict(indexer_budget=5),
        "indexer_head_dim": dict(indexer_head_dim=2),
        "ple_layer_ids": dict(ple_layer_ids=[3]),
        "ple_embed_dim": dict(ple_layer_ids=[1], ple_embed_dim=10),
        "eos_token_id": dict(ple_layer_ids=[1], eos_token_id=None),
        "num_experts_per_tok": dict(num_experts=2, num_experts_per_tok=3),
    }
    for key, kwargs in cases.items():
        with pytest.raises(ConfigError, match=key):
            Qwen4ExpTextConfig.from_dict({**small, **kwargs})
    with pytest.raises(ConfigError, match="linear_attention"):
        Qwen4ExpTextConfig.from_dict({**small, "ple_layer_ids": [2]})
    with pytest.raises(ConfigError, match="text_config"):
        Qwen4ExpConfig.from_dict({"text_config": None})
    # no QSA settings at all: a config transformers reads too, but no model with attention layers
    bare = Qwen4ExpTextConfig.from_dict({k: v for k, v in small.items() if not k.startswith("indexer")})
    with pytest.raises(ConfigError, match="indexer_budget"):
        autolm.AutoModelForCausalLM.from_config(bare)
