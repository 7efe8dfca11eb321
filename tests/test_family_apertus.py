"""Apertus (Swiss AI's Apertus-8B / 70B) against transformers and peft: Llama's layer with per-head q/k RMSNorm, the
non-gated MLP up_proj -> xIELU (learnable alpha_p / alpha_n per layer, beta / eps buffers) -> down_proj, GQA,
Llama 3 RoPE (the released scaling, on a short original context), norms named attention_layernorm /
feedforward_layernorm; and a variant with q/k/v/o biases, relu2, default RoPE and a tied head. The standard battery,
config.json in transformers' keys, the CLI with a ChatML template (Apertus' own template is not pinned here)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.apertus import ApertusConfig

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # fmt: skip
# xIELU, GQA, Llama 3 RoPE scaling (original context 8: every frequency band in play), an untied head
APERTUS = Family(
    "ApertusConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64, rope_parameters=LLAMA3),
    lora_targets=["q_proj", "v_proj", "up_proj", "down_proj"],  # peft has no default for apertus
)  # fmt: skip
# biases on q/k/v/o, relu2 instead of xIELU, default RoPE, a tied head, three layers
BIASED = Family(
    "ApertusConfig",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
         max_position_embeddings=64, attention_bias=True, hidden_act="relu2", tie_word_embeddings=True,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"apertus": APERTUS, "biased": BIASED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    APERTUS.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    APERTUS.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    APERTUS.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    APERTUS.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    APERTUS.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    APERTUS.check_disk_offload(tmp_path_factory, tmp_path)


def test_xielu_is_transformers():
    """The activation module computes transformers' XIELUActivation (Python path) for the same parameters, on
    both sides of zero and around eps; alpha_p / alpha_n are parameters of shape (1,), beta / eps saved buffers."""
    from transformers.activations import XIELUActivation as Theirs

    from autolm.models.apertus import XIELUActivation

    theirs, ours = Theirs(dtype=torch.float32), XIELUActivation()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert {n for n, _ in ours.named_parameters()} == {"alpha_p", "alpha_n"}
    with torch.no_grad():
        theirs.alpha_p.fill_(0.3), theirs.alpha_n.fill_(-0.7), theirs.beta.fill_(0.4)
        ours.load_state_dict(theirs.state_dict())
    x = torch.cat([torch.linspace(-6, 6, 101), torch.tensor([-1e-7, -1e-6, 0.0, 1e-7])])
    torch.testing.assert_close(ours(x), theirs._xielu_python(x))
    assert not torch.allclose(ours(x), torch.relu(x) ** 2)


def test_xielu_buffers_are_read(tmp_path_factory, tmp_path):
    """beta and eps come from the checkpoint (not the defaults): a checkpoint with other values gives
    transformers' logits for them."""
    import transformers

    directory, _ = APERTUS.checkpoint(tmp_path_factory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            layer.mlp.act_fn.beta.fill_(0.2 + 0.3 * i)
            layer.mlp.act_fn.eps.fill_(-0.5)
    hf.save_pretrained(tmp_path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert float(model.model.layers[1].mlp.act_fn.beta) == pytest.approx(0.5)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter and buffer names and shapes; config.json round-trips with transformers' keys
    only; transformers' tensor-parallel plan (its replicated q/k norms aside: autolm never splits a norm)."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    plan = {k: v for k, v in hf.config.base_model_tp_plan.items() if not k.endswith("_norm")}
    assert type(model).tp_patterns == plan
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "biased") and ("lm_head" in model.tp_plan()) == (not tied)


def test_default_config_and_errors():
    """ApertusConfig() holds transformers' defaults (Llama 3 RoPE, xIELU); a config.json without RoPE keys reads
    transformers' Llama 3 default; bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.ApertusConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert ApertusConfig().to_dict() == theirs
    bare = ApertusConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4})
    assert bare.rope_parameters == transformers.ApertusConfig().rope_parameters
    for change, key in ((dict(attention_bias="yes"), "attention_bias"), (dict(hidden_act="xielu2"), "hidden_act"),
                        (dict(rms_norm_eps=0), "rms_norm_eps"), (dict(num_key_value_heads=3), "num_key_value_heads")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            ApertusConfig(hidden_size=64, num_attention_heads=4, **change)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A tiny byte-level BPE tokenizer (no merges), as tests/test_gguf_out.py's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}},
                               merges=[]))  # fmt: skip
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    d = tmp_path_factory.mktemp("byte_tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return autolm.AutoTokenizer.from_pretrained(str(d))


# ---- GGUF: llama.cpp's ApertusModel converter, emulated -----------------------------------------------------------


def write_apertus_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's ApertusModel converter (conversion/llama.py) makes of transformers' Apertus `hf`:
    LlamaModel's metadata (TextModel's, the vocabulary size, the rotary dimensions), q/k not permuted
    (undo_permute False), Llama 3 RoPE as the rope_freqs tensor (LlamaModel.generate_extra_tensors), each xIELU
    value (the raw parameter) as a per-layer metadata array, the rest by gguf-py's name map; `kind` "Q8_0"
    quantizes the layers' matrices."""
    import gguf
    from gguf_llamacpp import _llama
    from gguf_mimic import add_toy_vocab

    c = hf.config
    w = gguf.GGUFWriter(path, "apertus")
    _llama(w, c)
    head_dim = json.load(open(os.path.join(hf.name_or_path, "config.json"))).get("head_dim")
    if head_dim is not None:  # TextModel: key/value length where config.json gives head_dim
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.APERTUS, c.num_hidden_layers)
    acts = [layer.mlp.act_fn for layer in hf.model.layers]
    w.add_xielu_alpha_n([a.alpha_n.float().item() for a in acts])
    w.add_xielu_alpha_p([a.alpha_p.float().item() for a in acts])
    w.add_xielu_beta([a.beta.float().item() for a in acts])
    w.add_xielu_eps([a.eps.float().item() for a in acts])
    rope = c.rope_parameters
    if rope.get("rope_type") == "llama3":  # generate_extra_tensors: each frequency's divisor
        dim = head_dim or c.hidden_size // c.num_attention_heads
        freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        low, high = (
            rope["original_max_position_embeddings"] / rope[k]
            for k in ("low_freq_factor", "high_freq_factor")
        )
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high:
                factors.append(1)
            elif wavelen > low:
                factors.append(rope["factor"])
            else:
                smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                    rope["high_freq_factor"] - rope["low_freq_factor"]
                )
                factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
        w.add_tensor("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32).numpy())
    for name, t in hf.state_dict().items():
        if ".act_fn." in name or (name == "lm_head.weight" and c.tie_word_embeddings):
            continue
        base, suffix = name.rsplit(".", 1)
        data = t.float().numpy()
        new = f"{names.get_name(base)}.{suffix}"
        if kind != "F32" and data.ndim == 2 and new.startswith("blk."):
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _trained(tmp_path_factory):
    """APERTUS's checkpoint with other xIELU values in each layer (the file must carry them, not the defaults)."""
    import transformers

    directory, _ = APERTUS.checkpoint(tmp_path_factory)
    out = tmp_path_factory.mktemp("apertus_trained")
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            act = layer.mlp.act_fn
            act.alpha_p.fill_(0.3 - 0.4 * i), act.alpha_n.fill_(-0.2 + 0.5 * i)
            act.beta.fill_(0.4 + 0.1 * i), act.eps.fill_(-1e-3 * (i + 1))
    hf.save_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    return str(out), hf.eval()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as ApertusForCausalLM with transformers' logits (each layer's xIELU values from
    the metadata, the Llama 3 RoPE from rope_freqs, not kept in the config); Q8_0 in its own blocks: close."""
    _, hf = _trained(tmp_path_factory)
    write_apertus_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "ApertusForCausalLM"
    assert float(model.model.layers[1].mlp.act_fn.alpha_n) == pytest.approx(0.3)
    assert not any(k.startswith("xielu") for k in model.config.extra)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        got = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        write_apertus_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
        q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
        got = q(ids, attention_mask=mask, position_ids=positions(mask)).logits[real].float()
    assert (got - want).abs().mean() <= 0.03 * want.abs().mean()


def test_gguf_out_is_the_converters_file(tmp_path_factory, tmp_path, byte_tokenizer):
    """save_gguf writes the converter's metadata (the xIELU arrays included) and tensors, byte for byte; the file
    loads back with the model's logits (test_gguf_out's checks)."""
    from test_gguf_out import IDS, _same_file

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = _trained(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    write_apertus_gguf(hf, str(tmp_path / "ref.gguf"))
    ours, ref = GGUFFile(path), GGUFFile(str(tmp_path / "ref.gguf"))
    _same_file(ours, ref)
    xielu = [k for k in ref.metadata if k.startswith("xielu.")]
    assert len(xielu) == 4 and {k: ours.metadata.get(k) for k in xielu} == {k: ref.metadata[k] for k in xielu}
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer):
    """llama.cpp's apertus always runs xIELU and reads an output tensor: relu2 and a tied head are refused,
    naming both, and no file is written."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(BIASED.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="'apertus' model.*hidden_act.*tie_word_embeddings"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "out.gguf"), "f32")
    assert os.listdir(tmp_path) == []


def test_cli(tmp_path_factory, tmp_path):
    """The template's default system prompt needs a longer context than the battery's checkpoints."""
    long = Family("ApertusConfig", {**APERTUS.kwargs, "max_position_embeddings": 256})
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "ApertusForCausalLM (apertus)")
