"""Granite MoE Shared against transformers: every Granite multiplier away from 1, GQA, attention biases, tied
embeddings, 4 experts of which each token uses 2, and a shared MLP of its own width added to the experts' output;
a variant without the shared MLP (shared_intermediate_size 0, transformers' default) and an untied head. The
standard battery, the checkpoint's names as transformers writes them, GGUF as llama.cpp's GraniteMoeModel converter
writes it ("granitemoe", the shared MLP split into ffn_{gate,up}_shexp; in, out, Q8_0), the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults
from gguf_llamacpp import _granite, permute
from gguf_mimic import add_toy_vocab
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm
from autolm.kernels import native

KWARGS = dict(
    hidden_size=64,
    intermediate_size=32,
    shared_intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_local_experts=4,
    num_experts_per_tok=2,
    embedding_multiplier=3.0,
    residual_multiplier=0.6,
    attention_multiplier=0.09,
    logits_scaling=2.5,
    attention_bias=True,
    tie_word_embeddings=True,
)
SHARED = Family(
    "GraniteMoeSharedConfig", KWARGS, lora_targets=["q_proj", "v_proj", "input_linear", "output_linear"]
)  # peft has no default for granitemoeshared; the shared MLP's Linears adapted too
UNSHARED = Family(
    "GraniteMoeSharedConfig", dict(KWARGS, shared_intermediate_size=0, tie_word_embeddings=False)
)
FAMILIES = {"shared": SHARED, "unshared": UNSHARED}
families = pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))


@families
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


@families
def test_generate(family, tmp_path_factory):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    SHARED.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    SHARED.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    SHARED.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    SHARED.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft
    import transformers

    from autolm.errors import AdapterError

    directory, _ = SHARED.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), peft.LoraConfig())
    with pytest.raises(AdapterError, match="granitemoeshared"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    SHARED.check_quantized(tmp_path_factory, bits)


@families
def test_save(family, tmp_path_factory, tmp_path):
    """transformers loads what autolm saves; the checkpoint's tensor names (input_linear, output_linear,
    router.layer; the shared MLP's where there is one) and config.json's keys and values."""
    _, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.1.block_sparse_moe.input_linear.weight" in saved
    assert ("model.layers.1.shared_mlp.input_linear.weight" in saved) == (family is SHARED)


def test_disk_offload(tmp_path_factory, tmp_path):
    SHARED.check_disk_offload(tmp_path_factory, tmp_path)


def test_shared_mlp_matters(tmp_path_factory):
    """The shared MLP's output is part of the layer's: zeroing its output_linear changes the logits."""
    directory, _ = SHARED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.shared_mlp.output_linear.weight.zero_()
        assert not torch.allclose(model(ids, attention_mask=mask).logits, base, atol=1e-3)


# ---- GGUF: llama.cpp's GraniteMoeModel converter (conversion/granite.py), emulated ----------------------------


def write_granitemoeshared_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Granite MoE Shared `hf` (--outtype f32), from the
    checkpoint files as the converter reads them: Granite's metadata (Llama's, the multipliers under their "scale"
    names) with TextModel's expert counts and, where non-zero, shared_intermediate_size as
    expert_shared_feed_forward_length; q/k rows permuted; the experts' and the shared MLP's input_linear split into
    gate (the first half of its rows) and up; the rest by gguf-py's name map; a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c, T = hf.config, gguf.MODEL_TENSOR
    w = gguf.GGUFWriter(path, "granitemoe")
    _granite(w, c)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if c.shared_intermediate_size:
        w.add_expert_shared_feed_forward_length(c.shared_intermediate_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GRANITE_MOE, c.num_hidden_layers)
    halves = {
        "block_sparse_moe.input_linear.weight": (c.intermediate_size, T.FFN_GATE_EXP, T.FFN_UP_EXP),
        "shared_mlp.input_linear.weight": (c.shared_intermediate_size, T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP),
    }
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        base, kind = name.rsplit(".", 1)
        split = next((v for k, v in halves.items() if name.endswith(k)), None)
        if split is not None:
            rows, *stems = split
            for stem, half in zip(stems, t.split(rows, dim=-2)):
                out = gguf.TENSOR_NAMES[stem].format(bid=int(name.split(".")[2]))
                w.add_tensor(f"{out}.weight", np.ascontiguousarray(half.float().numpy()))
            continue
        if ".q_proj." in name or ".k_proj." in name:
            t = permute(t, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(("name", "read_as"), [("shared", "GraniteMoeSharedForCausalLM"),
                                               ("unshared", "GraniteMoeForCausalLM")])  # fmt: skip
def test_gguf(name, read_as, tmp_path_factory, tmp_path):
    """The converter's file loads with transformers' logits: as this family where the shared MLP's width is
    there, as Granite MoE (the same model) where the converter writes none."""
    _, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    write_granitemoeshared_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == read_as
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_gguf_family_is_told_apart_from_granitemoe():
    """Both families read "granitemoe" files and both claim one by its expert count: the shared MLP's width claims
    it for this family, whichever was registered first."""
    from autolm.models import _family, gguf_family

    assert _family("granitemoe") and _family("granitemoeshared")
    plain = {"general.architecture": "granitemoe", "granitemoe.expert_count": 4}
    shared = {**plain, "granitemoe.expert_shared_feed_forward_length": 48}
    assert gguf_family(plain).__name__ == "GraniteMoeForCausalLM"
    assert gguf_family(shared).__name__ == "GraniteMoeSharedForCausalLM"


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf_out_is_the_converters_file(name, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """save_gguf writes the converter's metadata and tensors byte for byte (no shared width where there is no
    shared MLP); the file loads back with the model's logits."""
    from test_gguf_out import IDS, _same_file

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    write_granitemoeshared_gguf(hf, str(tmp_path / "ref.gguf"))
    ours = GGUFFile(path)
    _same_file(ours, GGUFFile(str(tmp_path / "ref.gguf")))
    assert ("granitemoe.expert_shared_feed_forward_length" in ours.metadata) == (name == "shared")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason="autolm's C++ kernel is not built on this machine")
def test_gguf_q8_0_stays_in_its_blocks(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """A Q8_0 file (save_gguf) with quantization="gguf": the experts and the shared MLP's output_linear stay in the
    file's blocks (its input_linear, assembled from ffn_gate_shexp and ffn_up_shexp, is dequantized), the logits
    within the blocks' rounding of the float model's."""
    from autolm.gguf_writer import save_gguf
    from autolm.nn.ggml import GGMLExperts, GGMLLinear

    directory, _ = SHARED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    save_gguf(model, byte_tokenizer, str(tmp_path / "q.gguf"), "q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert isinstance(kept.model.layers[1].block_sparse_moe.experts, GGMLExperts)
    assert isinstance(kept.model.layers[1].shared_mlp.output_linear, GGMLLinear)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        got, want = kept(ids, attention_mask=mask).logits[real], model(ids, attention_mask=mask).logits[real]
    close = (got - want).abs() <= 0.02 * (want.abs() + want.abs().max())  # a routing flip moves a few
    assert close.float().mean() >= 0.95


# ---- CLI, config ---------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """Granite 3.3's template (its long system turn needs a longer context than the battery's checkpoints)."""
    long = Family(SHARED.config_cls, dict(SHARED.kwargs, max_position_embeddings=2048))
    check_cli(
        long,
        "granite-3.3-2b-instruct.jinja",
        tmp_path_factory,
        tmp_path,
        "GraniteMoeSharedForCausalLM (granitemoeshared)",
    )


def test_config_defaults_as_transformers():
    from autolm.models.granitemoeshared import GraniteMoeSharedConfig

    check_config_defaults(GraniteMoeSharedConfig)
    assert GraniteMoeSharedConfig().shared_intermediate_size == 0


def test_config_errors_name_the_key():
    from autolm.models.granitemoeshared import GraniteMoeSharedConfig

    for kwargs, key in (
        (dict(shared_intermediate_size=-1), "shared_intermediate_size"),
        (dict(shared_intermediate_size=2.5), "shared_intermediate_size"),
        (dict(num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(logits_scaling=0), "logits_scaling"),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            GraniteMoeSharedConfig(**kwargs)
