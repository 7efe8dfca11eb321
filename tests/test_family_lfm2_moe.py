"""LFM2-MoE against transformers: LFM2's short-convolution layers around an attention layer, a dense first layer,
then mixtures of 4 experts of which each token uses 2, chosen by sigmoid scores plus a random expert_bias,
renormalised (norm_topk_prob) and scaled (routed_scaling_factor); a second checkpoint without the expert bias or
the renormalisation, with conv_bias. The checkpoint as transformers writes it (one w1/w3/w2 tensor per expert); the
standard battery, the recurrent checks and a long greedy generation; the CLI with LFM2's chat template; GGUF in
(F32 and Q8_0) and out as llama.cpp's LFM2MoeModel converter writes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_mimic import add_toy_vocab, stacked_experts

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
# what llama.cpp's lfm2moe runs: the expert bias (random), renormalised, unscaled; no conv biases
GGUF = BiasedFamily("Lfm2MoeConfig", SIZES, lora_targets=TARGETS)


def test_logits(tmp_path_factory):
    MOE.check_logits(tmp_path_factory)
    PLAIN.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    MOE.check_generate(tmp_path_factory)


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 40 new tokens: transformers' greedy tokens."""
    MOE.check_long_generation(tmp_path_factory, new=40, seed=7, exact_length=True)


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
    model, saved = MOE.check_saved_files(tmp_path_factory, tmp_path)
    hf = MOE.checkpoint(tmp_path_factory)[1]
    assert type(model).__name__ == "Lfm2MoeForCausalLM"
    bias = model.model.layers[1].feed_forward.expert_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, hf.model.layers[1].feed_forward.expert_bias)
    assert "model.layers.1.feed_forward.experts.3.w3.weight" in saved


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


# ---- GGUF: llama.cpp's LFM2MoeModel converter, emulated ----------------------------------------------------------


def write_lfm2_moe_gguf(hf, path: str, kind: str = "F32", gating: int = 2) -> None:
    """The GGUF llama.cpp's converter makes of transformers' LFM2-MoE `hf` (--outtype f32, or `kind`'s blocks for
    the layers' matrices and stacked experts whose rows it can hold): TextModel's metadata with head_count_kv per
    layer (0 on the convolution layers), feed_forward_length the dense width, the expert counts; then
    expert_feed_forward_length, leading_dense_block_count, the sigmoid gating (`gating`), the vocabulary size,
    shortconv.l_cache. Tensors: the convolution weight squeezed to (h, L); each layer's w1/w2/w3 experts stacked
    (as `layers.N.feed_forward.experts.wK`); `expert_bias` renamed `expert_bias.bias` (exp_probs_b.bias); the
    router and convolutions kept F32; the rest by gguf-py's name map; a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    w = gguf.GGUFWriter(path, "lfm2moe")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv([c.num_key_value_heads if t == "full_attention" else 0 for t in c.layer_types])
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_leading_dense_block_count(c.num_dense_layers)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType(gating))
    w.add_vocab_size(c.vocab_size)
    w.add_shortconv_l_cache(c.conv_L_cache)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LFM2MOE, c.num_hidden_layers)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".feed_forward.experts.", c.num_experts):
        if "conv.conv" in name:
            t = t.squeeze(1)  # "conv op requires 2d tensor"
        name = name.replace(".expert_bias", ".expert_bias.bias")  # LFM2MoeModel.filter_tensors
        if ".experts." in name:  # merged as layers.N.feed_forward.experts.wK.weight
            name = name.removeprefix("model.")
        base, suffix = name.rsplit(".", 1)
        new, data = f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(t.float().numpy())
        keep = "ffn_gate_inp" in new or "shortconv.conv" in new or data.shape[-1] % 32
        if kind != "F32" and data.ndim in (2, 3) and new.startswith("blk.") and not keep:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()].float()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as Lfm2MoeForCausalLM with the layer kinds, the dense layers' count, the expert
    bias and transformers' logits; Q8_0 with quantization="gguf": close; a file whose gating is not the sigmoid
    is refused, naming it."""
    ids, mask = padded_batch()
    _, hf = GGUF.checkpoint(tmp_path_factory)
    write_lfm2_moe_gguf(hf, str(tmp_path / "m.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(model).__name__ == "Lfm2MoeForCausalLM"
    c = model.config
    assert (c.layer_types, c.num_dense_layers, c.num_experts, c.moe_intermediate_size) == (
        hf.config.layer_types,
        1,
        4,
        32,
    )
    assert (c.use_expert_bias, c.norm_topk_prob, c.routed_scaling_factor) == (True, True, 1.0)
    bias = model.model.layers[2].feed_forward.expert_bias
    assert bias.abs().sum() > 0 and torch.equal(bias, hf.model.layers[2].feed_forward.expert_bias)
    want = _logits(hf, ids, mask)
    torch.testing.assert_close(_logits(model, ids, mask), want, atol=1e-4, rtol=1e-4)
    write_lfm2_moe_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert type(q.model.layers[0].conv.in_proj).__name__ == "GGMLLinear"  # the file's Q8_0 blocks
    got = _logits(q, ids, mask)
    assert (got - want).abs().mean() <= 0.08 * want.abs().mean()
    write_lfm2_moe_gguf(hf, str(tmp_path / "soft.gguf"), gating=1)
    with pytest.raises(autolm.ConfigError, match="expert_gating_func"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="soft.gguf")


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """test_gguf_out's byte-level tokenizer (imported here, not at the top: that module imports every family)."""
    from test_gguf_out import byte_tokenizer

    return byte_tokenizer.__wrapped__(tmp_path_factory)


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer):
    """llama.cpp's lfm2moe always adds the expert bias, renormalises and does not scale, and its short
    convolution has no biases: models otherwise are refused, naming the fields, and no file is written."""
    from autolm.gguf_writer import save_gguf

    for fam, fields in ((MOE, ["routed_scaling_factor"]),
                        (PLAIN, ["use_expert_bias", "norm_topk_prob", "conv_bias"])):  # fmt: skip
        model = autolm.AutoModelForCausalLM.from_pretrained(fam.checkpoint(tmp_path_factory)[0])
        with pytest.raises(autolm.ConfigError, match=fields[0]) as e:
            save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
        assert all(f in str(e.value) for f in fields)
        assert not (tmp_path / "no.gguf").exists()
