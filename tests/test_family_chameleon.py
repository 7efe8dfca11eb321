"""Chameleon (Meta's Chameleon, GAIR's Anole) against transformers' ChameleonForConditionalGeneration on text and
peft: Llama's layer with per-head q/k LayerNorms (weight and bias rows per head), swin_norm (the norms after
attention and MLP) in a variant with q/k/v/o and MLP biases, a tied head, MHA; the image tokens' logits (the
vocabulary_map's IMGIMG... entries) at the dtype's lowest value as transformers returns them; the VQ-VAE's tensors
skipped on load and absent when saved. The standard battery, config defaults, GGUF as llama.cpp's converter writes
"chameleon" (in and out) and llama.cpp's own logits on autolm's file."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import VOCAB, padded_batch, positions, randomize
from family_checks import _CACHE, Family, check_config_defaults
from gguf_mimic import add_text_model
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.chameleon import ChameleonConfig, ChameleonForConditionalGeneration, image_token_name

TARGETS = ["q_proj", "v_proj"]  # peft has no default for chameleon
VQ = dict(embed_dim=8, num_embeddings=16, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
          num_res_blocks=1, resolution=16)  # fmt: skip
IMAGE_IDS = [20 + 7 * i for i in range(12)]  # VQ codes 0 .. 11 as vocabulary tokens
VMAP = {"<image>": VOCAB - 1, "<racm3:break>": 3, **{image_token_name(i): t for i, t in enumerate(IMAGE_IDS)}}
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, vq_config=VQ, vocabulary_map=VMAP)  # fmt: skip
CHAMELEON = Family(
    "ChameleonConfig", SMALL, hf_class="ChameleonForConditionalGeneration", lora_targets=TARGETS
)
# swin_norm, biases everywhere, a tied head, MHA, 3 layers, another RoPE base
SWIN = Family(
    "ChameleonConfig",
    dict(SMALL, num_hidden_layers=3, num_key_value_heads=4, swin_norm=True, attention_bias=True, mlp_bias=True,
         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 300.0}),
    hf_class="ChameleonForConditionalGeneration",
    lora_targets=TARGETS,
)  # fmt: skip
FAMILIES = {"chameleon": CHAMELEON, "swin": SWIN}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    CHAMELEON.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    SWIN.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    SWIN.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    SWIN.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    CHAMELEON.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    CHAMELEON.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_files(tmp_path_factory, tmp_path, name):
    """Saved: transformers loads it with equal logits (its VQ-VAE left at its initialization) and autolm bit-equal;
    the state dict and the file hold transformers' names and shapes but the VQ-VAE's; config.json as read (the
    vq_config, vocabulary_map and image_token_id kept)."""
    from safetensors import safe_open

    family = FAMILIES[name]
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model) is ChameleonForConditionalGeneration
    language = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not k.startswith("model.vqmodel.")}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == language
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        names, saved = set(theirs.keys()), set(ours.keys())
    vq = {k for k in names if k.startswith("model.vqmodel.")}
    assert vq and saved == names - vq
    written, original = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
    for d in (written, original):
        d.pop("transformers_version", None)
    assert written == original and written["vocabulary_map"] == VMAP
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "swin")


def test_image_tokens_are_suppressed_as_transformers_does(tmp_path_factory):
    """The vocabulary_map's IMGIMG... tokens (not <image> or other specials) get the dtype's lowest logit, in fp32
    and bf16, as in transformers; the same model without them scores those tokens as any other."""
    directory, hf = CHAMELEON.checkpoint(tmp_path_factory)
    ids, mask = padded_batch()
    real = mask.bool()
    for dtype in (torch.float32, torch.bfloat16):
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        assert model.image_tokens == tuple(IMAGE_IDS)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits[real]
            assert logits.dtype == dtype
            assert torch.all(logits[:, IMAGE_IDS] == torch.finfo(dtype).min)
            others = [t for t in range(VOCAB) if t not in IMAGE_IDS]
            assert torch.all(logits[:, others] > -1e4)
            model.image_tokens = ()
            plain = model(ids, attention_mask=mask).logits[real]
        assert torch.all(plain[:, IMAGE_IDS] > -1e4)
        torch.testing.assert_close(plain[:, others], logits[:, others])
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    assert torch.all(theirs[:, IMAGE_IDS] == torch.finfo(torch.float32).min)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers has no tensor-parallel plan for Chameleon: tp_plan='auto' says so before anything is launched."""
    import transformers

    directory, _ = CHAMELEON.checkpoint(tmp_path_factory)
    assert not transformers.ChameleonConfig.base_model_tp_plan
    with pytest.raises(ConfigError, match="'chameleon' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_config_defaults():
    """ChameleonConfig() holds transformers' defaults; errors name the field."""
    check_config_defaults(ChameleonConfig)
    c = ChameleonConfig()
    assert (c.vocab_size, c.num_key_value_heads, c.rms_norm_eps, c.swin_norm) == (65536, 32, 1e-5, False)
    assert c.image_tokens == () and c.pad_token_id is None
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}
    for bad, match in (
        ({"vocabulary_map": ["IMGIMGAZ"]}, "vocabulary_map"),
        ({"vocabulary_map": {"IMGIMGAZ": 200}, "vocab_size": 160}, "vocabulary_map"),
        ({"head_dim": 32}, "head_dim"),
        ({"swin_norm": "yes"}, "swin_norm"),
    ):
        with pytest.raises(ConfigError, match=match):
            ChameleonConfig.from_dict({**base, **bad})


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes chameleon --------------------------------------------

WIDE_VOCAB = 8320  # llama.cpp's graph suppresses ids 4 .. 8195: a vocabulary past them


@dataclass
class WideFamily(Family):
    """A checkpoint with Chameleon's vocabulary layout (image tokens 4 .. 8195, as llama.cpp suppresses them) and
    each q/k norm's rows equal across heads (as Chameleon's: llama.cpp's converter writes the first head's row)."""

    def checkpoint(self, tmp_path_factory, dtype=None):
        import transformers

        key = ("wide", repr(sorted(self.kwargs.items())))
        if key not in _CACHE:
            vmap = {"<image>": WIDE_VOCAB - 1, **{image_token_name(i - 4): i for i in range(4, 8196)}}
            cfg = transformers.ChameleonConfig(vocab_size=WIDE_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                               **dict(self.kwargs, vocabulary_map=vmap))  # fmt: skip
            torch.manual_seed(0)
            model = transformers.ChameleonForConditionalGeneration._from_config(cfg)
            randomize(model)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "_norm." in name and "self_attn" in name:
                        p.copy_(p[:1].expand_as(p))
            d = str(tmp_path_factory.mktemp("chameleon_wide"))
            model.save_pretrained(d)
            ref = transformers.ChameleonForConditionalGeneration.from_pretrained(
                d, attn_implementation="eager"
            )
            _CACHE[key] = (d, ref.eval())
        return _CACHE[key]


GGUF_FAMILIES = (
    WideFamily("ChameleonConfig", dict(SMALL, num_key_value_heads=4)),
    WideFamily("ChameleonConfig", dict(SMALL, num_key_value_heads=4, swin_norm=True)),
)


def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute: each head's rows (2, dim/2) -> (dim/2, 2), for llama.cpp's interleaved RoPE."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def write_chameleon_gguf(hf, path: str) -> None:
    """ChameleonModel (conversion/chameleon.py): TextModel's keys and swin_norm; the VQ-VAE dropped; q/k rows
    permuted as Llama's; each q/k norm's first row (_reverse_hf_permute: head_dim = hidden_size / heads) permuted and
    repeated for every head."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(path, "chameleon")
    add_text_model(w, c)
    w.add_swin_norm(c.swin_norm)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, c.vocab_size))])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([3, 3, 3] + [1] * (c.vocab_size - 3))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHAMELEON, c.num_hidden_layers)
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    for name, t in hf.state_dict().items():
        if name.startswith("model.vqmodel.") or (name == "lm_head.weight" and c.tie_word_embeddings):
            continue
        if ".q_proj." in name:
            t = _permute(t, nh)
        elif ".k_proj." in name:
            t = _permute(t, nkv)
        elif "_norm." in name and "self_attn" in name:
            heads = nh if ".q_norm." in name else nkv
            t = t[0].view(2, c.hidden_size // heads // 2).t().reshape(1, -1).repeat_interleave(heads, 0)
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_CHILD = """
import sys, numpy as np, llama_cpp
path, ids = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
llm.eval(ids)
np.save(sys.argv[3], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""
ROW = torch.tensor([[5, 17, 33, 2, 98, 8200, 7, 61, 8300, 9, 44, 3, 150]])


def _llama_cpp_logits(path: str) -> torch.Tensor:
    pytest.importorskip("llama_cpp")
    ids = ",".join(str(t) for t in ROW[0].tolist())
    run = subprocess.run([sys.executable, "-c", _CHILD, path, ids, path + ".npy"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.from_numpy(np.load(path + ".npy"))


def _converted(family, tmp_path_factory, tmp_path):
    """The converter's file of the family's checkpoint, loaded: (autolm's model, transformers')."""
    _, hf = family.checkpoint(tmp_path_factory)
    write_chameleon_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model) is ChameleonForConditionalGeneration
    assert model.image_tokens == tuple(range(4, 8196))
    with torch.no_grad():
        torch.testing.assert_close(model(ROW).logits, hf(ROW).logits, atol=1e-4, rtol=1e-4)
    return model, hf


def test_gguf_in_and_out(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """The converter's file loads as Chameleon with transformers' logits (the image tokens 4 .. 8195 suppressed);
    autolm's GGUF out (each head's own q/k norm rows) reads back equal, with q/k norm rows that differ across heads
    too; llama.cpp runs it with autolm's logits (it suppresses the image tokens of its first output row only: the
    other rows are compared over the text tokens)."""
    from autolm.gguf_writer import save_gguf

    model, _ = _converted(GGUF_FAMILIES[0], tmp_path_factory, tmp_path)
    assert not model.config.swin_norm
    with torch.no_grad():
        for name, p in model.named_parameters():  # rows of their own per head: autolm's file keeps them
            if "_norm." in name and "self_attn" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
        row = model(ROW).logits[0]
    out = save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    with torch.no_grad():
        torch.testing.assert_close(back(ROW).logits[0], row, atol=1e-5, rtol=1e-5)
    theirs = _llama_cpp_logits(out)
    text = [t for t in range(WIDE_VOCAB) if not 4 <= t < 8196]
    assert torch.all(theirs[0, 4:8196] <= torch.finfo(torch.float32).min)
    ours, theirs = row[:, text], theirs[:, text]
    assert (ours - theirs).abs().max() < 2e-2 * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_gguf_out_refuses_what_llama_cpp_computes_otherwise(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """llama.cpp suppresses ids 4 .. 8195 whatever the vocabulary, and feeds a swin_norm layer's MLP the normed
    attention output alone: a smaller vocabulary, other image tokens or swin_norm is a ConfigError naming the
    field, and no file. The converter's file of a swin_norm model reads as transformers computes it."""
    from autolm.gguf_writer import save_gguf

    swin, _ = _converted(GGUF_FAMILIES[1], tmp_path_factory, tmp_path)
    assert swin.config.swin_norm
    with pytest.raises(ConfigError, match="swin_norm"):
        save_gguf(swin, merged_tokenizer, str(tmp_path / "swin.gguf"), "f32")

    small = autolm.AutoModelForCausalLM.from_pretrained(CHAMELEON.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="vocab_size"):
        save_gguf(small, merged_tokenizer, str(tmp_path / "small.gguf"), "f32")
    wide = autolm.AutoModelForCausalLM.from_pretrained(GGUF_FAMILIES[0].checkpoint(tmp_path_factory)[0])
    wide.config.vocabulary_map = dict(VMAP)
    with pytest.raises(ConfigError, match="vocabulary_map"):
        save_gguf(wide, merged_tokenizer, str(tmp_path / "wide.gguf"), "f32")
    assert [p.name for p in tmp_path.glob("*.gguf")] == ["model.gguf"]
