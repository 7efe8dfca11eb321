"""Gemma 2 and Gemma 3 (text) against transformers and peft: the family battery on tiny checkpoints with every quirk
switched on (attention and final soft-capping, query_pre_attn_scalar != head_dim, windows shorter than the
prompts, alternating layer types, Gemma 3's q/k norms and per-layer-type RoPE with linear scaling on the global
layers), the older config spellings, user-given inputs_embeds, GGUF files in llama.cpp's layout, the real chat
templates and the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from chat_checks import run_cli
from conftest import VOCAB, padded_batch, positions, write_char_tokenizer
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, TokenizerError

_SIZES = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
              max_position_embeddings=64, sliding_window=4)  # fmt: skip
_ROPE3 = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
}
GEMMA2 = Family("Gemma2Config", dict(_SIZES, num_hidden_layers=3, query_pre_attn_scalar=20,
                                     attn_logit_softcapping=5.0, final_logit_softcapping=10.0))  # fmt: skip
# attn_logit_softcapping is set where transformers' Gemma 3 ignores it: autolm must too
GEMMA3 = Family("Gemma3TextConfig", dict(_SIZES, num_hidden_layers=4, query_pre_attn_scalar=20,
                                         layer_types=["sliding_attention", "full_attention"] * 2,
                                         rope_parameters=_ROPE3, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=10.0))  # fmt: skip
FAMILIES = {"gemma2": GEMMA2, "gemma3": GEMMA3}
# What llama.cpp's converter can express: the attention scale is head_dim (it derives it), Gemma 3's layers follow
# the default pattern (5 sliding, 1 global) and it has no attention soft-capping.
GGUF_FAMILIES = {
    "gemma2": Family("Gemma2Config", dict(_SIZES, num_hidden_layers=3, query_pre_attn_scalar=24,
                                          attn_logit_softcapping=5.0, final_logit_softcapping=10.0)),
    "gemma3": Family("Gemma3TextConfig", dict(_SIZES, num_hidden_layers=7, query_pre_attn_scalar=24,
                                              rope_parameters=_ROPE3, final_logit_softcapping=10.0)),
}  # fmt: skip
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


@families
def test_one_token_step(family, tmp_path_factory):
    family.check_one_token_step(tmp_path_factory)


@families
def test_compiled_step(family, tmp_path_factory, home):  # noqa: F811
    family.check_compiled_step(tmp_path_factory, home)


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


@families
def test_disk_offload(family, tmp_path_factory, tmp_path):
    family.check_disk_offload(tmp_path_factory, tmp_path)


@families
def test_inputs_embeds_are_taken_as_given(family, tmp_path_factory):
    """transformers scales token embeddings inside its embedding module: embeddings a user passes are not scaled
    again (and ids give the same logits as their scaled embeddings)."""
    directory, hf = family.checkpoint(tmp_path_factory)
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


def test_gemma3_older_config_spelling(tmp_path_factory, tmp_path):
    """transformers 4's Gemma 3 config: rope_theta (global layers), rope_local_base_freq, rope_scaling (global only),
    sliding_window_pattern instead of layer_types, a legacy hidden_act transformers ignores. Read as transformers
    reads it, written back as transformers writes it."""
    import transformers

    def v4(d):
        rope = d.pop("rope_parameters")
        del d["layer_types"], d["_sliding_window_pattern"]
        d.update(rope_theta=rope["full_attention"]["rope_theta"], sliding_window_pattern=2,
                 rope_local_base_freq=rope["sliding_attention"]["rope_theta"], hidden_act="gelu",
                 rope_scaling={"rope_type": "linear", "factor": 2.0})  # fmt: skip

    directory = _rewrite_config(GEMMA3.checkpoint(tmp_path_factory)[0], tmp_path / "v4", v4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.layer_types == hf.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert model.config.hidden_act == "gelu_pytorch_tanh"  # hidden_activation; hidden_act is not read
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(ours, hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real],
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["rope_parameters"]["sliding_attention"]["rope_theta"] == 100.0
    assert saved["rope_parameters"]["full_attention"]["rope_type"] == "linear"
    assert saved["hidden_act"] == "gelu" and saved["hidden_activation"] == "gelu_pytorch_tanh"
    back = transformers.AutoConfig.from_pretrained(tmp_path / "saved")
    assert back.rope_parameters == hf.config.rope_parameters and back.layer_types == hf.config.layer_types


def test_gemma3_image_text_checkpoint_runs_its_language_model(tmp_path):
    """model_type gemma3 (Gemma 3 4B and larger: a vision tower, a projector and the language model, with the
    text settings in text_config): autolm loads the language model, skipping the vision tensors, with the logits and
    greedy tokens of transformers' AutoModelForCausalLM (Gemma3ForConditionalGeneration) on text; saved, it is the
    text model transformers' Gemma3ForCausalLM loads. (The image-text model applies no final soft-capping, though
    GEMMA3's text config sets one.)"""
    import transformers
    from conftest import randomize

    text = dict(GEMMA3.kwargs, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
                                       eoi_token_index=VOCAB - 2)  # fmt: skip
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "mm")
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["model_type"] == "gemma3"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "mm", attn_implementation="eager"
    ).eval()
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mm")
    assert (
        model.config.model_type == "gemma3_text" and model.config.layer_types == GEMMA3.kwargs["layer_types"]
    )
    ids = torch.randint(3, VOCAB - 3, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)
        greedy = dict(max_new_tokens=6, do_sample=False)
        assert model.generate(ids, **greedy).tolist() == hf.generate(ids, **greedy).tolist()
    model.save_pretrained(tmp_path / "text")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    assert type(back).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, atol=1e-4, rtol=1e-4)
    _image_text_adapter(hf, model, ids, want, tmp_path)
    d = json.loads((tmp_path / "mm" / "config.json").read_text())
    del d["text_config"]
    (tmp_path / "mm" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="text_config"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mm")


def _image_text_adapter(hf, model, ids, base, tmp_path):
    """A peft adapter trained on the image-text model (its tensors named model.language_model.*, and the vision
    tower's q/v projections targeted too): loaded on autolm's language model, the text logits are peft's."""
    import peft

    from autolm.lora import PeftModel

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(hf, config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = PeftModel.from_pretrained(model, tmp_path / "adapter")
    with torch.no_grad():
        want = theirs(ids).logits
        assert (want - base).abs().max() > 1e-2  # the adapter changes the text logits
        torch.testing.assert_close(ours(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_config_errors_name_the_key(tmp_path_factory, tmp_path):
    directory = GEMMA3.checkpoint(tmp_path_factory)[0]
    for i, (change, key) in enumerate([
        (lambda d: d.update(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
        (lambda d: d.update(final_logit_softcapping="30"), "final_logit_softcapping"),
        (lambda d: d.update(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (lambda d: d.update(rope_parameters={"full_attention": "linear"}), "full_attention"),
        (lambda d: [d.pop("layer_types"), d.update(sliding_window_pattern=0)], "sliding_window_pattern"),
    ]):  # fmt: skip
        bad = _rewrite_config(directory, tmp_path / str(i), change)
        with pytest.raises(ConfigError, match=key):
            autolm.AutoModelForCausalLM.from_pretrained(bad)


# ---- GGUF as llama.cpp's convert_hf_to_gguf.py writes Gemma 2 and Gemma 3 ---------------------------------------

_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip


def _gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{_GGUF_LAYER[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]


def write_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of this checkpoint (--outtype f32): its metadata keys, a
    SentencePiece-style vocabulary, 1 added to every norm weight, no lm_head (tied)."""
    import gguf

    c = hf.config
    arch = "gemma2" if c.model_type == "gemma2" else "gemma3"
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_sliding_window(c.sliding_window)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    else:
        full, local = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_freq_base_swa(local["rope_theta"])
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<bos>", "<eos>", *(f"t{i}" for i in range(3, VOCAB))])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        a = t.float().numpy()
        w.add_tensor(_gguf_name(name), a + 1 if name.endswith("norm.weight") else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", list(GGUF_FAMILIES))
def test_gguf_in_llama_cpp_layout(name, tmp_path_factory, tmp_path):
    _, hf = GGUF_FAMILIES[name].checkpoint(tmp_path_factory)
    write_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c, want = model.config, hf.config
    assert type(model).__name__ == type(hf).__name__
    assert c.layer_types == want.layer_types and c.query_pre_attn_scalar == want.query_pre_attn_scalar
    if name == "gemma3":
        assert c.layer_types.count("full_attention") == 1  # llama.cpp's default pattern: every 6th layer
        assert c.rope_parameters == want.rope_parameters
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---- chat templates and the CLI ---------------------------------------------------------------------------------

# The chat templates Gemma's instruction-tuned checkpoints ship in tokenizer_config.json (google/gemma-2-2b-it,
# google/gemma-3-*-it), copied as llama.cpp's models/templates and trl's chat_templates keep them.
GEMMA2_TEMPLATE = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '
' + message['content'] | trim + '<end_of_turn>
' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model
'}}{% endif %}"""
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""


def _tokenizer_dir(path, template: str) -> str:
    """A character tokenizer with Gemma's turn markers as special tokens, and a chat template."""
    from tokenizers import AddedToken, Tokenizer

    os.makedirs(path, exist_ok=True)
    write_char_tokenizer(str(path))
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    specials = ("<pad>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(os.path.join(path, "tokenizer.json"))
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["chat_template"] = template
    with open(config_path, "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.mark.parametrize(
    "name,template", [("gemma2", GEMMA2_TEMPLATE), ("gemma3", GEMMA3_TEMPLATE)], ids=["gemma2", "gemma3"]
)
def test_chat_template_renders_like_transformers(name, template, tmp_path):
    """Gemma's templates have no system role: Gemma 2's refuses one, Gemma 3's folds it into the first user turn."""
    import jinja2
    import transformers

    directory = _tokenizer_dir(tmp_path, template)
    ours, ref = (
        autolm.AutoTokenizer.from_pretrained(directory),
        transformers.AutoTokenizer.from_pretrained(directory),
    )
    turns = [{"role": "user", "content": " Hi there \n"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Capital of France?"}]  # fmt: skip
    system = [{"role": "system", "content": "Be brief."}]
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "In parts "}, {"type": "text", "text": "too"}]}
    ]
    conversations = [turns[:1], turns] + ([system + turns, parts, system + parts] if name == "gemma3" else [])
    for msgs in conversations:
        for gen in (True, False):
            text = ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            ids = ours.apply_chat_template(msgs, add_generation_prompt=gen)["input_ids"]
            assert ids == ref.apply_chat_template(msgs, add_generation_prompt=gen)["input_ids"]
    if name == "gemma3":
        assert "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>" in ours.apply_chat_template(
            system + turns, tokenize=False
        )
    else:
        with pytest.raises(TokenizerError, match="System role not supported"):
            ours.apply_chat_template(system + turns, tokenize=False)
        with pytest.raises(jinja2.TemplateError, match="System role not supported"):
            ref.apply_chat_template(system + turns, tokenize=False)
    with pytest.raises(TokenizerError, match="must alternate"):
        ours.apply_chat_template(turns[:1] * 2, tokenize=False)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cli_generate_chat_and_inspect(name, tmp_path_factory, tmp_path):
    """`autolm generate --chat` answers with transformers' greedy tokens; `autolm inspect` names the family."""
    import transformers

    src, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    directory = tmp_path / "model"
    shutil.copytree(src, directory)
    # transformers reads the tokenizer alone (next to a Gemma config it would pick Gemma's tokenizer class)
    tokenizer = _tokenizer_dir(
        tmp_path / "tokenizer", GEMMA3_TEMPLATE if name == "gemma3" else GEMMA2_TEMPLATE
    )
    for f in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, f), directory)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=False)  # fmt: skip
    out = hf.generate(ids, max_new_tokens=8, do_sample=False)
    want = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def cli(*args):
        code, out, err = run_cli(*args, env={"AUTOLM_HOME": str(tmp_path / "home"), "AUTOLM_EAGER": "1"})
        assert code == 0, err
        return out

    assert cli("generate", str(directory), "Hi", "--chat", "--max-new-tokens", "8").strip() == want.strip()
    shown = cli("inspect", str(directory))
    arch = "Gemma2ForCausalLM (gemma2)" if name == "gemma2" else "Gemma3ForCausalLM (gemma3_text)"
    assert arch in shown and "sliding:      [4]" in shown


@pytest.mark.parametrize("name", list(FAMILIES))
def test_norm_weights_start_at_zero(name):
    """A model built from its config (as for training) holds Gemma's norms at w = 0, i.e. a scale of 1."""
    cfg = autolm.AutoConfig.for_model(
        "gemma2" if name == "gemma2" else "gemma3_text",
        **_SIZES,
        num_hidden_layers=2,
    )
    model = autolm.AutoModelForCausalLM.from_config(cfg)
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 0).all()) for p in norms)
    assert np.isclose(model.model.embed_scale, 8.0)


# ---- the real model -------------------------------------------------------------------------------------------


def test_real_gemma3_270m_gguf_equals_transformers(gemma3_270m):
    """The real model's GGUF (K-quants, Q5_0, Q8_0 dequantized; no sliding_window_pattern or local RoPE base in
    the file): autolm reads the config llama.cpp means and gives transformers' logits and greedy tokens."""
    import transformers

    directory, name = gemma3_270m
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.head_dim, c.query_pre_attn_scalar) == (
        "gemma3_text",
        18,
        256,
        256,
    )
    assert c.layer_types == hf.config.layer_types and c.sliding_window == hf.config.sliding_window == 512
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    tok = autolm.AutoTokenizer.from_pretrained(directory, gguf_file=name)  # no merges in the file: rebuilt
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id == 2 and ids.shape[1] == 6
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=2e-4, rtol=1e-4)
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, hf.generate(ids, max_new_tokens=12, do_sample=False))
    assert "France" in tok.decode(out[0, ids.shape[1] :])


def test_configs_take_transformers_names():
    for cls in (autolm.Gemma2Config, autolm.Gemma3TextConfig):
        cfg = cls(hidden_activation="gelu", **_SIZES, num_hidden_layers=2)
        assert (
            cfg.hidden_act == cfg.hidden_activation == "gelu" and cfg.to_dict()["hidden_activation"] == "gelu"
        )
        cfg.hidden_activation = "gelu_pytorch_tanh"
        assert cfg.hidden_act == "gelu_pytorch_tanh"


def test_gguf_tokenizer_without_merges_equals_transformers(tmp_path):
    """llama.cpp writes Gemma's SentencePiece vocabulary without merges (blanks as spaces, typed user-defined;
    scores that do not follow the merge order): rebuilt as transformers rebuilds it, with the file's chat
    template, and no token beyond the file's vocabulary."""
    import gguf
    import transformers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    pieces = ["\u2581", "\n", "  ", "   ", "a", "b", "c", "h", "i", "\u2581a", "ab", "\u2581ab", "hi", "\u2581hi", "bc",
              "abc", "\u2581abc", "\u2581\u2581hi"]  # fmt: skip
    tokens = specials + [f"<0x{i:02X}>" for i in range(256)] + pieces
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(torch.randn(len(tokens), generator=torch.Generator().manual_seed(0)).tolist())
    # llama.cpp types Gemma's blank runs USER_DEFINED (4): read as "\u2581" runs, they are vocabulary tokens, not
    # added tokens with ids of their own
    w.add_token_types([3] * len(specials) + [6] * 256 + [4 if not p.strip() else 1 for p in pieces])
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_chat_template(GEMMA3_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    ours = autolm.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    assert len(ours) == len(tokens)
    for text in [
        "abc hi",
        "  hi\nab abc",
        "   hi",
        "x\u00e9\u2713 ba",
        "<start_of_turn>user\nhi<end_of_turn>",
    ]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)
