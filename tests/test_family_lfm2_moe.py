"""LFM2-MoE against transformers: LFM2's short-convolution layers around an attention layer, a dense first layer,
then mixtures of 4 experts of which each token uses 2, chosen by sigmoid scores plus a random expert_bias,
renormalised (norm_topk_prob) and scaled (routed_scaling_factor); a second checkpoint without the expert bias or
the renormalisation, with conv_bias. The checkpoint as transformers writes it (one w1/w3/w2 tensor per expert); the
standard battery, the recurrent checks and a long greedy generation; the CLI with LFM2's chat template."""

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
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_dense_layers=1,
    num_experts=4,
    num_experts_per_tok=2,
    layer_types=["conv", "full_attention", "conv"],
)
TARGETS = ["q_proj", "v_proj", "in_proj", "out_proj", "w1", "w2", "w3"]  # peft has no default for lfm2_moe


class BiasedFamily(Family):
    """A checkpoint whose expert_bias buffers (zeros as transformers makes them) are random too."""

    def checkpoint(self, tmp_path_factory, dtype=None):
        directory, hf = super().checkpoint(tmp_path_factory, dtype)
        if not getattr(hf, "_biased", False):
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, b in hf.named_buffers():
                    if name.endswith("expert_bias"):
                        b.copy_(torch.randn(b.shape, generator=g) * 0.3)
            hf.save_pretrained(directory)
            hf._biased = True
        return directory, hf


MOE = BiasedFamily("Lfm2MoeConfig", dict(SIZES, routed_scaling_factor=1.5), lora_targets=TARGETS)
# conv_bias: padding's inputs are zeroed before in_proj, whose bias then reaches the convolution (as in
# transformers): a left-padded row's state is not its unpadded one, so the recurrent checks use MOE
PLAIN = Family(
    "Lfm2MoeConfig",
    dict(SIZES, use_expert_bias=False, norm_topk_prob=False, conv_bias=True),
    lora_targets=TARGETS,
)


def test_logits(tmp_path_factory):
    MOE.check_logits(tmp_path_factory)
    PLAIN.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    MOE.check_generate(tmp_path_factory)


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 40 new tokens: transformers' greedy tokens."""
    directory, hf = MOE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(7))
    ours = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    theirs = hf.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert torch.equal(ours, theirs)


def test_recurrent(tmp_path_factory, tmp_path):
    MOE.check_recurrent(tmp_path_factory, tmp_path)


def test_bf16(tmp_path_factory):
    MOE.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    MOE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MOE.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict (expert_bias included); the checkpoint's per-expert tensors and only
    transformers' config keys in the files autolm saves."""
    from safetensors import safe_open

    MOE.check_save(tmp_path_factory, tmp_path)
    directory, hf = MOE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "Lfm2MoeForCausalLM"
    assert model.state_dict().keys() == hf.state_dict().keys()
    bias = model.model.layers[1].feed_forward.expert_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, hf.model.layers[1].feed_forward.expert_bias)
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        assert "model.layers.1.feed_forward.experts.3.w3.weight" in set(ours.keys())
    keys = [set(json.load(open(f"{d}/config.json"))) for d in (directory, tmp_path / "saved")]
    assert keys[1] - {"transformers_version"} == keys[0] - {"transformers_version"}


def test_disk_offload(tmp_path_factory, tmp_path):
    MOE.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    """LFM2-8B-A1B ships LFM2's ChatML chat template."""
    long = Family(MOE.config_cls, dict(MOE.kwargs, max_position_embeddings=2048), lora_targets=TARGETS)
    check_cli(long, "lfm2.jinja", tmp_path_factory, tmp_path, "Lfm2MoeForCausalLM (lfm2_moe)")


def test_config_errors_name_the_key():
    from autolm.models.lfm2_moe import Lfm2MoeConfig

    assert Lfm2MoeConfig(num_hidden_layers=2).layer_types == ["full_attention"] * 2
    assert Lfm2MoeConfig(intermediate_size=300).ff_dim == 300  # no 2/3 adjustment
    with pytest.raises(autolm.ConfigError, match="num_experts_per_tok"):
        Lfm2MoeConfig(num_experts=4, num_experts_per_tok=5)
    with pytest.raises(autolm.ConfigError, match="moe_intermediate_size"):
        Lfm2MoeConfig(moe_intermediate_size=0)
    with pytest.raises(autolm.ConfigError, match="num_dense_layers"):
        Lfm2MoeConfig(num_dense_layers=-1)
    with pytest.raises(autolm.ConfigError, match="routed_scaling_factor"):
        Lfm2MoeConfig(routed_scaling_factor="2")
    with pytest.raises(autolm.ConfigError, match="use_expert_bias"):
        Lfm2MoeConfig(use_expert_bias=1)
    with pytest.raises(autolm.ConfigError, match="layer_types"):
        Lfm2MoeConfig(num_hidden_layers=2, layer_types=["conv", "linear_attention"])
