"""LFM2 against transformers: short-convolution layers (with conv_bias, so in_proj, the depthwise conv and
out_proj all carry biases) around an attention layer with per-head q/k norms and GQA; the feed-forward width
adjusted by block_auto_adjust_ff_dim with a multiplier and block_multiple_of; the checkpoint as transformers writes
it; the standard battery, the recurrent checks (state through the cache in pieces, the serving engine) and a long
greedy generation (a 30-token prompt, 40 new tokens) against transformers'; the CLI with LFM2's chat template."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB
from family_checks import Family

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    block_multiple_of=16,
    block_ffn_dim_multiplier=1.5,
    layer_types=["conv", "full_attention", "conv"],
)
TARGETS = ["q_proj", "v_proj", "in_proj", "out_proj", "w1", "w2", "w3"]  # peft has no default for lfm2
LFM2 = Family("Lfm2Config", dict(SIZES, conv_bias=True), lora_targets=TARGETS)
# attention layers given by full_attn_idxs (no layer_types), no biases, a 4-tap convolution, no adjustment of
# the feed-forward width, an untied head
IDXS = Family(
    "Lfm2Config",
    dict(
        SIZES,
        layer_types=None,
        full_attn_idxs=[0, 2],
        conv_L_cache=4,
        block_auto_adjust_ff_dim=False,
        tie_word_embeddings=False,
    ),
    lora_targets=TARGETS,
)


def test_logits(tmp_path_factory):
    LFM2.check_logits(tmp_path_factory)
    IDXS.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    LFM2.check_generate(tmp_path_factory)


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 40 new tokens, each new token one step of the convolution from its state: transformers'
    greedy tokens (both checkpoints)."""
    for fam in (LFM2, IDXS):
        directory, hf = fam.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(7))
        ours = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        theirs = hf.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert torch.equal(ours, theirs)


def test_recurrent(tmp_path_factory, tmp_path):
    """Without conv_bias: with it, padding's inputs are zeroed before in_proj, whose bias then reaches the
    convolution (as in transformers), so a left-padded row's state is not its unpadded one."""
    IDXS.check_recurrent(tmp_path_factory, tmp_path)


def test_bf16(tmp_path_factory):
    LFM2.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    LFM2.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    LFM2.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names (the conv weight (h, 1, L)) in the state dict and the saved file; only transformers' config
    keys in the saved config."""
    from safetensors import safe_open

    for fam, out in ((LFM2, tmp_path / "a"), (IDXS, tmp_path / "b")):
        fam.check_save(tmp_path_factory, out)
        directory, hf = fam.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert type(model).__name__ == "Lfm2ForCausalLM"
        ours, theirs = model.state_dict(), hf.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(ours[k].shape == theirs[k].shape for k in ours)
        with (
            safe_open(f"{directory}/model.safetensors", "pt") as a,
            safe_open(out / "saved" / "model.safetensors", "pt") as b,
        ):
            assert set(a.keys()) == set(b.keys())
        keys = [set(json.load(open(f"{d}/config.json"))) for d in (directory, out / "saved")]
        assert keys[1] - {"transformers_version"} == keys[0] - {"transformers_version"}
    model = autolm.AutoModelForCausalLM.from_pretrained(LFM2.checkpoint(tmp_path_factory)[0])
    assert model.model.layers[0].conv.conv.weight.shape == (64, 1, 3)
    assert model.model.layers[0].feed_forward.w1.weight.shape == (96, 64)


def test_disk_offload(tmp_path_factory, tmp_path):
    LFM2.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    """LFM2's ChatML chat template (with its <|startoftext|> BOS)."""
    long = Family(LFM2.config_cls, dict(LFM2.kwargs, max_position_embeddings=2048), lora_targets=TARGETS)
    check_cli(long, "lfm2.jinja", tmp_path_factory, tmp_path, "Lfm2ForCausalLM (lfm2)")


def test_config_reads_the_original_names(tmp_path):
    """block_ff_dim, tie_embedding and norm_eps as transformers reads them; RoPE base 1e6 where none is given;
    layer_types from full_attn_idxs (all layers attention by default)."""
    from autolm.models.lfm2 import Lfm2Config

    d = {"block_ff_dim": 300, "tie_embedding": False, "norm_eps": 1e-6, "num_hidden_layers": 3,
         "full_attn_idxs": [2], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    c = Lfm2Config.from_dict(d)
    assert (c.intermediate_size, c.tie_word_embeddings, c.rms_norm_eps, c.norm_eps) == (
        300,
        False,
        1e-6,
        1e-6,
    )
    assert c.layer_types == ["conv", "conv", "full_attention"]
    assert c.rope_theta == 1e6
    out = c.to_dict()
    assert "block_ff_dim" not in out and out["norm_eps"] == 1e-6 and "rms_norm_eps" not in out
    assert Lfm2Config(num_hidden_layers=2).layer_types == ["full_attention"] * 2
    assert Lfm2Config(intermediate_size=300, block_multiple_of=16).ff_dim == 208  # 200 rounded up to 16s


def test_config_errors_name_the_key():
    from autolm.models.lfm2 import Lfm2Config

    with pytest.raises(autolm.ConfigError, match="layer_types"):
        Lfm2Config(num_hidden_layers=2, layer_types=["conv", "sliding_attention"])
    with pytest.raises(autolm.ConfigError, match="layer_types"):
        Lfm2Config(num_hidden_layers=2, layer_types=["conv"])
    with pytest.raises(autolm.ConfigError, match="full_attn_idxs"):
        Lfm2Config(num_hidden_layers=2, full_attn_idxs="0")
    with pytest.raises(autolm.ConfigError, match="conv_L_cache"):
        Lfm2Config(conv_L_cache=0)
    with pytest.raises(autolm.ConfigError, match="conv_bias"):
        Lfm2Config(conv_bias="no")
    with pytest.raises(autolm.ConfigError, match="block_multiple_of"):
        Lfm2Config(block_multiple_of=1.5)
    with pytest.raises(autolm.ConfigError, match="block_ffn_dim_multiplier"):
        Lfm2Config(block_ffn_dim_multiplier=-1)
    with pytest.raises(autolm.ConfigError, match="intermediate_size"):
        Lfm2Config(intermediate_size=1, block_ffn_dim_multiplier=None)
