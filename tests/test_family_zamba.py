"""Zamba against transformers (its multi-head Mamba-1 torch fallback): multi-head Mamba-1 layers and hybrid layers
(the one shared transformer block on the layer's input and the embeddings, its output through `linear` into the
Mamba layer's input). ZAMBA: the layer pattern from attn_layer_period / attn_layer_offset (hybrid layers 2 and 4),
mamba_dt_rank "auto", 4 Mamba heads, GQA in the shared attention, a tied head (the shared block's later use tied to
its first). PLAIN: layers_block_type as transformers 4 wrote it ("mamba"), a hybrid first layer, in_proj and
out_proj biases (mamba_proj_bias: in_proj's bias at left padding enters the conv's window, in transformers too, so
not with the recurrent checks), no conv bias, a GELU mixer (hidden_mamba_act), a SiLU MLP, an explicit dt rank,
mamba_expand 3 in 2 heads, an untied head (transformers 5 then ties no use: each has its own block, in the file).
The battery for recurrent families (generate, the one-token step, pieces through the cache, the server), LoRA
against peft, int8/int4, saving (the shared block once), disk offload, config defaults and errors. llama.cpp has no Zamba
architecture: no GGUF."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults

import autolm

SIZES = dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, max_position_embeddings=128,
             mamba_d_state=8)  # fmt: skip
ZAMBA = Family(
    "ZambaConfig",
    dict(
        SIZES,
        num_hidden_layers=6,
        attn_layer_period=2,
        attn_layer_offset=1,
        num_key_value_heads=2,
        n_mamba_heads=4,
    ),
    # peft has no default for zamba: the shared attention and MLP, the mixers' projections, `linear`
    lora_targets=["q_proj", "v_proj", "in_proj", "out_proj", "gate_proj", "linear"],
)
PLAIN = Family(
    "ZambaConfig",
    dict(
        SIZES,
        num_hidden_layers=4,
        layers_block_type=["hybrid", "mamba", "hybrid", "mamba"],
        num_key_value_heads=4,
        n_mamba_heads=2,
        mamba_expand=3,
        mamba_dt_rank=3,
        mamba_proj_bias=True,
        mamba_conv_bias=False,
        hidden_mamba_act="gelu",
        hidden_act="silu",
        tie_word_embeddings=False,
    ),
)
ALL = pytest.mark.parametrize("family", [ZAMBA, PLAIN], ids=["zamba", "plain"])


@ALL
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


@ALL
def test_generate(tmp_path_factory, family):
    """Greedy and beam search (the recurrent cache: the scan over the prompt, then the one-token recurrence) give
    transformers' tokens."""
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    ZAMBA.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    """The eager one-token step (the multi-head Mamba-1 recurrence, the shared block's attention steps) gives the
    general forward's tokens and logits."""
    ZAMBA.check_one_token_step(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    """The recurrent battery, the compiled step's graphs (check_compiled_step) included: the hybrid layers take
    the embeddings as one more graph input (compilable, so the check runs the graphs, not the eager step)."""
    from autolm import step

    directory, _ = ZAMBA.checkpoint(tmp_path_factory)
    assert step.compilable(autolm.AutoModelForCausalLM.from_pretrained(directory))
    ZAMBA.check_recurrent(tmp_path_factory, tmp_path)


def test_pieces_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces through the cache give the logits of one forward, and transformers'; every layer keeps
    its conv state (b, I, K-1) and its (b, H, P, N) float32 scan state, the hybrid layers their own keys and values."""
    cache = ZAMBA.check_pieces(tmp_path_factory)
    assert set(cache.states) == set(range(6))
    conv, ssm = cache.states[2]
    assert conv.shape == (2, 64, 3) and ssm.shape == (2, 4, 16, 8) and ssm.dtype == torch.float32
    shapes = [tuple(k.shape) for k in cache.keys]
    assert all(shapes[i][1:2] + shapes[i][3:] == (2, 16) for i in (2, 4))  # 2 KV heads of 2 * 32 / 4
    assert all(shapes[i][3] == 0 for i in (0, 1, 3, 5))
    assert not torch.equal(cache.keys[2][..., :70, :], cache.keys[4][..., :70, :])


def test_shared_block_tied(tmp_path_factory):
    """With a tied head the second hybrid layer (4) holds the first's (2) block, as transformers 5 ties it, and the
    load report says so; with an untied head (PLAIN) each use has its own block, from the file."""
    directory, _ = ZAMBA.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.hybrid_layer_ids == [2, 4] and model.shared_uses() == [(4, 2)]
    first, later = (model.model.layers[i].shared_transf for i in (2, 4))
    for (name, a), (_, b) in zip(first.named_parameters(), later.named_parameters(), strict=True):
        assert a is b, name
    assert "tied to their first use" in " ".join(model.load_report.notes)
    directory, _ = PLAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    first, later = (model.model.layers[i].shared_transf for i in (0, 2))
    assert not torch.equal(first.self_attn.q_proj.weight, later.self_attn.q_proj.weight)


def test_lora(tmp_path_factory, tmp_path):
    ZAMBA.check_lora(tmp_path_factory, tmp_path)


def test_merged_lora_unties_the_shared_block(tmp_path_factory, tmp_path):
    """Merging adapters on the shared block gives each use its own weights (each use took its own adapter): the
    merged model's logits are the adapted model's, and so are those of its saved files in transformers."""
    import transformers
    from family_checks import _randomize_lora

    directory, _ = ZAMBA.checkpoint(tmp_path_factory)
    pm = autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory),
                               autolm.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"]))  # fmt: skip
    _randomize_lora(pm)
    ids, mask = padded_batch(seed=5)
    real = mask.bool()
    with torch.no_grad():
        want = pm(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        merged = pm.merge_and_unload()
        layers = merged.model.layers
        assert layers[4].shared_transf.feed_forward.gate_proj.weight is not (
            layers[2].shared_transf.feed_forward.gate_proj.weight
        )
        assert merged.config.tie_word_embeddings is False
        merged.save_pretrained(tmp_path / "merged")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "merged", attn_implementation="eager"
        )
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(theirs, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    ZAMBA.check_quantized(tmp_path_factory, bits)


@ALL
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names and shapes (x_proj_weight (H, R + 2N, P), ...), the checkpoint's tensor names (the
    shared block once where tied) and config.json's keys and values in what autolm saves; back bit-identical."""
    model, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "head_dim" not in config and "rope_parameters" not in config and config["attention_head_dim"] == 16
    mixer = model.model.layers[1].mamba
    if family is ZAMBA:
        assert config["mamba_dt_rank"] == 2 and mixer.x_proj_weight.shape == (4, 2 + 16, 16)
        assert not any(k.startswith("model.layers.4.shared_transf.") for k in saved)
        assert {
            "model.layers.4.linear.weight",
            "model.layers.2.shared_transf.self_attn.q_proj.weight",
        } <= saved
    else:
        assert config["layers_block_type"] == ["hybrid", "linear_attention", "hybrid", "linear_attention"]
        legacy = ["hybrid", "mamba", "hybrid", "mamba"]  # transformers 4's names: written as read
        written = type(model.config).from_dict({**config, "layers_block_type": legacy}).to_dict()
        assert written["layers_block_type"] == legacy
        assert mixer.dt_proj_weight.shape == (2, 48, 3) and mixer.conv1d.bias is None
        assert "model.layers.2.shared_transf.self_attn.q_proj.weight" in saved


def test_disk_offload(tmp_path_factory, tmp_path):
    ZAMBA.check_disk_offload(tmp_path_factory, tmp_path)


def test_config_defaults():
    """Every default autolm writes is transformers' (Zamba-7B: 76 layers, hybrid from layer 2 every 6th layer)."""
    import transformers

    from autolm.models.zamba import ZambaConfig

    check_config_defaults(ZambaConfig)
    ours, theirs = ZambaConfig(), transformers.ZambaConfig()
    assert ours.layers_block_type == theirs.layers_block_type and len(ours.hybrid_layer_ids) == 13
    assert (ours.head_dim, ours.mamba_dt_rank, ours.attention_hidden_size) == (464, 232, 7424)
    small = dict(num_hidden_layers=9, attn_layer_period=3, attn_layer_offset=0)
    assert ZambaConfig(**small).layers_block_type == transformers.ZambaConfig(**small).layers_block_type


def test_released_config_round_trip(tmp_path_factory, tmp_path):
    """config.json without the derived keys (attention_hidden_size, attention_head_dim) and with mamba_dt_rank
    "auto" loads with transformers' logits; what autolm writes then loads in transformers alike."""
    import transformers

    directory, hf = ZAMBA.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "v")
    path = tmp_path / "v" / "config.json"
    config = json.loads(path.read_text())
    for key in ("attention_hidden_size", "attention_head_dim", "layers_block_type"):
        config.pop(key)
    config["mamba_dt_rank"] = "auto"
    path.write_text(json.dumps(config))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "v")
    assert model.config.layers_block_type == hf.config.layers_block_type
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    model.config.save_pretrained(tmp_path / "w")
    again = transformers.AutoConfig.from_pretrained(tmp_path / "w")
    same = {"transformers_version": 0, "_name_or_path": 0}
    assert again.to_dict() | same == hf.config.to_dict() | same


@pytest.mark.parametrize(
    "key, value",
    [
        ("layers_block_type", ["mamba", "attention"]),
        ("layers_block_type", ["mamba"]),
        ("n_mamba_heads", 5),
        ("mamba_dt_rank", "big"),
        ("mamba_d_state", 0),
        ("attn_layer_period", 0),
        ("attention_hidden_size", 48),
        ("hidden_mamba_act", "swishy"),
        ("mamba_conv_bias", 1),
        ("mamba_proj_bias", "no"),
        ("num_key_value_heads", 3),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.zamba import ZambaConfig

    base = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, n_mamba_heads=4,
                layers_block_type=["mamba", "hybrid"])  # fmt: skip
    with pytest.raises(autolm.ConfigError, match=key):
        ZambaConfig.from_dict({**base, key: value})
