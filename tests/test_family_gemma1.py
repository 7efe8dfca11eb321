"""Gemma (1) against transformers and peft: (1 + w) norms in fp32, embeddings scaled by sqrt(hidden), GeLU-tanh
gate, multi-query attention with head_dim != hidden / heads, tied head; the standard battery, the config as the
real checkpoints spell it (legacy hidden_act "gelu", v4 RoPE keys), user-given inputs_embeds, GGUF as llama.cpp's
converter writes Gemma (and back out), Gemma 1.1's chat template and the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from chat_checks import CONVERSATIONS, check_chat_template, check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, TokenizerError

# gemma-2b's shape in miniature: one KV head, head_dim (16) not hidden / heads (8)
GEMMA = Family(
    "GemmaConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=1,
         head_dim=16, max_position_embeddings=64),
)  # fmt: skip
# what transformers' Gemma also takes: q/k/v/o biases, GQA, another RoPE base and epsilon
GEMMA_BIAS = Family(
    "GemmaConfig",
    dict(GEMMA.kwargs, num_key_value_heads=4, attention_bias=True, rms_norm_eps=1e-5,
         rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
)  # fmt: skip


def test_logits(tmp_path_factory):
    GEMMA.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    GEMMA.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GEMMA.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    GEMMA.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GEMMA.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    GEMMA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GEMMA.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    GEMMA.check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    GEMMA.check_disk_offload(tmp_path_factory, tmp_path)


def test_biases_and_rope_base(tmp_path_factory, tmp_path):
    GEMMA_BIAS.check_logits(tmp_path_factory)
    GEMMA_BIAS.check_save(tmp_path_factory, tmp_path)


def test_inputs_embeds_are_taken_as_given(tmp_path_factory):
    """transformers scales token embeddings inside its embedding module: embeddings a user passes are not scaled
    again (and ids give the same logits as their scaled embeddings)."""
    directory, hf = GEMMA.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    embeds = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(1))
    real = mask.bool()
    with torch.no_grad():
        ours = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)).logits
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
        scaled = model.model.embed_tokens(ids) * 64**0.5
        torch.testing.assert_close(model(inputs_embeds=scaled, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits)  # fmt: skip


def _rewrite_config(src: str, dst, change) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        d = json.load(f)
    change(d)
    with open(path, "w") as f:
        json.dump(d, f)
    return str(dst)


def test_real_checkpoints_config_spelling(tmp_path_factory, tmp_path):
    """google/gemma-2b's config.json: hidden_act "gelu" (read as the tanh form, as transformers reads it), v4
    rope_theta / rope_scaling, a hidden_activation key transformers 5 does not read (kept as read)."""
    import transformers

    def real(d):
        rope = d.pop("rope_parameters")
        d.update(hidden_act="gelu", hidden_activation="gelu_pytorch_tanh", rope_theta=rope["rope_theta"],
                 rope_scaling=None, torch_dtype=d.pop("dtype"))  # fmt: skip

    directory = _rewrite_config(GEMMA.checkpoint(tmp_path_factory)[0], tmp_path / "real", real)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.hidden_act == hf.config.hidden_act == "gelu_pytorch_tanh"
    ids, mask = padded_batch()
    real_rows = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real_rows]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real_rows]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["hidden_act"] == "gelu_pytorch_tanh" and saved["hidden_activation"] == "gelu_pytorch_tanh"
    assert saved["rope_theta"] == 10000.0 and "sliding_window" not in saved
    back = transformers.AutoConfig.from_pretrained(tmp_path / "saved")
    assert back.rope_parameters == hf.config.rope_parameters and back.head_dim == 16


def test_config_has_transformers_fields_and_defaults():
    """A default config writes only keys transformers' GemmaConfig has, with its values."""
    import transformers

    ours = autolm.models.GemmaConfig().to_dict()
    theirs = transformers.GemmaConfig().to_dict()
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    differ = {k: (v, theirs[k]) for k, v in ours.items() if k != "dtype" and v != theirs[k]}
    assert not differ


def test_config_errors_name_the_key(tmp_path_factory, tmp_path):
    directory = GEMMA.checkpoint(tmp_path_factory)[0]
    for i, (change, key) in enumerate([
        (lambda d: d.update(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (lambda d: d.update(attention_bias="no"), "attention_bias"),
        (lambda d: d.update(hidden_act="swiglu"), "hidden_act"),
        (lambda d: d.update(num_key_value_heads=3), "num_key_value_heads"),
    ]):  # fmt: skip
        bad = _rewrite_config(directory, tmp_path / str(i), change)
        with pytest.raises(ConfigError, match=key):
            autolm.AutoModelForCausalLM.from_pretrained(bad)


def test_norm_weights_start_at_zero():
    """A model built from its config (as for training) holds Gemma's norms at w = 0, i.e. a scale of 1."""
    cfg = autolm.AutoConfig.for_model("gemma", **GEMMA.kwargs)
    model = autolm.AutoModelForCausalLM.from_config(cfg)
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 5 and all(bool((p == 0).all()) for p in norms)
    assert np.isclose(model.model.embed_scale, 8.0)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---- GGUF as llama.cpp's convert_hf_to_gguf.py writes Gemma (conversion/gemma.py, class GemmaModel) ------------


def write_gguf(hf, path: str) -> None:
    """The converter's GemmaModel (--outtype f32): its own metadata keys (no RoPE base: llama.cpp's 10000), a
    SentencePiece vocabulary with CodeGemma's special tokens, no space prefix, tensor names from gguf-py's map
    for the gemma architecture, 1 added to every norm weight, no lm_head, q/k not permuted."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(path, "gemma")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<bos>", "<eos>", "<unk>", *(f"t{i}" for i in range(4, VOCAB))])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([3, 3, 3, 2] + [1] * (VOCAB - 4))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    for kind, token in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70)):  # CodeGemma's FIM
        w.add_uint32(f"tokenizer.ggml.{kind}_token_id", token)
    w.add_eot_token_id(107)
    w.add_add_space_prefix(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA, c.num_hidden_layers)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        a = t.float().numpy()
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", a + 1 if name.endswith("norm.weight") else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_in_llama_cpp_layout_and_back_out(tmp_path_factory, tmp_path):
    """The converter's file loads with the checkpoint's config and logits; autolm's GGUF out writes the same
    tensors (norms as 1 + w) and head size, and loads back with the same logits."""
    import gguf

    from autolm.gguf_writer import save_gguf

    _, hf = GEMMA.checkpoint(tmp_path_factory)
    write_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c = model.config
    assert type(model).__name__ == "GemmaForCausalLM" and c.tie_word_embeddings
    assert (c.head_dim, c.num_key_value_heads, c.rope_theta) == (16, 1, 10000.0)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    tok = autolm.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    out = save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    converter, ours_out = gguf.GGUFReader(tmp_path / "model.gguf"), gguf.GGUFReader(out)
    mine = {t.name: np.asarray(t.data) for t in ours_out.tensors}
    assert set(mine) == {t.name for t in converter.tensors}
    for t in converter.tensors:
        np.testing.assert_array_equal(mine[t.name], np.asarray(t.data), err_msg=t.name)
    assert ours_out.get_field("gemma.attention.key_length").contents() == 16
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)  # fmt: skip


# ---- chat template and the CLI ----------------------------------------------------------------------------------

TEMPLATE = "gemma-1.1-it.jinja"  # google/gemma-1.1-2b-it's tokenizer_config.json (Gemma 2's is the same)


def test_chat_template(tmp_path):
    """No system role (refused), turns alternating user / model, contents trimmed."""
    turns = [CONVERSATIONS[0], CONVERSATIONS[2], CONVERSATIONS[1][1:]]
    ours = check_chat_template(tmp_path, TEMPLATE, conversations=turns, bos_token="<s>", eos_token="</s>")
    text = ours.apply_chat_template(CONVERSATIONS[2], tokenize=False, add_generation_prompt=False)
    assert text == "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    with pytest.raises(TokenizerError, match="System role not supported"):
        ours.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    with pytest.raises(TokenizerError, match="must alternate"):
        ours.apply_chat_template(CONVERSATIONS[0] * 2, tokenize=False)


def test_cli(tmp_path_factory, tmp_path):
    check_cli(GEMMA, TEMPLATE, tmp_path_factory, tmp_path, "GemmaForCausalLM (gemma)")
