"""GPT-Neo (EleutherAI/gpt-neo-125M / 1.3B / 2.7B) against transformers and peft: learned positions under left
padding, global and local layers as `attention_types` lists them (a local layer sees `window_size` slots), scores
without 1/sqrt(head_dim) and in float32 whatever the dtype, q/k/v without bias and out_proj with one under
`attn.attention`, the gelu_new c_fc / c_proj MLP, the tied head; a variant with another layer pattern, window,
MLP width, activation and epsilon and an untied head. The battery, config.json in GPT-Neo's names (attention_layers
derived and written back), old files' attention-mask buffers, token_type_ids. llama.cpp has no GPT-Neo: no GGUF."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from safetensors.torch import load_file, save_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, GenerationError
from autolm.models.gpt_neo import GPTNeoConfig

# gpt-neo-125M's shape: global/local pairs, gelu_new, the tied head (widths divide int4's groups of 32)
NEO = Family(
    "GPTNeoConfig",
    dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=4,
         max_position_embeddings=64),
)  # fmt: skip
# local, global, local; another window, an MLP width not 4 * hidden, exact GELU, a larger epsilon, an untied head
VARIANT = Family(
    "GPTNeoConfig",
    dict(hidden_size=64, num_layers=3, num_heads=8, attention_types=[[["local"], 1], [["global", "local"], 1]],
         window_size=6, intermediate_size=96, activation_function="gelu", layer_norm_epsilon=1e-3,
         max_position_embeddings=64, tie_word_embeddings=False),
)  # fmt: skip
FAMILIES = {"neo": NEO, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    NEO.check_bf16(tmp_path_factory)


def test_scores_in_float32(tmp_path_factory):
    """In bf16, scores and softmax in float32 as transformers computes them: keys sharing a large part (scores in
    the hundreds, a few apart, which bf16 would round to multiples of 4) and values apart, on q/k/v weights and
    inputs bf16 holds exactly: layer 0's attention gives transformers' bf16 output within bf16's rounding of it
    (scores rounded to bf16 move it by more than 1)."""
    import transformers

    from autolm.nn import Forward

    directory, _ = NEO.checkpoint(tmp_path_factory)
    bf16 = torch.bfloat16
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=bf16, attn_implementation="eager"
    )
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=bf16)
    ours_attn, theirs_attn = (
        model.transformer.h[0].attn.attention,
        theirs_model.transformer.h[0].attn.attention,
    )
    g = torch.Generator().manual_seed(0)
    ints = lambda lo, hi, *shape: torch.randint(lo, hi, shape, generator=g).to(bf16)  # noqa: E731
    q, k, v = ints(-1, 2, 64, 64), ints(-1, 2, 64, 64), ints(-1, 2, 64, 64)
    q[:, 12:], v[:, 12:] = 0, 0  # queries and values from each token's own unit vector, keys mostly shared
    with torch.no_grad():
        for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            getattr(ours_attn, name).weight.copy_(w)
            getattr(theirs_attn, name).weight.copy_(w)
        x = torch.cat([torch.eye(12), ints(-8, 9, 1, 52).float().expand(12, 52) * 8], -1).to(bf16)[None]
        ours = ours_attn(x, Forward({}, None, torch.arange(12), 12, None, 1)).float()
        theirs = theirs_attn(x)[0].float()
    assert (ours - theirs).abs().max() <= 0.02 < theirs.abs().mean()


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    NEO.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    """peft's default targets for gpt_neo (q_proj, v_proj), both ways."""
    NEO.check_lora(tmp_path_factory, tmp_path)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    NEO.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (attn.attention.*, no q/k/v biases); config.json round-trips in
    GPT-Neo's names, attention_layers included; no tensor-parallel plan, as in transformers."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert model.config.attention_layers == hf.config.attention_layers
    assert model.config.num_layers == hf.config.num_layers and model.config.num_heads == hf.config.num_heads
    attn = model.transformer.h[0].attn.attention
    assert attn.q_proj.bias is None and attn.out_proj.bias is not None and attn.scaling == 1.0
    tied = model.lm_head.weight is model.transformer.wte.weight
    assert tied == (name == "neo") and model.tp_plan() == ({} if tied else {"transformer.wte": "embedding",
                                                                             "lm_head": "lm_head"})  # fmt: skip
    with pytest.raises(ConfigError, match="'gpt_neo' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(
            FAMILIES[name].checkpoint(tmp_path_factory)[0], tp_plan="auto"
        )


def test_local_layers_see_their_window(tmp_path_factory):
    """Each layer's window follows attention_types (local: window_size, global: none); prompts longer than the window
    need it: with every layer global the logits change."""
    directory, _ = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    layers = [block.attn.attention for block in model.transformer.h]
    assert [a.sliding_window for a in layers] == [6, None, 6]
    assert [block.attn.attention_type for block in model.transformer.h] == ["local", "global", "local"]
    ids, mask = padded_batch()
    with torch.no_grad():
        windowed = model(ids, attention_mask=mask).logits
        for a in layers:
            a.sliding_window = None
        everything = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(windowed[:, :6][real[:, :6]], everything[:, :6][real[:, :6]], atol=1e-5)
    assert not torch.allclose(windowed[real], everything[real], atol=1e-3)


def test_old_files_with_mask_buffers_and_a_head(tmp_path_factory, tmp_path):
    """Files saved by older transformers carry each layer's attn.attention.bias / masked_bias buffers and the tied
    lm_head.weight: they load with transformers' logits, and save as transformers saves."""
    directory, hf = NEO.checkpoint(tmp_path_factory)
    old = load_file(os.path.join(directory, "model.safetensors"))
    n = hf.config.max_position_embeddings
    for i in range(hf.config.num_layers):
        old[f"transformer.h.{i}.attn.attention.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(
            1, 1, n, n
        )
        old[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    old["lm_head.weight"] = old["transformer.wte.weight"].clone()
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with open(tmp_path / "config.json", "w") as f:
        f.write(open(os.path.join(directory, "config.json")).read())
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "resaved")
    assert set(load_file(tmp_path / "resaved" / "model.safetensors")) == set(
        load_file(os.path.join(directory, "model.safetensors"))
    )


def test_token_type_ids_and_the_position_limit(tmp_path_factory):
    """token_type_ids are embedded by wte and added, as transformers does; a position past max_position_embeddings
    is a clear error."""
    directory, hf = NEO.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    types = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask), token_type_ids=types).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask), token_type_ids=types).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    with pytest.raises(GenerationError, match="GPT-Neo's 64 learned positions \\(max_position_embeddings\\)"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_default_config_is_transformers():
    """GPTNeoConfig() writes transformers' GPTNeoConfig() (attention_types [[["global", "local"], 12]], window
    256, intermediate_size null, ...), and reads config.json's names as attributes."""
    import transformers

    theirs = json.loads(transformers.GPTNeoConfig().to_json_string())
    theirs.pop("transformers_version")
    assert GPTNeoConfig().to_dict() == theirs
    check_config_defaults(GPTNeoConfig)
    c = GPTNeoConfig(num_layers=2, num_heads=4, hidden_size=64, attention_types=[[["local"], 2]])
    assert (c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.head_dim) == (2, 4, 256, 16)
    assert [c.layer_window(i) for i in range(2)] == [256, 256]


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            dict(attention_types=[[["global", "local"], 2]]),
            "attention_types gives 4 layers but num_layers is 2",
        ),
        (dict(attention_types=[[["sliding"], 2]]), "attention_types"),
        (dict(attention_types="global"), "attention_types"),
        (dict(window_size=0), "window_size"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(activation_function="swiglu"), "activation_function"),
        (dict(num_heads=5), "num_heads"),
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
        (dict(resid_dropout=2), "resid_dropout"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="gpt_neo", hidden_size=64, num_layers=2, num_heads=4, vocab_size=VOCAB,
                attention_types=[[["global", "local"], 1]])  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)
