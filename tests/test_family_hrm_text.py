"""HRM-Text (HrmTextForCausalLM) against transformers and peft: the L and H stacks run in nested cycles (each
invocation of a layer with its own cache slots), weightless RMSNorms, the sigmoid-gated multi-head attention, the
scaled embeddings and the learned z_L_init. One checkpoint with transformers' default embedding scale (1 /
initializer_range), one with attention biases, another scale, three low-level cycles and two layers a stack.
GGUF in and out as llama.cpp's hrm_text (the L stack's blocks first, then the H stack's), against its converter
(mimicked) and llama.cpp itself."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import Family, check_config_defaults, check_loss_and_gradients
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.hrm_text import HrmTextConfig

LORA = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # peft has no default for hrm_text
HRM = Family(
    "HrmTextConfig",
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, head_dim=8,
         H_cycles=2, L_cycles=2, max_position_embeddings=64),
    lora_targets=LORA,
)  # fmt: skip
BIASED = Family(
    "HrmTextConfig",
    dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
         H_cycles=2, L_cycles=3, L_bp_cycles=[3], embedding_scale=3.0, attention_bias=True, prefix_lm=False,
         max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    lora_targets=LORA,
)  # fmt: skip
FAMILIES = {"hrm": HRM, "biased": BIASED}
# what llama.cpp's hrm_text runs (no biases), two layers a stack (blk.2 is the H stack's first), another embedding
# scale, RoPE base and cycle counts
STACKED = Family(
    "HrmTextConfig",
    dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
         H_cycles=2, L_cycles=3, embedding_scale=3.0, prefix_lm=False, max_position_embeddings=64,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    lora_targets=LORA,
)  # fmt: skip


def _z_l_init(directory):
    """transformers initialises z_L_init to zeros (and randomize leaves it): give it values, in the file."""
    from safetensors.torch import load_file, save_file

    path = f"{directory}/model.safetensors"
    sd = load_file(path)
    if not bool(sd["model.z_L_init"].any()):
        sd["model.z_L_init"] = torch.randn(
            sd["model.z_L_init"].shape, generator=torch.Generator().manual_seed(3)
        )
        save_file(sd, path, metadata={"format": "pt"})


@pytest.fixture(autouse=True)
def _nonzero_init(tmp_path_factory):
    import transformers

    for fam in (*FAMILIES.values(), STACKED):
        directory, hf = fam.checkpoint(tmp_path_factory)
        if not bool(hf.model.z_L_init.any()):
            _z_l_init(directory)
            with torch.no_grad():
                hf.model.z_L_init.copy_(
                    transformers.AutoModelForCausalLM.from_pretrained(directory).model.z_L_init
                )


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    HRM.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory):
    """The per-layer compiled graphs are not used (a layer runs at several cache slots): the torch.compile'd step
    of the general forward gives the eager tokens and logits."""
    from test_decode_steps import greedy_steps

    directory, _ = HRM.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert not autolm.step.compilable(model) and autolm.step.compiled_plan(model) is None
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    tokens, logits = greedy_steps(model, ids, 6, "forward")
    autolm.step.compile_decode(model, backend="eager")
    got_tokens, got = greedy_steps(model, ids, 6, "auto")
    assert got_tokens == tokens
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4)


def test_lora(tmp_path_factory, tmp_path):
    HRM.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    HRM.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    HRM.check_disk_offload(tmp_path_factory, tmp_path)


def test_cache_slots_and_quirks(tmp_path_factory):
    """One cache layer per stack invocation; z_L_init, the embedding scale and the gate each change the logits."""
    from conftest import padded_batch

    directory, _ = BIASED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert len(model.make_cache(1, 4).keys) == 2 * 2 * 4 == model.config.num_hidden_layers
    ids, mask = padded_batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        model.model.z_L_init.zero_()
        assert not torch.allclose(base, model(ids, attention_mask=mask).logits, atol=1e-3)


def test_training_gradients(tmp_path_factory):
    """L_bp_cycles: only the last low-level passes of each cycle carry gradients, as in transformers."""
    directory, hf = BIASED.checkpoint(tmp_path_factory)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    check_loss_and_gradients(directory, hf, ids)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (the norms hold none); config.json round-trips with transformers'
    keys only (num_hidden_layers the cache slots, num_layers_per_stack); transformers' tensor-parallel plan."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert not any("norm" in k for k in model.state_dict())


def test_default_config_and_errors():
    """HrmTextConfig() holds transformers' defaults; bad values raise ConfigError naming the key."""
    import transformers

    check_config_defaults(HrmTextConfig)
    theirs = json.loads(transformers.HrmTextConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert HrmTextConfig().to_dict() == theirs
    assert HrmTextConfig(num_hidden_layers=3, H_cycles=1, L_cycles=2).num_hidden_layers == 9
    for change, key in ((dict(H_cycles=0), "H_cycles"), (dict(num_key_value_heads=2), "num_key_value_heads"),
                        (dict(num_layers_per_stack=3), "num_hidden_layers"), (dict(L_bp_cycles=[-1]), "L_bp_cycles"),
                        (dict(embedding_scale=0), "embedding_scale"), (dict(prefix_lm=1), "prefix_lm")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            HrmTextConfig(hidden_size=64, num_attention_heads=4, head_dim=16, **change)


# ---- GGUF: llama.cpp's HrmTextModel converter (conversion/hrm_text.py), emulated --------------------------------

_GGUF_NAMES = {"attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down"}


def write_hrm_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' HRM-Text checkpoint `hf` (--outtype f32): TextModel's
    keys (block_count the cache slots; no head_count_kv: config.json has no num_key_value_heads), the head size as
    rope.dimension_count, embedding_scale and the hrm.* keys; the L stack's layers as blk.0.., the H stack's after
    them, the fused gqkv_proj / gate_up_proj split, z_L_init as hrm.z_l_init; the tests' vocabulary."""
    import re

    import gguf
    import numpy as np
    from gguf_mimic import add_toy_vocab
    from safetensors.torch import load_file

    hp = json.load(open(f"{hf.name_or_path}/config.json"))
    per = hp.get("num_layers_per_stack") or hp["num_hidden_layers"]
    arch = "hrm_text"
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(per * hp["H_cycles"] * (hp["L_cycles"] + 1))
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_rope_freq_base(hp["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp["head_dim"])
    w.add_float32(
        f"{arch}.embedding_scale", hp["embedding_scale"]
    )  # the installed gguf predates the hrm keys
    w.add_uint32(f"{arch}.hrm.layers_per_stack", per)
    w.add_uint32(f"{arch}.hrm.h_cycles", hp["H_cycles"])
    w.add_uint32(f"{arch}.hrm.l_cycles", hp["L_cycles"])
    w.add_bool(f"{arch}.hrm.prefix_lm", bool(hp.get("prefix_lm", False)))
    add_toy_vocab(w)
    out = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
           "model.z_L_init": "hrm.z_l_init"}  # fmt: skip
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        pieces = [(out[name], t)] if name in out else []
        m = re.fullmatch(r"model\.([LH])_module\.layers\.(\d+)\.(.+)\.weight", name)
        if m:
            blk = f"blk.{int(m.group(2)) + (per if m.group(1) == 'H' else 0)}"
            if m.group(3) == "attn.gqkv_proj":
                pieces = [(f"{blk}.attn_{p}.weight", x) for p, x in zip(("gate", "q", "k", "v"), t.chunk(4))]
            elif m.group(3) == "mlp.gate_up_proj":
                pieces = [(f"{blk}.ffn_{p}.weight", x) for p, x in zip(("gate", "up"), t.chunk(2))]
            else:
                pieces = [(f"{blk}.{_GGUF_NAMES[m.group(3)]}.weight", t)]
        for gguf_name, x in pieces:
            w.add_tensor(gguf_name, np.ascontiguousarray(x.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["hrm", "stacked"])
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as HrmTextForCausalLM with the stacks' layers where they were (blk.N past
    layers_per_stack: the H stack's), the cycles, embedding scale and z_L_init read back, and transformers' logits;
    llama.cpp runs it with close logits."""
    from conftest import padded_batch, positions
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    fam = HRM if name == "hrm" else STACKED
    _, hf = fam.checkpoint(tmp_path_factory)
    path = str(tmp_path / "conv.gguf")
    write_hrm_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="conv.gguf")
    assert type(model).__name__ == "HrmTextForCausalLM"
    c, want = model.config, hf.config
    fields = (
        "num_layers_per_stack",
        "num_hidden_layers",
        "H_cycles",
        "L_cycles",
        "embedding_scale",
        "prefix_lm",
    )
    assert {f: getattr(c, f) for f in fields} == {f: getattr(want, f) for f in fields}
    torch.testing.assert_close(model.model.z_L_init, hf.model.z_L_init)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        row = model(ROW).logits[0]
    _close_to_llama_cpp(row, llama_cpp_logits(path))


def test_gguf_out(tmp_path_factory, tmp_path):
    """autolm's file holds the converter's metadata and tensors, reads back with the same logits, and llama.cpp runs
    it with close logits."""
    from test_gguf_out import _same_file, merged_tokenizer
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = STACKED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    out = save_gguf(model, merged_tokenizer.__wrapped__(tmp_path_factory), str(tmp_path / "out.gguf"), "f32")
    write_hrm_gguf(hf, str(tmp_path / "conv.gguf"))
    _same_file(GGUFFile(out), GGUFFile(str(tmp_path / "conv.gguf")))
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    with torch.no_grad():
        row = model(ROW).logits[0]
        torch.testing.assert_close(back(ROW).logits[0], row, atol=1e-5, rtol=1e-5)
    _close_to_llama_cpp(row, llama_cpp_logits(out))


@pytest.mark.parametrize("field", ["attention_bias", "mlp_bias"])
def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, field):
    """llama.cpp's gate, output and MLP projections have no biases: refused naming the field, no file."""
    STACKED.check_gguf_refused(tmp_path_factory, tmp_path, field, lambda c: setattr(c, field, True))


def test_gguf_block_numbering():
    """blk.N: the L stack's layer N below layers_per_stack, the H stack's layer N - layers_per_stack up to twice it,
    nothing past it; a file without embedding_scale is not scaled (llama.cpp's default)."""
    from autolm.models.hrm_text import _gguf_block, _gguf_derive

    get = {"hrm.layers_per_stack": 3}.get
    assert [_gguf_block(n, get) for n in (0, 2, 3, 5, 6)] == [
        "model.L_module.layers.0", "model.L_module.layers.2", "model.H_module.layers.0", "model.H_module.layers.2",
        None,
    ]  # fmt: skip
    d = {}
    _gguf_derive(d, get)
    assert d == {"embedding_scale": 1.0}
