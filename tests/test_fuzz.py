"""Fuzzers over every file autolm reads besides the weights (those are in test_hardening.py): configs,
generation configs, GGUF metadata, adapter configs, tokenizer configs and chat templates. Every outcome
is a success or autolm's own error; anything else (a raw exception, a hang, a crash) fails."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autolm
from autolm.errors import AutolmError, GGUFError

NAME = "qwen2_tied_bias"
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# JSON values a hostile or careless file may hold, biased towards the edges of each type.
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0, 1, 2**31, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["true", "false", "2", "", "llama", "auto", "float16", "\ud800"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _mutate(base: dict, keys: list[str]):
    """A strategy: `base` with a few of `keys` (or new keys) set to arbitrary JSON or removed."""
    return st.lists(
        st.tuples(
            st.one_of(st.sampled_from(keys), st.text(max_size=8)), st.one_of(json_value, st.just(KeyError))
        ),
        min_size=1,
        max_size=4,
    ).map(lambda changes: _apply(base, changes))


def _apply(base: dict, changes) -> dict:
    d = json.loads(json.dumps(base))
    for key, value in changes:
        if value is KeyError:
            d.pop(key, None)
        else:
            d[key] = value
    return d


def _dump(d) -> str:
    return json.dumps(d, allow_nan=True, ensure_ascii=True)


@pytest.fixture(scope="module")
def base_dir(checkpoint, tmp_path_factory):
    directory, _ = checkpoint(NAME)
    d = tmp_path_factory.mktemp("fuzzbase")
    shutil.copytree(directory, d, dirs_exist_ok=True)
    return d


def _scratch(tmp_path_factory, base_dir):
    d = tmp_path_factory.mktemp("fz")
    shutil.copytree(base_dir, d, dirs_exist_ok=True)
    return d


def _config(base_dir) -> dict:
    return json.loads((base_dir / "config.json").read_text())


CONFIG_KEYS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "attention_bias",
    "hidden_act",
    "model_type",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "architectures",
]


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_fuzz_config(base_dir, tmp_path_factory, data):
    cfg = data.draw(_mutate(_config(base_dir), CONFIG_KEYS))
    d = _scratch(tmp_path_factory, base_dir)
    (d / "config.json").write_text(_dump(cfg))
    try:
        model = autolm.AutoModelForCausalLM.from_pretrained(d)
    except AutolmError:
        return
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


GEN_KEYS = [
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "stop_strings",
]


@pytest.fixture(scope="module")
def fuzz_model(base_dir):
    return autolm.AutoModelForCausalLM.from_pretrained(base_dir)


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_fuzz_generation_config(base_dir, fuzz_model, tmp_path_factory, data):
    from autolm.generation import GenerationConfig

    cfg = data.draw(_mutate({"eos_token_id": 2, "bos_token_id": 1, "do_sample": True, "top_k": 5}, GEN_KEYS))
    d = _scratch(tmp_path_factory, base_dir)
    (d / "generation_config.json").write_text(_dump(cfg))
    try:
        gen = GenerationConfig.from_model_dir(str(d))
        fuzz_model.generate(torch.tensor([[1, 2, 3]]), generation_config=gen, max_new_tokens=2)
    except AutolmError:
        pass


# ---- GGUF metadata ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A small but complete llama GGUF (config, byte-level BPE tokenizer, chat template, tensors)."""
    import gguf

    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(32)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_feed_forward_length(24)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    tokens = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["ab", "abc", "<s>", "</s>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (len(tokens), 16),
        "output_norm.weight": (16,),
        "blk.0.attn_norm.weight": (16,),
        "blk.0.ffn_norm.weight": (16,),
        "blk.0.attn_q.weight": (16, 16),
        "blk.0.attn_k.weight": (8, 16),
        "blk.0.attn_v.weight": (8, 16),
        "blk.0.attn_output.weight": (16, 16),
        "blk.0.ffn_gate.weight": (24, 16),
        "blk.0.ffn_up.weight": (24, 16),
        "blk.0.ffn_down.weight": (16, 24),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        raw = f.read()

    class Tiny(tuple):
        def __repr__(self):  # keep hypothesis' failure reports short
            return f"<tiny GGUF {path}>"

    return Tiny((path, raw))


def test_tiny_gguf_loads(tiny_gguf):
    path, _ = tiny_gguf
    model = autolm.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file="tiny.gguf")
    tok = autolm.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file="tiny.gguf")
    assert model.config.num_hidden_layers == 1 and tok.encode("abc") and tok.eos_token == "</s>"


def test_a_models_load_steps_over_the_vocabulary(tiny_gguf, tmp_path):
    """GGUFFile(strings=False), as a model's load opens it: the same metadata, but each array of strings (the
    vocabulary, the merges) only stepped over, its length kept; a file cut inside one is still refused."""
    from autolm.sources.gguf import GGUFFile
    from autolm.sources.gguf_header import SkippedStrings

    path, raw = tiny_gguf
    full, lean = GGUFFile(path).metadata, GGUFFile(path, strings=False).metadata
    skipped = {k for k, v in lean.items() if isinstance(v, SkippedStrings)}
    assert "tokenizer.ggml.tokens" in skipped
    assert skipped == {k for k, v in full.items() if isinstance(v, list) and v and isinstance(v[0], str)}
    assert all(len(lean[k]) == len(full[k]) for k in skipped)
    assert {k: v for k, v in lean.items() if k not in skipped} == {
        k: full[k] for k in lean if k not in skipped
    }
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[: raw.index(b"</s>") + 2])  # inside the vocabulary
    with pytest.raises(GGUFError, match="cut.gguf"):
        GGUFFile(str(cut), strings=False)


@settings(max_examples=400, **SETTINGS)
@given(data=st.data())
def test_fuzz_gguf_metadata(tiny_gguf, tmp_path_factory, data):
    from autolm.sources.gguf import GGUFFile, config_from_gguf
    from autolm.sources.gguf_tokenizer import tokenizer_parts

    _, raw = tiny_gguf
    header_end = raw.index(b"blk.0.ffn_down.weight") + 64  # metadata and tensor descriptions
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(4, header_end))
        kind = data.draw(st.sampled_from(["byte", "u64"]))
        if kind == "byte":
            mutated[pos] = data.draw(st.integers(0, 255))
        else:
            value = data.draw(st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**62, 2**64 - 1, 7, 12]))
            mutated[pos : pos + 8] = value.to_bytes(8, "little")
    path = tmp_path_factory.mktemp("fzg") / "m.gguf"
    path.write_bytes(bytes(mutated))
    for step in (
        lambda: config_from_gguf(GGUFFile(str(path), strings=False)),  # a model's load
        lambda: config_from_gguf(GGUFFile(str(path))),
        lambda: tokenizer_parts(str(path)),
    ):
        with contextlib.suppress(AutolmError):
            step()


# ---- adapter configs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    from autolm.lora import LoraConfig, get_peft_model

    pm = get_peft_model(
        autolm.AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    d = tmp_path_factory.mktemp("adapter")
    pm.save_pretrained(d)
    return d


ADAPTER_KEYS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "modules_to_save",
    "use_rslora",
    "use_dora",
    "bias",
    "fan_in_fan_out",
    "task_type",
    "peft_type",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "base_model_name_or_path",
    "init_lora_weights",
]


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_fuzz_adapter_config(base_dir, adapter_dir, tmp_path_factory, data):
    from autolm.lora import PeftModel

    cfg = data.draw(_mutate(json.loads((adapter_dir / "adapter_config.json").read_text()), ADAPTER_KEYS))
    d = tmp_path_factory.mktemp("fza")
    shutil.copytree(adapter_dir, d, dirs_exist_ok=True)
    (d / "adapter_config.json").write_text(_dump(cfg))
    base = autolm.AutoModelForCausalLM.from_pretrained(base_dir)
    try:
        pm = PeftModel.from_pretrained(base, d)
    except AutolmError:
        return
    with torch.no_grad():
        pm(torch.tensor([[1, 2, 3]]))


# ---- tokenizer configs and chat templates -------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(smol_dir, tmp_path_factory):
    """SmolLM2's tokenizer files with its vocabulary cut to the first 2,000 ids (and the merges among them): the
    special tokens and the config the fuzzing mutates are the real ones, and a load takes milliseconds."""
    d = tmp_path_factory.mktemp("tok")
    shutil.copy(os.path.join(smol_dir, "tokenizer_config.json"), d)
    spec = json.loads(open(os.path.join(smol_dir, "tokenizer.json"), encoding="utf-8").read())
    model = spec["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < 2000}
    merges = (m.split(" ") if isinstance(m, str) else m for m in model["merges"])
    model["merges"] = [[a, b] for a, b in merges if {a, b, a + b} <= model["vocab"].keys()]
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return d


TOKENIZER_KEYS = [
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "chat_template",
    "padding_side",
    "model_max_length",
    "clean_up_tokenization_spaces",
    "added_tokens_decoder",
    "tokenizer_class",
]


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_fuzz_tokenizer_config(tokenizer_dir, tmp_path_factory, data):
    base = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    cfg = data.draw(_mutate(base, TOKENIZER_KEYS))
    d = tmp_path_factory.mktemp("fzt")
    (d / "tokenizer.json").symlink_to(tokenizer_dir / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(_dump(cfg))
    try:
        tok = autolm.AutoTokenizer.from_pretrained(d)
        tok(["hello", "a longer text"], padding=True)
        tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    except AutolmError:
        pass


TEMPLATE_PARTS = [
    "{{ ",
    " }}",
    "{% ",
    " %}",
    "for m in messages",
    "endfor",
    "if ",
    "endif",
    "else",
    "set x = ",
    "m['content']",
    "m.role",
    "messages[0]",
    "messages[-1]",
    "x",
    "loop.index",
    "range(",
    ")",
    "(",
    " * ",
    " + ",
    " ** ",
    " ~ ",
    " / ",
    " // ",
    " % ",
    "|length",
    "|tojson",
    "|trim",
    "|upper",
    "|join(', ')",
    "|first",
    "|int",
    "|center(",
    "'abc'",
    "10",
    "99999",
    "0",
    "-1",
    "none",
    "true",
    "[",
    "]",
    "{",
    "}",
    ":",
    ",",
    ".",
    "__class__",
    "raise_exception('no')",
    "add_generation_prompt",
    "bos_token",
    "namespace(",
    "ns.a",
    "macro f()",
    "endmacro",
    "f()",
    "\n",
    "text",
    "{#",
    "#}",
]


@settings(max_examples=1500, **SETTINGS)
@given(parts=st.lists(st.sampled_from(TEMPLATE_PARTS), max_size=20))
def test_fuzz_chat_templates(parts):
    from autolm.chat_template import render_chat_template

    with contextlib.suppress(AutolmError):
        render_chat_template(
            "".join(parts),
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}],
            add_generation_prompt=True,
            bos_token="<s>",
        )
