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
indexed layers (they read a second cache layer)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import padded_batch, positions
from test_family_deepseek_v32 import check_padded_step
from test_family_minimax_m2 import RoutedFamily

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
