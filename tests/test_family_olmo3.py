"""OLMo 3 against transformers: OLMo 2's layer with sliding-window and full layers (a window shorter than the
test prompts), a RoPE table per layer type (YaRN on the full layers only); the standard battery, GGUF as llama.cpp
writes it (as "olmo2", told apart from OLMo 2 by its sliding window), GGUF out, and the CLI."""

from __future__ import annotations

import gguf
import gguf_llamacpp
import pytest
from chat_checks import check_cli
from family_checks import Family
from gguf_llamacpp import check_gguf, write_gguf
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
OLMO3 = Family(
    "Olmo3Config",
    dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        sliding_window=5,
        layer_types=LAYERS,
    ),
    lora_targets=["q_proj", "v_proj"],  # peft has no default for olmo3
)
# Olmo 3 7B / 32B's long-context form: YaRN on the full layers, plain RoPE (another base here) on the sliding ones
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
OLMO3_YARN = Family(
    "Olmo3Config",
    dict(
        OLMO3.kwargs,
        attention_bias=False,
        rope_parameters={
            "full_attention": YARN,
            "sliding_attention": {"rope_type": "default", "rope_theta": 5e5},
        },
    ),
)
# what llama.cpp's olmo2 graph runs (Olmo 3's released shapes): no biases (it loads no attn_output.bias), the
# sliding layers at the full layers' base (it rotates every layer at rope.freq_base)
OLMO3_GGUF = Family("Olmo3Config", dict(OLMO3.kwargs, attention_bias=False))
OLMO3_YARN_GGUF = Family(
    "Olmo3Config",
    dict(
        OLMO3_YARN.kwargs,
        rope_parameters={
            "full_attention": YARN,
            "sliding_attention": {"rope_type": "default", "rope_theta": YARN["rope_theta"]},
        },
    ),
)


def test_logits(tmp_path_factory):
    OLMO3.check_logits(tmp_path_factory)


def test_yarn_on_full_layers_only(tmp_path_factory):
    OLMO3_YARN.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    OLMO3.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    OLMO3.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    OLMO3.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    OLMO3.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    OLMO3.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    OLMO3.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    OLMO3.check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    OLMO3.check_disk_offload(tmp_path_factory, tmp_path)


def test_config_reads_v4_rope_as_transformers():
    """A v4 config (Olmo 3's released config.json: rope_theta, rope_scaling): as transformers 5 reads it, the
    scaling and the base go to the full layers; the sliding layers keep the default base; every 4th layer full."""
    import transformers

    d = {"model_type": "olmo3", "num_hidden_layers": 8, "rope_theta": 1e4,
         "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192}}  # fmt: skip
    ours = autolm.models.Olmo3Config.from_dict(d)
    theirs = transformers.Olmo3Config.from_dict(d)
    assert ours.layer_types == theirs.layer_types
    for kind in ("full_attention", "sliding_attention"):
        assert ours.rope_parameters[kind] == pytest.approx(theirs.rope_parameters[kind]), kind
    assert "rope_scaling" not in ours.to_dict() and "use_sliding_window" not in ours.to_dict()


def test_bad_layer_types_name_the_key():
    with pytest.raises(autolm.errors.ConfigError, match="layer_types"):
        autolm.models.Olmo3Config.from_dict({"num_hidden_layers": 2, "layer_types": ["sliding_attention"]})
    with pytest.raises(autolm.errors.ConfigError, match="rope_parameters"):
        autolm.models.Olmo3Config.from_dict({"rope_parameters": {"full_attention": 3}})


# ---- GGUF: llama.cpp's Olmo2Model converter class (conversion/olmo.py) writes Olmo3ForCausalLM as "olmo2" --------


def _olmo3_metadata(w, c) -> None:
    """TextModel.set_gguf_parameters on Olmo 3's rope_parameters by layer type (the full layers' base and YaRN
    keys, the sliding layers' base as rope.freq_base_swa), then Olmo2Model's window and per-layer sliding flags."""
    full, sliding = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if full.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    w.add_rope_freq_base(full["rope_theta"])
    w.add_rope_freq_base_swa(sliding["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])


gguf_llamacpp.CONVERTERS.setdefault("olmo3", ("olmo2", _olmo3_metadata, False))


def write_olmo3_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Olmo3ForCausalLM `hf` (--outtype f32)."""
    write_gguf(hf, path)


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as Olmo3ForCausalLM with transformers' logits, the YaRN variant too; an OLMo 2
    file (same architecture name, no window) still loads as Olmo2ForCausalLM."""
    from test_family_olmo2 import OLMO2_GGUF

    for i, (family, name) in enumerate(
        (
            (OLMO3_GGUF, "Olmo3ForCausalLM"),
            (OLMO3_YARN_GGUF, "Olmo3ForCausalLM"),
            (OLMO2_GGUF, "Olmo2ForCausalLM"),
        )
    ):
        (tmp_path / str(i)).mkdir()
        model, _ = check_gguf(family, tmp_path_factory, tmp_path / str(i))
        assert type(model).__name__ == name
        assert model.config.layer_types == (LAYERS if family is not OLMO2_GGUF else None)


def test_gguf_reads_the_sliding_base_as_llama_cpp(tmp_path_factory, tmp_path):
    """A file whose rope.freq_base_swa differs from rope.freq_base (the converter writes the sliding layers' base
    there) loads as llama.cpp runs it: every layer at rope.freq_base."""
    _, hf = OLMO3_YARN.checkpoint(tmp_path_factory)
    write_gguf(hf, str(tmp_path / "model.gguf"))
    assert (
        gguf.GGUFReader(str(tmp_path / "model.gguf")).get_field("olmo2.rope.freq_base_swa").contents() == 5e5
    )
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert model.config.rope_parameters["sliding_attention"] == {
        "rope_type": "default",
        "rope_theta": 10000.0,
    }


@pytest.mark.parametrize(
    ("family", "field"), [(OLMO3, "attention_bias"), (OLMO3_YARN, "RoPE")], ids=["bias", "base"]
)
def test_gguf_out_refuses(family, field, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """Biases (llama.cpp's olmo2 loads no attn_output.bias), a sliding layers' RoPE base but the full layers' (its
    graph rotates every layer at rope.freq_base): a ConfigError naming the field, and no file."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=f"'olmo3' model.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_cli(tmp_path_factory, tmp_path):
    check_cli(OLMO3, "olmo-2-1124-instruct.jinja", tmp_path_factory, tmp_path, "Olmo3ForCausalLM (olmo3)")
