"""Muse Glimmer's language model in llama.cpp's "muse-glimmer" GGUF (autolm/models/muse_glimmer_gguf.py): the file
llama.cpp's converter (conversion/muse_glimmer.py) makes loads with transformers' logits (qk_scale_factor taken from
the synthesized attn_q_norm weights, those dropped); autolm's GGUF out reads back equal and llama.cpp runs it with
close logits (in a child: a failed assertion in llama.cpp aborts); what llama.cpp's graph runs otherwise is refused
by field, and so is a file whose q norms hold more than one value."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import padded_batch
from family_checks import Family
from gguf_mimic import add_text_model, add_toy_vocab
from test_family_muse_glimmer import SIZES, WRAPPER
from test_gguf_out import _same_file, merged_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

# what llama.cpp's graph runs: post-sublayer norms at 1e-8, SiLU, no biases, RoPE on exactly the sliding layers
# (transformers' derived pattern: full and NoPE every 4th from the last), an untied head; queries times 2
GGUF_TEXT = dict(SIZES, num_hidden_layers=5, post_norm_eps=1e-8,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000.0})  # fmt: skip
GGUF_FAMILY = Family("MuseGlimmerConfig", dict(WRAPPER, text_config=GGUF_TEXT))
# the converter's names (gguf-py's map for MODEL_ARCH.MUSE_GLIMMER) of the language model's tensors
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.gate_proj": "attn_gate", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _unpermute_for_rope(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """conversion/muse_glimmer.py's: transformers' rotate-half q/k rows as llama.cpp's interleaved pairs."""
    dim1, dim2 = t.shape
    return t.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _gguf_name(name: str) -> str:
    stem, kind = name.rsplit(".", 1)
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    _, _, block, part = stem.split(".", 3)
    return f"blk.{block}.{_LAYER[part]}.{kind}"


def write_muse_glimmer_gguf(hf, path: str, q_scales: dict[int, float] | None = None) -> None:
    """The GGUF llama.cpp's converter (MuseGlimmerModel, --outtype f32) makes of transformers' image-text `hf`: the
    text config at the root; TextModel's keys, the head size as key/value length, the soft-cap, output_multiplier
    as logit_scale, the window and a sliding flag per layer; the language model's tensors (the towers' left to
    the mmproj), 1 added to the four layer norms (not the final one), q/k rows un-permuted, each layer's
    attn_q_norm holding qk_scale_factor (`q_scales`: another value for some blocks) and attn_k_norm ones; a plain
    vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config.text_config
    w = gguf.GGUFWriter(path, "muse-glimmer")
    add_text_model(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_logit_scale(c.output_multiplier)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    add_toy_vocab(w)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        if not name.startswith(("model.language_model.", "lm_head.")):
            continue
        name = name.replace("model.language_model.", "model.")
        t = t.float() + 1.0 if name.endswith("layernorm.weight") else t.float()
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            t = _unpermute_for_rope(t, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        if name.endswith(".self_attn.q_proj.weight"):
            block = int(name.split(".")[2])
            scale = (q_scales or {}).get(block, c.qk_scale_factor)
            for norm, value in (("q_norm", scale), ("k_norm", 1.0)):
                norm_name = name.replace("q_proj", norm)
                w.add_tensor(_gguf_name(norm_name), np.full((c.head_dim,), value, dtype=np.float32))
        w.add_tensor(_gguf_name(name), np.ascontiguousarray(t.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_converters_file_computes_as_transformers(tmp_path_factory, tmp_path):
    """The converter's file loads as Muse Glimmer: qk_scale_factor from the q norms (which the model does not
    hold), the fixed post-norm epsilon, the sliding layers rotated; transformers' logits over a padded batch."""
    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_muse_glimmer_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c = model.config
    assert (type(model).__name__, c.model_type) == ("MuseGlimmerForCausalLM", "muse_glimmer_text")
    assert (c.qk_scale_factor, c.post_norm_eps, c.output_multiplier, c.final_logit_softcapping) == (
        2.0,
        1e-8,
        0.5,
        3.0,
    )
    assert c.layer_types == hf.config.text_config.layer_types and c.layer_rope_theta == [0, 1e3, 1e3, 1e3, 0]
    assert not any("_norm" in n and "self_attn" in n for n, _ in model.named_parameters())
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real],
                                   hf(input_ids=ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4)  # fmt: skip


def test_q_norms_of_other_values_are_refused(tmp_path_factory, tmp_path):
    """A file whose blocks' q norms hold different scales (autolm has one qk_scale_factor): a ConfigError."""
    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_muse_glimmer_gguf(hf, str(tmp_path / "m.gguf"), q_scales={3: 1.5})
    with pytest.raises(ConfigError, match="attn_q_norm"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")


_CHILD = """
import sys, numpy as np, llama_cpp
path, ids = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
llm.eval(ids)
np.save(sys.argv[3], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""
ROW = torch.tensor([[5, 17, 33, 2, 98, 120, 7, 61, 150, 9, 44, 3, 159]])  # longer than the window (4)


def _llama_cpp_logits(path: str) -> torch.Tensor:
    pytest.importorskip("llama_cpp")
    ids = ",".join(str(t) for t in ROW[0].tolist())
    run = subprocess.run([sys.executable, "-c", _CHILD, path, ids, path + ".npy"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.from_numpy(np.load(path + ".npy"))


def test_gguf_out_reads_back_and_llama_cpp_runs_it(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """autolm's F32 file holds the converter's metadata and tensors, reads back with the model's logits, and
    llama.cpp's muse-glimmer graph runs it with close logits and the same next tokens."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    out = save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    write_muse_glimmer_gguf(hf, str(tmp_path / "ref.gguf"))
    _same_file(GGUFFile(out), GGUFFile(str(tmp_path / "ref.gguf")))
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    with torch.no_grad():
        ours = model(ROW).logits[0]
        torch.testing.assert_close(back(ROW).logits[0], ours, atol=1e-5, rtol=1e-5)
    theirs = _llama_cpp_logits(out)
    assert (ours - theirs).abs().max() < 2e-2 * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def _tied(c):
    c.tie_word_embeddings = True


def _rope_on_full(c):
    c.layer_rope_theta = [1000.0] * c.num_hidden_layers


@pytest.mark.parametrize(
    "field, change",
    [
        ("tie_word_embeddings", _tied),
        ("post_norm_eps", lambda c: setattr(c, "post_norm_eps", 1e-6)),
        ("hidden_activation", lambda c: setattr(c, "hidden_act", "gelu_pytorch_tanh")),
        ("attention_bias", lambda c: setattr(c, "attention_bias", True)),
        ("layer_rope_theta", _rope_on_full),
    ],
)
def test_gguf_out_refuses_what_llama_cpp_runs_otherwise(field, change, tmp_path_factory, tmp_path):
    """A tied head (llama.cpp needs output.weight), another post-norm epsilon (its graph's is 1e-8), another
    activation, attention biases, RoPE off the sliding layers: a ConfigError naming the field, and no file."""
    GGUF_FAMILY.check_gguf_refused(tmp_path_factory, tmp_path, field, change)
