"""Gemma 4 (text) against transformers and peft: the family battery on two tiny checkpoints with every quirk switched
on. DENSE (Gemma 4 31B's layout): sliding and full layers, the full ones with their own head size and one KV head
(global_head_dim, num_global_key_value_heads), attention_k_eq_v (no v_proj on full layers), proportional RoPE with a
partial rotary factor and a factor on the full layers, q/k/v norms, final soft-capping, a window shorter than the
prompts. MOE (26B-A4B's): the dense MLP and the experts side by side, full layers with no k_eq_v. SMALL (E2B /
E4B's): per-layer input embeddings, the last three layers sharing the keys and values of the last earlier layer of
their attention type (both types among them), double-wide MLPs on the shared layers. SHARED: KV sharing without
per-layer inputs, its full layers' values their keys (attention_k_eq_v). Also: random layer_scalar values, the
image-text checkpoint's language model, the config's defaults and errors, and the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions, randomize
from family_checks import Family, same_logits
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
                       "factor": 2.0},
}  # fmt: skip
_SIZES = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64, sliding_window=4, hidden_size_per_layer_input=0, rope_parameters=_ROPE,
              final_logit_softcapping=10.0)  # fmt: skip
_TARGETS = [
    "q_proj",
    "v_proj",
]  # peft's default for gemma4 matches only the image-text model's language_model
DENSE = Family("Gemma4TextConfig", dict(_SIZES, num_hidden_layers=4, global_head_dim=32, num_global_key_value_heads=1,
                                        attention_k_eq_v=True, layer_types=["sliding_attention", "full_attention"] * 2),
               lora_targets=_TARGETS)  # fmt: skip
# the full layers' heads as the sliding ones'
MOE = Family("Gemma4TextConfig", dict(_SIZES, num_hidden_layers=3, global_head_dim=16, enable_moe_block=True,
                                      num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                                      layer_types=["sliding_attention", "full_attention", "full_attention"]),
             lora_targets=_TARGETS)  # fmt: skip
_SMALL_TYPES = [
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
]
SMALL = Family("Gemma4TextConfig", dict(_SIZES, num_hidden_layers=5, global_head_dim=32, layer_types=_SMALL_TYPES,
                                        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                                        num_kv_shared_layers=3, use_double_wide_mlp=True),
               lora_targets=_TARGETS)  # fmt: skip
SHARED = Family("Gemma4TextConfig", dict(_SIZES, num_hidden_layers=4, global_head_dim=32, num_global_key_value_heads=1,
                                         attention_k_eq_v=True, num_kv_shared_layers=2,
                                         layer_types=["sliding_attention", "full_attention"] * 2),
                lora_targets=_TARGETS)  # fmt: skip
FAMILIES = {"dense": DENSE, "moe": MOE, "small": SMALL}
families = pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))


@families
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


@families
def test_generate_greedy_and_beam(family, tmp_path_factory):
    family.check_generate(tmp_path_factory)


@families
def test_bf16(family, tmp_path_factory):
    family.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("family", [DENSE, MOE, SMALL, SHARED], ids=["dense", "moe", "small", "shared"])
def test_one_token_step(family, tmp_path_factory):
    """The eager one-token step runs per-layer inputs and KV-shared layers (OneToken.attend_shared) too."""
    from autolm import step

    directory, _ = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    model.decode_mode = "eager"
    with torch.no_grad():
        assert isinstance(step.decoder(model, model.make_cache(1, 4)), step.OneTokenStep)
    family.check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("family", [SMALL, SHARED], ids=["small", "shared"])
def test_compiled_graphs_refuse_small_layers(family, tmp_path_factory):
    """A compiled one-token graph holds one layer and its own cache buffers: a layer with per-layer inputs or
    one reading another layer's keys and values fails to export, and the model declines the compiled step."""
    from autolm.errors import GenerationError
    from autolm.step import graphs

    directory, _ = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises((GenerationError, NotImplementedError)):
        graphs.exported(model)
    # so the model says so: nothing is compiled for it (no warning, no background compile), the eager step runs
    assert not model.compiled_graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.precompile_decode() is False


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    MOE.check_compiled_step(tmp_path_factory, home)


def test_compiled_step_per_layer_cache_shapes(tmp_path_factory, home):  # noqa: F811
    DENSE.check_compiled_step(tmp_path_factory, home)


@families
def test_lora(family, tmp_path_factory, tmp_path):
    family.check_lora(tmp_path_factory, tmp_path)


@families
@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(family, bits, tmp_path_factory):
    family.check_quantized(tmp_path_factory, bits)


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
    assert ours["per_layer_config"] == theirs["per_layer_config"]
    assert ours["rope_parameters"] == theirs["rope_parameters"]


@families
def test_disk_offload(family, tmp_path_factory, tmp_path):
    family.check_disk_offload(tmp_path_factory, tmp_path)


# transformers' forward of KV-shared layers without per-layer inputs fails (it slices their absent per-layer inputs
# before the shared layers) unless asked for hidden states, which leaves the sequence whole
_WHOLE = dict(output_hidden_states=True)


def test_shared_logits_and_generate(tmp_path_factory):
    """KV sharing alone: transformers' logits, greedy and beam tokens (a left-padded batch and one row)."""
    directory, hf = SHARED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask), **_WHOLE).logits
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    ids, mask = padded_batch(lengths=(9, 5))
    for kwargs in (dict(max_new_tokens=12), dict(max_new_tokens=8, num_beams=3)):
        ours = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        theirs = hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs, **_WHOLE)
        assert torch.equal(ours, theirs), kwargs
    row = ids[:1, -9:]
    assert torch.equal(model.generate(row, max_new_tokens=16, do_sample=False),
                       hf.generate(row, max_new_tokens=16, do_sample=False, **_WHOLE))  # fmt: skip


@pytest.mark.parametrize("family", [SMALL, SHARED], ids=["small", "shared"])
def test_kv_sharing_without_cache_and_in_pieces(family, tmp_path_factory):
    """Without a cache the shared layers read their producers' keys and values of the same forward; two forward
    pieces through the cache give the whole prompt's logits; the shared layers' cache buffers are zero wide."""
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    pos, real = positions(mask), mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=pos, use_cache=False, **_WHOLE).logits
        plain = model(ids, attention_mask=mask, position_ids=pos, use_cache=False)
        first = model(ids[:, :8], attention_mask=mask[:, :8], position_ids=pos[:, :8])
        second = model(
            ids[:, 8:], attention_mask=mask, position_ids=pos[:, 8:], past_key_values=first.past_key_values
        )
    assert plain.past_key_values is None
    torch.testing.assert_close(plain.logits[real], theirs[real], atol=1e-4, rtol=1e-4)
    pieces = torch.cat([first.logits, second.logits], 1)
    torch.testing.assert_close(pieces[real], theirs[real], atol=1e-4, rtol=1e-4)
    widths = [k.shape[-1] for k in first.past_key_values.keys]
    n = family.kwargs["num_hidden_layers"]
    assert widths[n - family.kwargs["num_kv_shared_layers"] :] == [0] * family.kwargs["num_kv_shared_layers"]
    assert all(widths[: n - family.kwargs["num_kv_shared_layers"]])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_small_training_gradients(checkpointing, tmp_path_factory):
    """Training (no cache, gradient checkpointing or not): transformers' loss and gradients, the shared layers'
    gradients reaching their producers' k_proj and the per-layer embeddings."""
    directory, _ = SMALL.checkpoint(tmp_path_factory)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").train()
    model = autolm.AutoModelForCausalLM.from_pretrained(directory).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = model(ids, labels=ids)
    theirs = hf(ids, labels=ids)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    grads = dict(hf.named_parameters())
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.embed_tokens_per_layer.weight", "model.per_layer_model_projection.weight",
                 "model.layers.4.per_layer_input_gate.weight", "model.layers.3.self_attn.q_proj.weight"):  # fmt: skip
        ours_grad = model.get_parameter(name).grad
        assert ours_grad is not None and ours_grad.abs().sum() > 0, name
        torch.testing.assert_close(ours_grad, grads[name].grad, atol=1e-5, rtol=1e-4)


def test_small_inputs_embeds_and_ignored_shared_projections(tmp_path_factory, tmp_path):
    """inputs_embeds (the scaled token embeddings) give the ids' logits: the per-layer inputs are looked up by id;
    other vectors are refused. A checkpoint that still holds the shared layers' k/v projections and norms loads
    (transformers ignores them too)."""
    from safetensors.torch import save_file

    from autolm.errors import GenerationError

    directory, hf = SMALL.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    pos, real = positions(mask), mask.bool()
    with torch.no_grad():
        embeds = hf.model.embed_tokens(ids)
        ours = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        theirs = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
        with pytest.raises(GenerationError, match="inputs_embeds"):
            model(inputs_embeds=embeds + 0.5, attention_mask=mask, position_ids=pos)
    tensors = load_file(f"{directory}/model.safetensors")
    for i in (2, 3, 4):
        tensors[f"model.layers.{i}.self_attn.k_proj.weight"] = torch.zeros(16 * (2 if i < 4 else 1), 64)
        tensors[f"model.layers.{i}.self_attn.k_norm.weight"] = torch.ones(16)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(f"{directory}/config.json").read())
    loaded = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(hf.state_dict())
    with torch.no_grad():
        again = loaded(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(again[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_small_compile_decode_step_function(tmp_path_factory):
    """compile_decode's step (the general forward over the cache's capacity, from the embedded tokens: their
    per-layer part rides along), run uncompiled here, gives the general forward's tokens."""
    directory, hf = SMALL.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5))
    plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    model.decode_step = model.step
    stepped = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert torch.equal(stepped, plain)
    assert torch.equal(plain, hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10))


def test_small_resize_token_embeddings(tmp_path_factory):
    """Resizing the vocabulary resizes the per-layer embeddings too, as transformers does."""
    directory, _ = SMALL.checkpoint(tmp_path_factory)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    hf.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
    model.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
    assert model.model.embed_tokens_per_layer.weight.shape == hf.model.embed_tokens_per_layer.weight.shape
    assert model.config.vocab_size_per_layer_input == hf.config.vocab_size_per_layer_input == VOCAB + 8
    torch.testing.assert_close(model.model.embed_tokens_per_layer.weight[:VOCAB],
                               hf.model.embed_tokens_per_layer.weight[:VOCAB])  # fmt: skip


def test_kv_cache_takes_each_layers_shape(tmp_path_factory):
    directory, _ = DENSE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    cache = model.make_cache(2, 10)
    assert [tuple(k.shape) for k in cache.keys] == [(2, 2, 10, 16), (2, 1, 10, 32)] * 2
    assert (
        model.model.layers[1].self_attn.v_proj is None and model.model.layers[0].self_attn.v_proj is not None
    )


def _transformers_checkpoint(tmp_path, kwargs, image_text=False):
    """A transformers Gemma 4 checkpoint with random weights and random layer_scalar values."""
    import transformers

    text = transformers.Gemma4TextConfig(
        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs
    )
    torch.manual_seed(0)
    if image_text:
        config = transformers.Gemma4Config(text_config=text, vision_config=None, audio_config=None)
        model = transformers.Gemma4ForConditionalGeneration(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(text)
    randomize(model)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                buf.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    return model.eval()


@pytest.mark.parametrize("family", [DENSE, MOE, SMALL], ids=["dense", "moe", "small"])
def test_layer_scalar(family, tmp_path):
    """Each layer's output times its layer_scalar (a buffer the checkpoint holds, one in a fresh model)."""
    hf = _transformers_checkpoint(tmp_path, family.kwargs)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert float(model.model.layers[0].layer_scalar) != 1.0
    same_logits(model, hf)


@pytest.mark.parametrize("family", [DENSE, SMALL], ids=["dense", "small"])
def test_image_text_checkpoint(family, tmp_path):
    """model_type gemma4: the language model of Gemma4ForConditionalGeneration (soft-capped, as transformers does),
    saved as the text model transformers' Gemma4ForCausalLM loads."""
    import transformers

    hf = _transformers_checkpoint(tmp_path / "it", family.kwargs, image_text=True)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "it")
    assert type(model).__name__ == "Gemma4ForCausalLM" and model.config.final_logit_softcapping == 10.0
    same_logits(model, hf)
    model.save_pretrained(tmp_path / "text")
    text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    assert type(text).__name__ == "Gemma4ForCausalLM"
    same_logits(model, text.eval())


def test_config_defaults_are_transformers():
    import transformers

    from autolm.models.gemma4 import Gemma4TextConfig
    from autolm.models.gemma4_small import kv_sources

    for kwargs in (dict(num_hidden_layers=8), dict(num_hidden_layers=4, layer_types=["full_attention",
                                                                                      "sliding_attention"] * 2)):  # fmt: skip
        kwargs["hidden_size_per_layer_input"] = 0
        ours, theirs = Gemma4TextConfig(**kwargs), transformers.Gemma4TextConfig(**kwargs)
        assert ours.layer_types == theirs.layer_types
        assert ours.rope_parameters == theirs.rope_parameters
        for i in range(ours.num_hidden_layers):
            assert ours.layer_head_dim(i) == theirs.per_layer_config[i].head_dim
            assert ours.layer_kv_heads(i) == theirs.per_layer_config[i].num_key_value_heads
    for layers, shared in ((35, 20), (42, 18), (12, 4)):  # many layers, many of them shared
        ours = Gemma4TextConfig(num_hidden_layers=layers, num_kv_shared_layers=shared)
        modes = transformers.Gemma4TextConfig(
            num_hidden_layers=layers, num_kv_shared_layers=shared
        ).kv_sharing_modes
        sources = kv_sources(ours)
        assert [s is not None for s in sources] == [m == "reuse" for m in modes]
        assert {s for s in sources if s is not None} == {i for i, m in enumerate(modes) if m == "store"}
        assert all(ours.layer_types[i] == ours.layer_types[s] for i, s in enumerate(sources) if s is not None)
    ours = Gemma4TextConfig(
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        num_hidden_layers=6,
        hidden_size_per_layer_input=0,
    )
    assert [ours.layer_kv_heads(i) for i in range(6)] == [4] * 5 + [1]


def test_config_errors_name_the_key():
    from autolm.models.gemma4 import Gemma4Config, Gemma4TextConfig

    small = dict(num_hidden_layers=2, hidden_size_per_layer_input=0)
    cases = {
        "use_bidirectional_attention": dict(use_bidirectional_attention="all"),
        "hidden_size_per_layer_input": dict(hidden_size_per_layer_input=-1),
        "vocab_size_per_layer_input": dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=0),
        "num_kv_shared_layers": dict(num_kv_shared_layers=2),
        "num_kv_shared_layers is 1: layer 1": dict(num_hidden_layers=2, num_kv_shared_layers=1,
                                                   layer_types=["sliding_attention", "full_attention"]),
        "per_layer_config gives layer 2": dict(num_hidden_layers=3, num_kv_shared_layers=1,
                                               layer_types=["full_attention"] * 3,
                                               per_layer_config={"2": {"num_key_value_heads": 1}}),
        "top_k_experts": dict(enable_moe_block=True, num_experts=2, top_k_experts=3, moe_intermediate_size=8),
        "moe_intermediate_size": dict(enable_moe_block=True, num_experts=2, top_k_experts=1),
        "partial_rotary_factor": dict(rope_parameters={"sliding_attention": _ROPE["sliding_attention"],
                                                       "full_attention": {"rope_type": "proportional",
                                                                          "rope_theta": 1.0,
                                                                          "partial_rotary_factor": 2}}),
        "rope_parameters": dict(rope_parameters={"sliding_attention": _ROPE["sliding_attention"]}),
        "per_layer_config": dict(per_layer_config={"1": {"intermediate_size": 8}}),
        "global_head_dim": dict(global_head_dim=0),
        "attention_k_eq_v": dict(attention_k_eq_v="yes"),
    }  # fmt: skip
    for key, kwargs in cases.items():
        with pytest.raises(ConfigError, match=key):
            Gemma4TextConfig(**{**small, **kwargs})
    with pytest.raises(ConfigError, match="text_config"):
        Gemma4Config.from_dict({"text_config": None})
    assert Gemma4TextConfig(**small, use_bidirectional_attention="vision").layer_types[-1] == "full_attention"


def test_cli(tmp_path_factory, tmp_path):
    """No Gemma 4 chat template among the test data: Gemma's (gemma-1.1-it), the closest."""
    long = Family(DENSE.config_cls, dict(DENSE.kwargs, max_position_embeddings=2048), lora_targets=_TARGETS)
    check_cli(long, "gemma-1.1-it.jinja", tmp_path_factory, tmp_path, "Gemma4ForCausalLM (gemma4_text)")
