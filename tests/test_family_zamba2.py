"""Zamba2 against transformers (its Mamba-2 torch fallback): Mamba-2 layers and hybrid layers (a shared transformer
block on the layer's input and the embeddings, its output through `linear` into the Mamba layer's input) in the
pattern mamba, hybrid, mamba, hybrid, hybrid, mamba; two shared blocks used in turn (the third hybrid layer uses the
first block again: tied parameters, its own adapters), LoRA-like adapters on q/k/v and on the MLP, RoPE in the shared
attention, 2 groups of B/C and chunks of 8 tokens; a variant with one shared block, no attention adapters, no RoPE,
GQA, biases (add_bias_linear: in_proj's bias at left padding enters the conv's window, in transformers too, so not
with the recurrent checks), SiLU, a hybrid first layer and an untied head (transformers 5 then ties no shared
block: each use has its own, in the file). The battery for recurrent families
(generate, the one-token step, pieces through the cache, the server), LoRA against peft (each use of a shared block
adapted on its own, as peft does), int8/int4, saving (each block once, as transformers writes it), disk offload, the
CLI, config defaults, transformers 4's spelling of the released configs and config errors. llama.cpp has no Zamba2
architecture: no GGUF."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults

import autolm

SIZES = dict(
    hidden_size=32,
    intermediate_size=24,
    num_attention_heads=4,
    max_position_embeddings=128,
    mamba_d_state=8,
    n_mamba_heads=8,
    chunk_size=8,
)
ZAMBA2 = Family(
    "Zamba2Config",
    dict(
        SIZES,
        num_hidden_layers=6,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"],
        mamba_ngroups=2,
        num_mem_blocks=2,
        use_shared_attention_adapter=True,
        adapter_rank=4,
        use_mem_rope=True,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    ),
    # peft has no default for zamba2: the shared attention and MLP (each use its own adapter), the mixers, `linear`
    lora_targets=["q_proj", "v_proj", "in_proj", "out_proj", "gate_up_proj", "linear"],
)
PLAIN = Family(
    "Zamba2Config",
    dict(
        SIZES,
        num_hidden_layers=4,
        layers_block_type=["hybrid", "mamba", "hybrid", "mamba"],
        num_key_value_heads=2,
        n_mamba_heads=4,
        tie_word_embeddings=False,
        hidden_act="silu",
        add_bias_linear=True,
    ),
)
ALL = pytest.mark.parametrize("family", [ZAMBA2, PLAIN], ids=["zamba2", "plain"])


@ALL
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


@ALL
def test_generate(tmp_path_factory, family):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    ZAMBA2.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    """The eager one-token step (the Mamba-2 recurrence, the shared blocks' attention steps) gives the general
    forward's tokens and logits."""
    ZAMBA2.check_one_token_step(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    """The recurrent battery, the compiled step's graphs (check_compiled_step) included: the hybrid layers take
    the embeddings as one more graph input (compilable, so the check runs the graphs, not the eager step)."""
    from autolm import step

    directory, _ = ZAMBA2.checkpoint(tmp_path_factory)
    assert step.compilable(autolm.AutoModelForCausalLM.from_pretrained(directory))
    ZAMBA2.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the chunked prefill, the shared blocks'
    keys and values growing in the cache): transformers' greedy tokens."""
    ZAMBA2.check_long_generation(tmp_path_factory)


def test_pieces_across_chunks_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces through the cache give the logits of one forward, and transformers'; every layer keeps
    its Mamba-2 state, the hybrid layers their own keys and values (two layers using one block: two caches)."""
    cache = ZAMBA2.check_pieces(tmp_path_factory)
    assert set(cache.states) == set(range(6))
    conv, ssm = cache.states[1]
    assert conv.shape == (2, 64 + 2 * 2 * 8, 3) and ssm.shape == (2, 8, 8, 8) and ssm.dtype == torch.float32
    shapes = [tuple(k.shape) for k in cache.keys]
    assert all(shapes[i][1:2] + shapes[i][3:] == (4, 16) for i in (1, 3, 4))  # 4 heads of 2 * 32 / 4
    assert all(shapes[i][3] == 0 for i in (0, 2, 5))
    assert not torch.equal(cache.keys[1][..., :70, :], cache.keys[4][..., :70, :])


def test_shared_blocks_are_tied(tmp_path_factory):
    """The third hybrid layer (layer 4) holds the first block's parameters (layer 1's), adapters included, and its
    own place among them; the load report says so; changing a shared weight changes both uses."""
    directory, _ = ZAMBA2.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.shared_uses() == [(4, 1)]
    first, third = (model.model.layers[i].shared_transformer for i in (1, 4))
    second = model.model.layers[3].shared_transformer
    for (name, a), (_, b) in zip(first.named_parameters(), third.named_parameters(), strict=True):
        assert a is b, name
    assert second.self_attn.q_proj.weight is not first.self_attn.q_proj.weight
    assert (first.self_attn.use, second.self_attn.use, third.self_attn.use) == (0, 1, 2)
    assert isinstance(second.feed_forward.gate_up_proj_adapter_list[0], torch.nn.Identity)
    assert "tied to their first use" in " ".join(model.load_report.notes)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        first.feed_forward.gate_up_proj_adapter_list[2][1].weight.mul_(2.0)  # the third use's adapter only
        after = model(ids, attention_mask=mask).logits
    assert not torch.allclose(before, after)
    assert (
        third.feed_forward.gate_up_proj_adapter_list[2][1].weight
        is first.feed_forward.gate_up_proj_adapter_list[2][1].weight
    )


def test_untied_head_blocks_of_their_own(tmp_path_factory, tmp_path):
    """With an untied head the file holds each use's block (transformers 5 ties none); one the file lacks is tied to
    its first use: the logits are those of transformers' model with that block made the first's."""
    import copy

    from safetensors.torch import load_file, save_file

    directory, hf = PLAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    first, later = (model.model.layers[i].shared_transformer for i in (0, 2))
    assert not torch.equal(first.self_attn.q_proj.weight, later.self_attn.q_proj.weight)
    shutil.copytree(directory, tmp_path / "cut")
    tensors = load_file(f"{directory}/model.safetensors")
    cut = {k: v for k, v in tensors.items() if not k.startswith("model.layers.2.shared_transformer.")}
    assert len(cut) < len(tensors)
    save_file(cut, str(tmp_path / "cut" / "model.safetensors"), metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "cut")
    assert model.model.layers[2].shared_transformer.self_attn.q_proj.weight is (
        model.model.layers[0].shared_transformer.self_attn.q_proj.weight
    )
    assert "tied to their first use" in " ".join(model.load_report.notes)
    want = copy.deepcopy(hf)
    with torch.no_grad():
        for a, b in zip(want.model.layers[0].shared_transformer.parameters(),
                        want.model.layers[2].shared_transformer.parameters(), strict=True):  # fmt: skip
            b.copy_(a)
        ids, mask = padded_batch()
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = want(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_lora(tmp_path_factory, tmp_path):
    ZAMBA2.check_lora(tmp_path_factory, tmp_path)


def test_merged_lora_unties_the_shared_blocks(tmp_path_factory, tmp_path):
    """Merging adapters on the shared blocks gives each use its own weights (the two uses of the first block took
    different adapters): the merged model's logits are the adapted model's, and so are those of its saved files in
    transformers (untied head and blocks) and back in autolm."""
    import transformers
    from family_checks import _randomize_lora

    directory, _ = ZAMBA2.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    pm = autolm.get_peft_model(
        model, autolm.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_up_proj"])
    )
    _randomize_lora(pm)
    ids, mask = padded_batch(seed=5)
    real = mask.bool()
    with torch.no_grad():
        want = pm(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        merged = pm.merge_and_unload()
        assert merged.model.layers[4].shared_transformer.self_attn.q_proj.weight is not (
            merged.model.layers[1].shared_transformer.self_attn.q_proj.weight
        )
        assert merged.config.tie_word_embeddings is False
        torch.testing.assert_close(merged(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
        merged.save_pretrained(tmp_path / "merged")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "merged", attn_implementation="eager"
        )
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        ours = back(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(theirs, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    ZAMBA2.check_quantized(tmp_path_factory, bits)


@ALL
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names and shapes, the checkpoint's tensor names (each shared block once, under its first user)
    and config.json's keys and values (the derived ones transformers writes) in what autolm saves."""
    _, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "head_dim" not in config and config["attention_head_dim"] == 16
    if family is ZAMBA2:
        assert "model.layers.3.shared_transformer.self_attn.q_proj.weight" in saved
        assert not any(k.startswith("model.layers.4.shared_transformer.") for k in saved)
        assert "model.layers.4.linear.weight" in saved
        assert config["hybrid_layer_ids"] == [1, 3, 4]


def test_disk_offload(tmp_path_factory, tmp_path):
    ZAMBA2.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    check_cli_without_template(PLAIN, tmp_path_factory, tmp_path, "Zamba2ForCausalLM (zamba2)")


def test_config_defaults():
    """Every default autolm writes is transformers' (Zamba2-2.7B's 54-layer pattern, the MLP 4 * hidden_size)."""
    import transformers

    from autolm.models.zamba2 import Zamba2Config

    check_config_defaults(Zamba2Config)
    ours, theirs = Zamba2Config(), transformers.Zamba2Config()
    assert ours.hybrid_layer_ids == theirs.hybrid_layer_ids
    assert (
        (ours.head_dim, ours.mamba_headdim) == (theirs.attention_head_dim, theirs.mamba_headdim) == (160, 640)
    )
    assert Zamba2Config(use_long_context=True).max_position_embeddings == 16384


def test_released_config_spelling(tmp_path_factory, tmp_path):
    """A config.json as Zyphra's releases spell it (transformers 4: "mamba" layers, rope_theta at the top, none of
    the derived keys) loads with transformers 5's logits and is written back as read."""
    import transformers

    directory, _ = PLAIN.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "v4")
    path = tmp_path / "v4" / "config.json"
    config = json.loads(path.read_text())
    for key in (
        "attention_hidden_size",
        "attention_head_dim",
        "kv_channels",
        "num_query_groups",
        "hybrid_layer_ids",
    ):
        config.pop(key)
    config.update(rope_theta=config.pop("rope_parameters")["rope_theta"], rope_scaling=None)
    config["layers_block_type"] = ["hybrid", "mamba", "hybrid", "mamba"]
    path.write_text(json.dumps(config))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "v4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v4", attn_implementation="eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    model.config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == config


@pytest.mark.parametrize(
    "key, value",
    [
        ("layers_block_type", ["mamba", "attention"]),
        ("layers_block_type", ["mamba"]),
        ("n_mamba_heads", 5),
        ("mamba_ngroups", 3),
        ("chunk_size", 0),
        ("num_mem_blocks", 0),
        ("adapter_rank", "big"),
        ("time_step_min", -0.1),
        ("use_mem_rope", "yes"),
        ("add_bias_linear", 1),
        ("num_attention_heads", 3),
        ("use_shared_attention_adapter", True),  # with 2 KV heads of 4
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.zamba2 import Zamba2Config

    base = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, n_mamba_heads=4,
                layers_block_type=["mamba", "hybrid"])  # fmt: skip
    with pytest.raises(autolm.ConfigError, match=key):
        Zamba2Config.from_dict({**base, key: value})
