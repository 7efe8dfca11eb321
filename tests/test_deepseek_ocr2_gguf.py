"""DeepSeek-OCR 2's language model in llama.cpp's "deepseek2-ocr" GGUF: the file llama.cpp's converter
(DeepseekV2Model on DeepSeek-OCR's checkpoints) writes loads with transformers' logits; autolm's GGUF out reads back
with the model's logits, holds what the converter writes, and llama.cpp runs it with close logits; what llama.cpp's
graph would run otherwise (GQA, another RoPE base or scaling, dense layers after a sparse one, group-limited routing,
biases) is refused, naming the field. Unlimited-OCR (its reference sliding window) is written as no GGUF."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import HEAD_TIED as _TIED
from conftest import register_reference
from family_checks import Family, same_logits
from gguf_mimic import add_toy_vocab
from test_family_deepseek_ocr2 import SIZES
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm


@dataclass
class OcrFamily(Family):
    """A Family whose transformers reference (its text model with a head, test_family_deepseek_ocr2) is registered
    wherever the checkpoint is made (test_gguf_out's table too)."""

    def checkpoint(self, tmp_path_factory, dtype=None):
        register_reference(
            "DeepseekOcr2Text", "DeepseekOcr2TextPreTrainedModel", "DeepseekOcr2TextModel", _TIED
        )
        register_reference(
            "UnlimitedOcrText", "UnlimitedOcrTextPreTrainedModel", "UnlimitedOcrTextModel", _TIED
        )
        return super().checkpoint(tmp_path_factory, dtype)


# as many key/value heads as query heads (llama.cpp's graph runs no other), a dense first layer, greedy routing
OCR = OcrFamily("DeepseekOcr2TextConfig", dict(SIZES, num_key_value_heads=4, n_group=1, topk_group=1))
# no dense layer, an untied head's absence (tied), routed_scaling_factor 1
TIED = OcrFamily("DeepseekOcr2TextConfig",
              dict(SIZES, num_key_value_heads=None, routed_scaling_factor=1.0, tie_word_embeddings=True,
                   mlp_layer_types=["sparse"] * 3))  # fmt: skip


def write_deepseek_ocr2_gguf(hf, path: str, sliding_window: int | None = None) -> None:
    """The GGUF llama.cpp's converter (DeepseekV2Model, origin DeepseekOCR2ForCausalLM, --outtype f32) makes of the
    model: TextModel's keys (key/value lengths from head_dim), DeepseekV2Model's without MLA (the leading dense
    layers, the expert keys, DeepSeek's qk_rope_head_dim 0 as rope.dimension_count, Unlimited-OCR's
    `sliding_window`), the experts stacked."""
    import gguf
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    kinds = c["mlp_layer_types"]
    w = gguf.GGUFWriter(path, "deepseek2-ocr")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base((c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    if c.get("n_group") is not None:
        w.add_expert_group_count(c["n_group"])
    if c.get("topk_group") is not None:
        w.add_expert_group_used_count(c["topk_group"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_leading_dense_block_count(kinds.index("sparse") if "sparse" in kinds else len(kinds))
    w.add_vocab_size(c["vocab_size"])
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    w.add_rope_dimension_count(0)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2OCR, c["num_hidden_layers"])
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        if c.get("tie_word_embeddings") and name == "lm_head.weight":
            continue
        pieces = [(name, t)]
        if name.endswith("experts.gate_up_proj"):  # transformers' stacked (gate; up) rows
            gate, up = t.chunk(2, 1)
            pieces = [(name.replace("gate_up_proj", "gate_proj.weight"), gate),
                      (name.replace("gate_up_proj", "up_proj.weight"), up)]  # fmt: skip
        elif name.endswith("experts.down_proj"):
            pieces = [(name + ".weight", t)]
        for piece, value in pieces:
            base, kind = piece.rsplit(".", 1)
            w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(value.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", [OCR, TIED], ids=["dense-first", "tied"])
def test_gguf_in(tmp_path_factory, tmp_path, family):
    """The converter's file loads as DeepSeek-OCR 2's language model with transformers' logits."""
    _, hf = family.checkpoint(tmp_path_factory)
    write_deepseek_ocr2_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "DeepseekOcr2TextForCausalLM"
    assert model.config.mlp_layer_types == hf.config.mlp_layer_types
    assert model.config.head_dim == hf.config.head_dim
    same_logits(model, hf)


_CHILD = """
import sys, numpy as np, llama_cpp
path, ids = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
llm.eval(ids)
np.save(sys.argv[3], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""
ROW = torch.tensor([[5, 17, 33, 2, 98, 7, 61, 9, 44, 3]])


def _llama_cpp_logits(path: str) -> torch.Tensor:
    ids = ",".join(str(t) for t in ROW[0].tolist())
    run = subprocess.run([sys.executable, "-c", _CHILD, path, ids, path + ".npy"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.from_numpy(np.load(path + ".npy"))


def test_gguf_out(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """autolm's file reads back with the model's logits (as DeepSeek-OCR 2's), holds the converter's keys and
    tensors, and llama.cpp (if installed) runs it with close logits."""
    from test_gguf_out import _same_file

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = OCR.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    assert type(back).__name__ == "DeepseekOcr2TextForCausalLM"
    with torch.no_grad():
        ours = model(ROW).logits[0]
        torch.testing.assert_close(back(ROW).logits[0], ours, atol=1e-5, rtol=1e-5)
    write_deepseek_ocr2_gguf(hf, str(tmp_path / "ref.gguf"))
    _same_file(GGUFFile(path), GGUFFile(str(tmp_path / "ref.gguf")))
    pytest.importorskip("llama_cpp")
    theirs = _llama_cpp_logits(path)
    assert (ours - theirs).abs().max() < 1e-2 * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, "rope_theta"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
        ({"mlp_layer_types": ["sparse", "dense", "sparse"]}, "mlp_layer_types"),
        ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}, "topk_method"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_gguf_out_refused(tmp_path_factory, tmp_path, merged_tokenizer, change, field):  # noqa: F811
    """GQA, a RoPE base but 10000 or scaled RoPE, a dense layer after a sparse one, group-limited routing, biases,
    another activation: a ConfigError naming the field, and no file."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(OCR.checkpoint(tmp_path_factory)[0])
    for key, value in change.items():
        setattr(model.config, key, value)
    with pytest.raises(autolm.ConfigError, match=field):
        save_gguf(model, merged_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_unlimited_ocr_writes_no_gguf(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """Unlimited-OCR's reference sliding window is not llama.cpp's deepseek2-ocr graph (whole-context attention):
    its GGUF out is refused, and its class claims no llama.cpp architecture: a file with the window the converter
    writes of Unlimited-OCR loads as DeepSeek-OCR 2's model (transformers' logits over a prompt)."""
    from autolm.gguf_writer import save_gguf
    from autolm.models import gguf_family

    unlimited = OcrFamily("UnlimitedOcrTextConfig", dict(SIZES, num_key_value_heads=4))
    model = autolm.AutoModelForCausalLM.from_pretrained(unlimited.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError):
        save_gguf(model, merged_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
    assert gguf_family({"general.architecture": "deepseek2-ocr"}).__name__ == "DeepseekOcr2TextForCausalLM"
    _, hf = OCR.checkpoint(tmp_path_factory)
    write_deepseek_ocr2_gguf(hf, str(tmp_path / "window.gguf"), sliding_window=4)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="window.gguf")
    assert type(model).__name__ == "DeepseekOcr2TextForCausalLM"
    same_logits(model, hf)
