"""Llama 4's text model against transformers: RoPE (interleaved pairs) with the L2 q/k norm on layers 0 and 2, NoPE
layers 1 and 3 with the query temperature, chunked attention (chunks of 8 positions) on the RoPE layers and full
attention on the NoPE ones, q/k/v/o biases, GQA; a mixture of 4 experts (top 2, sigmoid weights scaling each
expert's input) with a shared expert on layers 0 and 3, dense MLPs of another width on 1 and 2. The standard
battery; sequences longer than several chunks with the temperature well under way (prompt and generation, every
decode path); the image-text checkpoint (model_type llama4) running its language model; the CLI with Llama 4's
chat template; config errors.

The temperature counts cache slots as transformers does (a left-padded row's padding included), the chunks each row's
positions: LONG's floor_scale (4) puts the temperature under way in padded batches too (prompt and every decode
path)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions, randomize
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.llama4 import Llama4Config, Llama4TextConfig

SIZES = dict(
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_layers=[0, 3],
    no_rope_layer_interval=2,
    attention_chunk_size=8,
    attention_bias=True,
)
# peft's default targets are for "llama4" only, not "llama4_text"
LLAMA4 = Family("Llama4TextConfig", dict(SIZES, floor_scale=22), lora_targets=["q_proj", "v_proj"])
# the temperature from cache slot 3 on
LONG = Family(
    "Llama4TextConfig", dict(SIZES, floor_scale=4, attn_scale=0.5), lora_targets=["q_proj", "v_proj"]
)


def test_logits(tmp_path_factory):
    LLAMA4.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    LLAMA4.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    LLAMA4.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    LLAMA4.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    LLAMA4.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    LLAMA4.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    LLAMA4.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict (stacked experts, as the checkpoint holds them); the saved files hold the
    checkpoint's tensor names and only transformers' config keys."""
    from safetensors import safe_open

    LLAMA4.check_save(tmp_path_factory, tmp_path)
    directory, hf = LLAMA4.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        assert "model.layers.3.feed_forward.experts.gate_up_proj" in set(ours.keys())
    keys = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(keys[1]) - {"transformers_version"} == set(keys[0]) - {"transformers_version"}
    for key in ("layer_types", "no_rope_layers", "moe_layers", "attention_chunk_size", "floor_scale"):
        assert keys[1][key] == keys[0][key], key


def test_disk_offload(tmp_path_factory, tmp_path):
    LLAMA4.check_disk_offload(tmp_path_factory, tmp_path)


# ---- sequences of several chunks, the temperature under way ---------------------------------------------------


def test_long_sequence_logits_and_generation(tmp_path_factory):
    """26 tokens (4 chunks of 8) and a 20-token prompt generating 16 more (through the one-token step): transformers'
    logits and greedy tokens. Without the chunks or the temperature they would differ."""
    directory, hf = LONG.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 26), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)
        greedy = dict(max_new_tokens=16, do_sample=False)
        assert model.generate(ids[:, :20], **greedy).tolist() == hf.generate(ids[:, :20], **greedy).tolist()
        for attn in (m for m in model.modules() if hasattr(m, "chunk")):
            attn.chunk = None
        unchunked = model(ids).logits
    assert (unchunked[0, 8:] - want[0, 8:]).abs().max() > 1e-2


def test_long_sequence_compiled_step(tmp_path_factory, home):  # noqa: F811
    """The compiled step's graphs give the general forward's tokens and logits over 27 positions (chunk starts and
    the temperature inside the graphs); a left-padded batch (the batched graphs, each row's chunk and temperature
    from its own first token) too. (test_long_sequence_logits_and_generation takes the eager one-token step.)"""
    LONG.check_compiled_step(tmp_path_factory, home)


def test_padded_batch_temperature_counts_cache_slots(tmp_path_factory, monkeypatch):
    """A left-padded batch (a row padded by 8 slots, chunks of 8, the temperature under way from slot 3):
    transformers' logits at every real position, and its greedy tokens and per-step logits through the general
    forward, the eager one-token step, the exported one-token graphs and compile_decode's static-cache step
    (uncompiled). transformers counts the temperature in cache slots (padding included): a padded row is not its
    own sequence alone, which per-row positions would make it."""
    from autolm import step
    from autolm.step import graphs

    monkeypatch.delenv("AUTOLM_EAGER", raising=False)  # the exported graphs run where installed
    directory, hf = LONG.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(17, 9))
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
        got = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        alone = model(ids[1:, 8:]).logits
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert (got[1, 8:] - alone[0]).abs().max() > 1e-2  # the padding counts in the temperature
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
              return_dict_in_generate=True)  # fmt: skip
    theirs = hf.generate(ids, **kw)
    step.install_plan(model, graphs.exported(model, batched=True), batched=True)
    for mode in ("forward", "eager", "auto", "static"):
        model.decode_mode = "auto" if mode == "static" else mode
        model.decode_step = model.step if mode == "static" else None
        ours = model.generate(ids, **kw)
        assert torch.equal(ours.sequences, theirs.sequences), mode
        torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), atol=1e-4, rtol=1e-4)
    assert step._BATCHED[model][1] is not None  # the graphs ran ("auto")


# ---- GGUF: llama.cpp's Llama4Model converter, emulated ----------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # fmt: skip
GGUF_SIZES = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)  # fmt: skip
# what llama.cpp's llama4 runs: Scout's shape (16 experts, a mixture on every layer, the q/k norm, Llama 3 RoPE:
# original context 8, every band in play) and Maverick's (128 experts, no q/k norm, mixtures on odd layers), each
# with chunks of 8192 on three layers of four and the fourth NoPE with the temperature; Maverick's head tied
GGUF_FAMILIES = {
    "scout": Family("Llama4TextConfig", dict(GGUF_SIZES, num_local_experts=16, num_experts_per_tok=1,
                                              rope_parameters=LLAMA3), lora_targets=["q_proj", "v_proj"]),
    "maverick": Family("Llama4TextConfig", dict(GGUF_SIZES, num_local_experts=128, num_experts_per_tok=1,
                                                 interleave_moe_layer_step=2, use_qk_norm=False,
                                                 tie_word_embeddings=True), lora_targets=["q_proj", "v_proj"]),
}  # fmt: skip


def _rope_freqs(c) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: each frequency's divisor under Llama 3 scaling."""
    rope, dim = c.rope_parameters, c.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old, lo, hi, factor = (rope[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                            "high_freq_factor", "factor"))  # fmt: skip
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def write_llama4_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's Llama4Model converter (conversion/llama.py) makes of transformers' Llama 4 `hf`:
    TextModel's metadata with intermediate_size_mlp as the feed-forward length, LlamaModel's vocabulary size and
    rotary dimensions, the head size, the expert counts, interleave_moe_layer_step and the experts' width; q/k not
    permuted; the experts' gate_up_proj transposed and split into gate and up, down_proj transposed; Llama 3 RoPE
    as rope_freqs; the rest by gguf-py's name map. `kind` "Q8_0" quantizes the layers' matrices."""
    import gguf
    from gguf_mimic import add_toy_vocab

    c = hf.config
    w = gguf.GGUFWriter(path, "llama4")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size_mlp)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_interleave_moe_layer_step(c.interleave_moe_layer_step)
    w.add_expert_feed_forward_length(c.intermediate_size)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA4, c.num_hidden_layers)
    tensors = []
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.endswith("gate_up_proj"):
            gate, up = t.transpose(-1, -2).split(t.shape[-1] // 2, dim=-2)
            tensors += [(name.replace("gate_up_proj", "gate_proj.weight"), gate),
                        (name.replace("gate_up_proj", "up_proj.weight"), up)]  # fmt: skip
            continue
        if name.endswith("down_proj"):
            name, t = name + ".weight", t.transpose(-1, -2)
        tensors.append((name, t))
    if c.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _rope_freqs(c))
    for name, t in tensors:
        base, suffix = name.rsplit(".", 1)
        new, data = f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(t.float().numpy())
        quantized = data.ndim >= 2 and data.shape[-1] % 32 == 0 and "ffn_gate_inp" not in new  # else F32 here
        if kind != "F32" and quantized and new.startswith("blk."):
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as Llama4ForCausalLM with transformers' logits (llama.cpp's fixed chunks,
    NoPE interval and temperature, the q/k norm from the expert count, the mixtures from the interleave step);
    Q8_0 in its own blocks: close."""
    _, hf = GGUF_FAMILIES[name].checkpoint(tmp_path_factory)
    write_llama4_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "Llama4ForCausalLM"
    for key in ("use_qk_norm", "moe_layers", "no_rope_layers", "layer_types", "attention_chunk_size",
                "intermediate_size", "intermediate_size_mlp", "tie_word_embeddings"):  # fmt: skip
        assert getattr(model.config, key) == getattr(hf.config, key), key
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        got = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        write_llama4_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
        q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
        got = q(ids, attention_mask=mask, position_ids=positions(mask)).logits[real].float()
    # top-1 routing: a token whose best two experts' logits lie within the quantization error changes expert
    assert (got - want).abs().mean() <= 0.1 * want.abs().mean()


def _tokenizer(tmp_path_factory):
    """test_gguf_out's byte tokenizer (its fixture's body)."""
    import test_gguf_out

    return test_gguf_out.byte_tokenizer.__wrapped__(tmp_path_factory)


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path):
    """LLAMA4 (biases, chunks of 8, NoPE every second layer, temperature floor 22, mixtures on layers 0 and 3) is
    refused naming what llama.cpp's graph fixes; so is Scout with the q/k norm off (llama.cpp keeps it on
    without 128 experts). No file is written."""
    from autolm.gguf_writer import save_gguf

    tok = _tokenizer(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(LLAMA4.checkpoint(tmp_path_factory)[0])
    fields = ("attention_bias", "moe_layers", "no_rope_layers", "attention_chunk_size", "floor_scale")
    with pytest.raises(ConfigError, match="'llama4_text' model") as e:
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert all(f in str(e.value) for f in fields), str(e.value)
    directory, _ = GGUF_FAMILIES["scout"].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, use_qk_norm=False)
    with pytest.raises(ConfigError, match="use_qk_norm"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert list(tmp_path.iterdir()) == []


# ---- the image-text checkpoint, CLI, config -------------------------------------------------------------------------


def test_image_text_checkpoint_runs_its_language_model(tmp_path):
    """model_type llama4 (Scout, Maverick: a vision model, a projector and the language model, the text settings in
    text_config): autolm loads the language model, skipping the vision tensors, with the logits and greedy tokens
    of transformers' AutoModelForCausalLM; saved, it is the text model transformers' Llama4ForCausalLM loads."""
    import transformers

    text = dict(LONG.kwargs, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, image_size=28,
                  patch_size=14, pixel_shuffle_ratio=0.5)  # fmt: skip
    hf = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=text, vision_config=vision)
    )
    randomize(hf)
    hf.save_pretrained(tmp_path / "mm")
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["model_type"] == "llama4"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "mm", attn_implementation="eager"
    ).eval()
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mm")
    assert type(model).__name__ == "Llama4ForCausalLM" and model.config.model_type == "llama4_text"
    ids = torch.randint(3, VOCAB, (1, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)
        greedy = dict(max_new_tokens=6, do_sample=False)
        assert model.generate(ids, **greedy).tolist() == hf.generate(ids, **greedy).tolist()
    model.save_pretrained(tmp_path / "text")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    assert type(back).__name__ == "Llama4ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, atol=1e-4, rtol=1e-4)
    d = json.loads((tmp_path / "mm" / "config.json").read_text())
    del d["text_config"]
    (tmp_path / "mm" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="text_config"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mm")


def test_cli(tmp_path_factory, tmp_path):
    """Llama 4 Scout Instruct's chat template (transformers' Llama4Processor default): a prompt of many chunks."""
    check_cli(LLAMA4, "llama-4-scout-17b-16e-instruct.jinja", tmp_path_factory, tmp_path,
              "Llama4ForCausalLM (llama4_text)")  # fmt: skip


def test_config_defaults_and_errors_name_the_key():
    c = Llama4TextConfig(num_hidden_layers=8, interleave_moe_layer_step=2)
    assert c.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0] and c.moe_layers == [1, 3, 5, 7]
    assert c.layer_types[3] == "full_attention" and c.layer_types[0] == "chunked_attention"
    assert Llama4Config(text_config={"num_hidden_layers": 2}).num_hidden_layers == 2
    bad = [
        ("layer_types", dict(num_hidden_layers=2, layer_types=["sliding_attention"] * 2)),
        ("no_rope_layers", dict(num_hidden_layers=2, no_rope_layers=[1, 2])),
        ("moe_layers", dict(moe_layers=[-1])),
        ("num_experts_per_tok", dict(num_local_experts=4, num_experts_per_tok=5)),
        ("attention_chunk_size", dict(attention_chunk_size=0)),
        ("attention_chunk_size", dict(attention_chunk_size=None)),
        ("floor_scale", dict(floor_scale=0)),
        ("attn_scale", dict(attn_scale="big")),
        ("intermediate_size_mlp", dict(intermediate_size_mlp=-1)),
        ("interleave_moe_layer_step", dict(interleave_moe_layer_step=0)),
        ("no_rope_layer_interval", dict(no_rope_layer_interval=0)),
        ("use_qk_norm", dict(use_qk_norm="yes")),
        ("attn_temperature_tuning", dict(attn_temperature_tuning=1)),
    ]
    for key, kwargs in bad:
        with pytest.raises(ConfigError, match=key):
            Llama4TextConfig(**kwargs)
    with pytest.raises(ConfigError, match="text_config"):
        Llama4Config.from_dict({"model_type": "llama4"})
