"""Gemma 3n (text) against transformers and peft: the family battery on two tiny checkpoints with every quirk switched
on. MAIN (E2B / E4B's layout): four AltUp streams, Laurel, per-layer inputs from a per-layer vocabulary smaller than
the model's (ids beyond it read row 0), the last two layers sharing the keys and values of the last earlier layer
of their attention type, activation sparsity on the first layers, an intermediate_size per layer, sliding and full
layers with their own RoPE bases, a window shorter than the prompts, final soft-capping. ALT: three streams, the
active one not the first, no correct_output_scale, no KV sharing. Also: the image-audio-text checkpoint's language
model, the config's defaults and errors, training gradients, the CLI, GGUF in and out as llama.cpp's converter
writes the family."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, same_logits
from safetensors.torch import load_file
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
}
_SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
              sliding_window=4, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB - 24, laurel_rank=8,
              rope_parameters=_ROPE, final_logit_softcapping=10.0)  # fmt: skip
_TARGETS = ["q_proj", "v_proj"]  # peft has no default for gemma3n_text
_TYPES = ["sliding_attention", "full_attention"] * 2
MAIN = Family("Gemma3nTextConfig", dict(_SIZES, num_hidden_layers=4, layer_types=_TYPES, num_kv_shared_layers=2,
                                        intermediate_size=[96, 64, 96, 80], altup_num_inputs=4,
                                        activation_sparsity_pattern=[0.95, 0.6, 0.0, 0.0]),
              lora_targets=_TARGETS)  # fmt: skip
ALT = Family("Gemma3nTextConfig", dict(_SIZES, num_hidden_layers=3, num_kv_shared_layers=0, intermediate_size=96,
                                       altup_num_inputs=3, altup_active_idx=1, altup_correct_scale=False,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                       activation_sparsity_pattern=[0.0, 0.9, 0.0]),
             lora_targets=_TARGETS)  # fmt: skip
FAMILIES = {"main": MAIN, "alt": ALT}
families = pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))


@families
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


@families
def test_generate_greedy_and_beam(family, tmp_path_factory):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MAIN.check_bf16(tmp_path_factory)


@families
def test_one_token_step(family, tmp_path_factory):
    """The eager one-token step runs the AltUp streams, per-layer inputs and KV-shared layers; no compiled graphs."""
    from autolm import step

    directory, _ = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    model.decode_mode = "eager"
    with torch.no_grad():
        assert isinstance(step.decoder(model, model.make_cache(1, 4)), step.OneTokenStep)
    assert not model.compiled_graphs
    family.check_one_token_step(tmp_path_factory)


def test_compiled_graphs_refuse_the_layers(tmp_path_factory):
    """A compiled one-token graph holds one layer on (B, T, h) vectors: a Gemma 3n layer (AltUp streams, per-layer
    inputs) fails to export, and the model declines the compiled step (the eager step decodes)."""
    import warnings

    from autolm.errors import GenerationError
    from autolm.step import graphs

    directory, _ = MAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises((GenerationError, NotImplementedError)):
        graphs.exported(model)
    assert not model.compiled_graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.precompile_decode() is False


def test_lora(tmp_path_factory, tmp_path):
    MAIN.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(bits, tmp_path_factory):
    MAIN.check_quantized(tmp_path_factory, bits)


@families
def test_save(family, tmp_path_factory, tmp_path):
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert set(model.state_dict()) == set(hf.state_dict())
    model.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(
        load_file(f"{directory}/model.safetensors")
    )
    ours = json.loads((tmp_path / "again" / "config.json").read_text())
    theirs = json.loads(open(f"{directory}/config.json").read())
    assert set(ours) - {"transformers_version"} <= set(theirs)
    for key in ("intermediate_size", "activation_sparsity_pattern", "rope_parameters", "layer_types"):
        assert ours[key] == theirs[key], key


def test_disk_offload(tmp_path_factory, tmp_path):
    MAIN.check_disk_offload(tmp_path_factory, tmp_path)


def test_without_cache_in_pieces_and_out_of_table_ids(tmp_path_factory):
    """No cache, two forward pieces through the cache, and ids beyond vocab_size_per_layer_input: transformers'
    logits; the shared layers' cache buffers are zero wide."""
    directory, hf = MAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    ids[0, -3:] = torch.tensor([VOCAB - 1, VOCAB - 10, VOCAB - 24])  # outside the per-layer table
    pos, real = positions(mask), mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        plain = model(ids, attention_mask=mask, position_ids=pos, use_cache=False)
        first = model(ids[:, :8], attention_mask=mask[:, :8], position_ids=pos[:, :8])
        second = model(
            ids[:, 8:], attention_mask=mask, position_ids=pos[:, 8:], past_key_values=first.past_key_values
        )
    assert plain.past_key_values is None
    torch.testing.assert_close(plain.logits[real], theirs[real], atol=1e-4, rtol=1e-4)
    pieces = torch.cat([first.logits, second.logits], 1)
    torch.testing.assert_close(pieces[real], theirs[real], atol=1e-4, rtol=1e-4)
    assert [k.shape[-1] for k in first.past_key_values.keys] == [16, 16, 0, 0]


def test_hidden_states_are_the_streams(tmp_path_factory):
    """output_hidden_states: each layer's input AltUp streams (n, B, T, h) and the last layer's, as transformers'."""
    directory, hf = MAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = IDS[:, :6]
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True).hidden_states
        theirs = hf(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_gradients(checkpointing, tmp_path_factory):
    """Training (the coefficients clamped at altup_coef_clip, gradient checkpointing or not): transformers' loss
    and gradients."""
    directory, _ = MAIN.checkpoint(tmp_path_factory)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").train()
    model = autolm.AutoModelForCausalLM.from_pretrained(directory).train()
    for m in (hf, model):
        m.config.altup_coef_clip = 0.1
    for layer in model.model.layers:
        layer.altup.clip = 0.1
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = model(ids, labels=ids)
    theirs = hf(ids, labels=ids)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    grads = dict(hf.named_parameters())
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.embed_tokens_per_layer.weight",
                 "model.altup_projections.1.weight", "model.altup_unembed_projections.2.weight",
                 "model.layers.1.altup.correction_coefs.weight", "model.layers.2.laurel.linear_left.weight",
                 "model.layers.3.altup.correct_output_scale"):  # fmt: skip
        ours_grad = model.get_parameter(name).grad
        assert ours_grad is not None and ours_grad.abs().sum() > 0, name
        torch.testing.assert_close(ours_grad, grads[name].grad, atol=1e-5, rtol=1e-4)


def test_image_audio_text_checkpoint(tmp_path_factory, tmp_path):
    """model_type gemma3n (Gemma3nForConditionalGeneration's checkpoint: the language model under
    model.language_model, vision and audio towers beside it): its language model, soft-capped as transformers'
    does, saved as the text model transformers' Gemma3nForCausalLM loads."""
    import transformers
    from safetensors.torch import save_file

    directory, hf = MAIN.checkpoint(tmp_path_factory)
    text = json.loads(open(f"{directory}/config.json").read())
    tensors = {
        k.replace("model.", "model.language_model.", 1): v
        for k, v in load_file(f"{directory}/model.safetensors").items()
    }
    tensors.update({"model.vision_tower.timm_model.stem.conv.weight": torch.zeros(4, 3, 3, 3),
                    "model.audio_tower.conformer.0.norm.weight": torch.ones(4),
                    "model.embed_vision.embedding.weight": torch.zeros(8, 4),
                    "model.embed_audio.embedding_projection.weight": torch.zeros(4, 4)})  # fmt: skip
    (tmp_path / "it").mkdir()
    save_file(tensors, tmp_path / "it" / "model.safetensors", metadata={"format": "pt"})
    outer = {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"], "text_config": text,
             "vision_config": {"model_type": "gemma3n_vision"}, "audio_config": {"model_type": "gemma3n_audio"}}  # fmt: skip
    (tmp_path / "it" / "config.json").write_text(json.dumps(outer))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "it")
    assert type(model).__name__ == "Gemma3nForCausalLM" and model.config.final_logit_softcapping == 10.0
    same_logits(model, hf)
    model.save_pretrained(tmp_path / "text")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    assert type(again).__name__ == "Gemma3nForCausalLM"
    same_logits(model, again.eval())


def test_config_defaults_are_transformers():
    import transformers

    from autolm.models.gemma3n import Gemma3nTextConfig
    from autolm.models.gemma4_small import kv_sources

    for kwargs in ({}, dict(num_hidden_layers=8, num_kv_shared_layers=3), dict(num_hidden_layers=12,
                   intermediate_size=32, rope_theta=5.0, rope_local_base_freq=7.0, num_kv_shared_layers=5)):  # fmt: skip
        ours, theirs = Gemma3nTextConfig.from_dict(kwargs), transformers.Gemma3nTextConfig(**kwargs)
        for key in ("layer_types", "intermediate_size", "activation_sparsity_pattern", "final_logit_softcapping",
                    "vocab_size", "head_dim", "sliding_window", "altup_num_inputs", "laurel_rank",
                    "hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers"):  # fmt: skip
            assert getattr(ours, key) == getattr(theirs, key), key
        for kind in _ROPE:
            assert ours.rope_parameters[kind]["rope_theta"] == theirs.rope_parameters[kind]["rope_theta"]
        modes = theirs.kv_sharing_modes
        assert [s is not None for s in kv_sources(ours)] == [m == "reuse" for m in modes]


def test_config_errors_name_the_key():
    from autolm.models.gemma3n import Gemma3nConfig, Gemma3nTextConfig

    small = dict(num_hidden_layers=2, num_kv_shared_layers=0)
    cases = {
        "intermediate_size": dict(intermediate_size=[8, 8, 8]),
        "activation_sparsity_pattern": dict(activation_sparsity_pattern=[0.5, 1.0]),
        "altup_num_inputs": dict(altup_num_inputs=0),
        "altup_active_idx": dict(altup_active_idx=4),
        "altup_coef_clip": dict(altup_coef_clip=-1),
        "altup_correct_scale": dict(altup_correct_scale="yes"),
        "laurel_rank": dict(laurel_rank=0),
        "hidden_size_per_layer_input": dict(hidden_size_per_layer_input=0),
        "vocab_size_per_layer_input": dict(vocab_size_per_layer_input=0),
        "num_kv_shared_layers": dict(num_kv_shared_layers=2),
        "num_kv_shared_layers is 1: layer 1": dict(num_kv_shared_layers=1,
                                                   layer_types=["sliding_attention", "full_attention"]),
    }  # fmt: skip
    for key, kwargs in cases.items():
        with pytest.raises(ConfigError, match=key):
            Gemma3nTextConfig(**{**small, **kwargs})
    with pytest.raises(ConfigError, match="text_config"):
        Gemma3nConfig.from_dict({"text_config": None})


def test_cli(tmp_path_factory, tmp_path):
    """No Gemma 3n chat template among the test data: Gemma's (gemma-1.1-it), the closest (Gemma 3n's own is
    Gemma 3's turn format)."""
    long = Family(MAIN.config_cls, dict(MAIN.kwargs, max_position_embeddings=2048), lora_targets=_TARGETS)
    check_cli(long, "gemma-1.1-it.jinja", tmp_path_factory, tmp_path, "Gemma3nForCausalLM (gemma3n_text)")


# ---- GGUF: llama.cpp's Gemma3NModel converter (conversion/gemma.py), arch "gemma3n" ----------------------------

# what llama.cpp's graph runs: 4 streams, laurel_rank 64, 256-wide per-layer inputs, sparsity on the first 10
# layers (here all), no KV sharing under 21 layers (it shares from layer 20 on), soft-capping at 30; a wide MLP, so
# that its sparsity cut-off (mean + 1.645 std over the features, llama.cpp's std unbiased) moves little
GGUF = Family("Gemma3nTextConfig", dict(_SIZES, num_hidden_layers=4, layer_types=_TYPES, num_kv_shared_layers=0,
                                        intermediate_size=512, final_logit_softcapping=30.0, hidden_size_per_layer_input=256,
                                        vocab_size_per_layer_input=VOCAB, laurel_rank=64,
                                        activation_sparsity_pattern=[0.95] * 4),
              lora_targets=_TARGETS)  # fmt: skip
IDS = torch.tensor([[5, 17, 33, 2, 98, 140, 7, 61, 120, 9, 44]])


def _metadata(w, hp: dict) -> None:
    """TextModel's, Gemma3Model's and Gemma3NModel's set_gguf_parameters (the last value of each key)."""
    rope = hp["rope_parameters"]
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_file_type(0)
    w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_sliding_window(hp["sliding_window"])
    w.add_altup_active_idx(hp["altup_active_idx"])
    w.add_altup_num_inputs(hp["altup_num_inputs"])
    w.add_embedding_length_per_layer_input(hp["hidden_size_per_layer_input"])
    w.add_shared_kv_layers(hp["num_kv_shared_layers"])
    normal = torch.distributions.normal.Normal(0, 1)
    w.add_activation_sparsity_scale(
        [normal.icdf(torch.tensor(s, dtype=torch.float32)).item() for s in hp["activation_sparsity_pattern"]]
    )
    w.add_sliding_window_pattern([t == "sliding_attention" for t in hp["layer_types"]])


def _converted(hf, hp: dict):
    """(gguf-py's name, tensor) as Gemma3NModel.filter_tensors / modify_tensors give them."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3N, hp["num_hidden_layers"])
    stacks: dict[str, list] = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue
        if name.endswith("_scale"):
            name += ".weight"
        if "embed_tokens" in name and t.shape[0] < hp["vocab_size"]:
            t = torch.cat([t, t.new_zeros(hp["vocab_size"] - t.shape[0], t.shape[1])])
        if "altup_projections" in name or "altup_unembed_projections" in name:
            stem = name.rsplit(".", 2)[0]
            stacks.setdefault(stem, []).append(t)
            if len(stacks[stem]) < 3:
                continue
            name, t = f"{stem}.weight", torch.stack(stacks[stem])
        yield names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy()


def write_gemma3n_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's Gemma3NModel converter makes of transformers' Gemma 3n `hf` (its folder's config.json
    read as the converter reads it); `kind` "Q8_0" quantizes the layers' matrices whose rows are whole blocks."""
    import gguf
    from gguf_mimic import add_toy_vocab

    hp = json.load(open(f"{hf.name_or_path}/config.json"))
    hp = {**hp, **hp.get("text_config", {})}
    w = gguf.GGUFWriter(path, "gemma3n")
    _metadata(w, hp)
    add_toy_vocab(w)
    for new, data in _converted(hf, hp):
        if kind != "F32" and data.ndim == 2 and new.startswith("blk.") and data.shape[-1] % 32 == 0:
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
        return (
            model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
            .logits[mask.bool()]
            .float()
        )


def test_gguf_in_llama_cpp_layout(tmp_path_factory, tmp_path):
    """The converter's file loads as Gemma3nForCausalLM with transformers' config and logits; its Q8_0 version,
    kept in its blocks, close."""
    import os

    directory, hf = GGUF.checkpoint(tmp_path_factory)
    hf.name_or_path = directory
    write_gemma3n_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c, want = model.config, autolm.AutoConfig.from_pretrained(directory)
    assert type(model).__name__ == "Gemma3nForCausalLM"
    for key in ("layer_types", "rope_parameters", "intermediate_size", "activation_sparsity_pattern", "head_dim",
                "num_kv_shared_layers", "hidden_size_per_layer_input", "laurel_rank", "altup_num_inputs",
                "final_logit_softcapping", "sliding_window", "vocab_size_per_layer_input"):  # fmt: skip
        assert getattr(c, key) == getattr(want, key), key
    ids, mask = padded_batch()
    theirs = _logits(hf, ids, mask)
    torch.testing.assert_close(_logits(model, ids, mask), theirs, atol=1e-4, rtol=1e-4)
    write_gemma3n_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert (_logits(q, ids, mask) - theirs).abs().mean() <= 0.06 * theirs.abs().mean()
    if os.environ.get("GEMMA3N_KEEP"):  # for llama.cpp's own check (/tmp/w/lcp_check.py)
        write_gemma3n_gguf(hf, os.environ["GEMMA3N_KEEP"] + "/ref.gguf")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]), "activation_sparsity_pattern"),
        (dict(num_kv_shared_layers=2), "num_kv_shared_layers"),
        (dict(laurel_rank=32), "laurel_rank"),
        (dict(hidden_size_per_layer_input=128), "hidden_size_per_layer_input"),
        (dict(altup_num_inputs=3), "altup_num_inputs"),
        (dict(altup_correct_scale=False), "altup_correct_scale"),
        (dict(intermediate_size=[512, 64, 512, 64]), "intermediate_size"),
        (dict(final_logit_softcapping=10.0), "final_logit_softcapping"),
        (dict(hidden_activation="gelu"), "hidden_act"),
    ],
    ids=[
        "sparsity",
        "kv_sharing",
        "laurel_rank",
        "per_layer_width",
        "streams",
        "correct_scale",
        "mlp_widths",
        "softcap",
        "act",
    ],
)
def test_what_llama_cpp_cannot_run_is_refused(change, field, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """What llama.cpp's graph fixes otherwise: a ConfigError naming the field, no file."""
    import os

    from autolm.gguf_writer import save_gguf

    family = Family("Gemma3nTextConfig", dict(GGUF.kwargs, **change))
    directory, _ = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with pytest.raises(ConfigError, match=field):
        save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert os.listdir(tmp_path) == []
