"""GGUF files of remote-code models that llama.cpp runs under their own architecture names and autolm reads as the
family whose arithmetic they are: "exaone" (EXAONE 3.0 / 3.5) and "internlm2" (InternLM2 / 2.5) as Llama, "minicpm"
(MiniCPM 1/2) as Granite. Each file is written as llama.cpp's converter writes it (conversion/exaone.py, internlm.py,
minicpm.py: the metadata keys TextModel and the class write, the checkpoint's own tensor names through gguf-py's
name map, its extra tensors, q/k permutation, InternLM2's packed wqkv split as the converter splits it) from the
checkpoint of transformers' equivalent model (a Llama, a Granite), and autolm's logits on it are compared with
transformers' (atol 1e-4) and with llama.cpp's own on the same file (llama-cpp-python, where installed: within its
float16 KV cache), dequantized and, for a Q8_0 file, kept in its blocks (quantization="gguf")."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family
from gguf_llamacpp import permute
from gguf_mimic import add_q8_0, add_toy_vocab

import autolm

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)  # fmt: skip
# EXAONE-3.5-2.4B's shape: Llama 3's RoPE scaling (every frequency scaled within these prompts), tied embeddings,
# EXAONE's epsilon
EXAONE = Family("LlamaConfig", dict(SMALL, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_parameters={
    "rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16}))  # fmt: skip
# InternLM2's: GQA (two q heads a group in wqkv), its RoPE base, an untied head
INTERNLM2 = Family("LlamaConfig", dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
# MiniCPM-2B's constants as Granite's multipliers: scale_emb 12, scale_depth 1.4, dim_model_base 256; tied
MINICPM = Family("GraniteConfig", dict(SMALL, tie_word_embeddings=True, embedding_multiplier=12.0,
                                       residual_multiplier=1.4 / math.sqrt(2), logits_scaling=64 / 256,
                                       attention_multiplier=1 / math.sqrt(16)))  # fmt: skip
ROW = torch.tensor([[5, 17, 33, 2, 98, 140, 7, 61, 120, 9, 44, 3, 150]])  # the prompt llama.cpp runs too


def _text_keys(w, hp: dict, eps_key: str = "rms") -> None:
    """TextModel.set_gguf_parameters (conversion/base.py) of a config.json `hp` in the model's own key names."""
    w.add_block_count(hp.get("num_hidden_layers", hp.get("num_layers")))
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_rope_freq_base(hp["rope_theta"])  # dynamic (InternLM2) and llama3 (EXAONE) scaling write no key
    eps = hp.get("rms_norm_eps", hp.get("layer_norm_epsilon"))
    (w.add_layer_norm_rms_eps if eps_key == "rms" else w.add_layer_norm_eps)(eps)


def _exaone(hf, eps_key: str = "rms"):
    """ExaoneModel: EXAONE's config.json and checkpoint names (transformer.h.N.attn.attention.q_proj, ...), TextModel's
    keys and the rotary dimensions, Llama 3's scaling as rope_freqs; q/k rows as they are (llama.cpp runs exaone with
    NeoX RoPE). Hub files (older converters) hold the epsilon as layer_norm_rms_epsilon; today's converter
    (TextModel's find_hparam of layer_norm_epsilon) as layer_norm_epsilon (eps_key "plain")."""
    c, rope = hf.config, hf.config.rope_parameters
    hp = dict(
        SMALL,
        num_layers=c.num_hidden_layers,
        layer_norm_epsilon=c.rms_norm_eps,
        rope_theta=rope["rope_theta"],
    )
    del hp["num_hidden_layers"]
    head_dim = c.hidden_size // c.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low, high = (
        rope["original_max_position_embeddings"] / rope[k] for k in ("low_freq_factor", "high_freq_factor")
    )
    factors = []  # ExaoneModel.generate_extra_tensors
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
            rope["high_freq_factor"] - rope["low_freq_factor"])  # fmt: skip
        factors.append(1 if wavelen < high else rope["factor"] if wavelen > low
                       else 1 / ((1 - smooth) / rope["factor"] + smooth))  # fmt: skip
    names = {"model.embed_tokens": "transformer.wte", "model.norm": "transformer.ln_f", "self_attn.o_proj":
             "attn.attention.out_proj", "self_attn.": "attn.attention.", "mlp.gate_proj": "mlp.c_fc_0", "mlp.up_proj":
             "mlp.c_fc_1", "mlp.down_proj": "mlp.c_proj", "input_layernorm": "ln_1", "post_attention_layernorm":
             "ln_2", "model.layers.": "transformer.h."}  # fmt: skip
    state = {}
    for name, t in hf.state_dict().items():
        for ours, theirs in names.items():
            name = name.replace(ours, theirs)
        state[name] = t
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    def keys(w):
        _text_keys(w, hp, eps_key)
        w.add_rope_dimension_count(head_dim)

    return "exaone", keys, [("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32))], state


def _internlm2(hf):
    """InternLM2Model: InternLM2's config.json (its dynamic NTK scaling: no key) and checkpoint, whose packed wqkv
    (per KV head: its group's q heads, then k, then v) the converter splits into q, k, v, permuting q and k."""
    c = hf.config
    hp = dict(SMALL, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"],
              rope_scaling={"type": "dynamic", "factor": 2.0})  # fmt: skip
    heads, kv, n_embd = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    q_per_kv, head_dim = heads // kv, n_embd // heads
    sd, state = hf.state_dict(), {}
    for i in range(c.num_hidden_layers):  # the InternLM2 checkpoint's wqkv, as its modeling file unpacks it
        p = f"model.layers.{i}.self_attn."
        parts = [sd[p + "q_proj.weight"].reshape(kv, q_per_kv, head_dim, n_embd),
                 sd[p + "k_proj.weight"].reshape(kv, 1, head_dim, n_embd),
                 sd[p + "v_proj.weight"].reshape(kv, 1, head_dim, n_embd)]  # fmt: skip
        wqkv = torch.cat(parts, dim=1).reshape(-1, n_embd)
        # InternLM2Model.modify_tensors
        qkv = wqkv.reshape((kv, q_per_kv + 2, head_dim, n_embd))
        q, k, v = qkv[:, :q_per_kv], qkv[:, -2], qkv[:, -1]
        state[f"blk.{i}.attn_q.weight"] = permute(q.reshape((-1, q.shape[-1])), heads)
        state[f"blk.{i}.attn_k.weight"] = permute(k.reshape((-1, k.shape[-1])), kv)
        state[f"blk.{i}.attn_v.weight"] = v.reshape((-1, v.shape[-1]))
    names = {"model.embed_tokens": "model.tok_embeddings", "lm_head": "output", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj":
             "feed_forward.w2", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for name, t in sd.items():
        if not any(x in name for x in ("q_proj", "k_proj", "v_proj")):
            for ours, theirs in names.items():
                name = name.replace(ours, theirs)
            state[name] = t
    return "internlm2", lambda w: _text_keys(w, hp), [], state


def _minicpm(hf, scales: bool = True):
    """MiniCPMModel: MiniCPM's config.json (scale_emb, scale_depth, dim_model_base), TextModel's keys and the three
    scales (embedding, residual = scale_depth / sqrt(layers), logit = hidden / dim_model_base; `scales` False: a file
    of an older converter, which wrote none), q/k permuted; MiniCPM's checkpoint names are Llama's."""
    c = hf.config
    hp = dict(SMALL, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"], scale_emb=12.0,
              scale_depth=1.4, dim_model_base=256)  # fmt: skip

    def keys(w):
        _text_keys(w, hp)
        if scales:
            w.add_embedding_scale(float(hp["scale_emb"]))
            w.add_residual_scale(hp["scale_depth"] / hp["num_hidden_layers"] ** 0.5)
            w.add_logit_scale(hp["hidden_size"] / hp["dim_model_base"])

    state = {}
    for name, t in hf.state_dict().items():
        if name.endswith("q_proj.weight"):
            t = permute(t, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = permute(t, c.num_key_value_heads)
        if not (name == "lm_head.weight" and c.tie_word_embeddings):
            state[name] = t
    return "minicpm", keys, [], state


def write(path: str, converted, q8_0: bool = False) -> None:
    """The file: the converter's keys, the tests' vocabulary, its extra tensors, then the checkpoint's tensors under
    gguf-py's names for the architecture (F32, or Q8_0 where rows are whole blocks as --outtype q8_0)."""
    import gguf

    arch, keys, extra, state = converted
    w = gguf.GGUFWriter(path, arch)
    keys(w)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     SMALL["num_hidden_layers"])  # fmt: skip
    for name, t in [*extra, *state.items()]:
        if not name.startswith(("blk.", "rope_")):
            base, kind = name.rsplit(".", 1)
            name = f"{names.get_name(base)}.{kind}"
        a = t.float().numpy()
        if q8_0 and a.ndim == 2:
            add_q8_0(w, name, a)
        else:
            w.add_tensor(name, a)
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


def llama_cpp_logits(path: str) -> torch.Tensor:
    """llama.cpp's logits for ROW on the file, run in a child (a failed assertion in llama.cpp aborts it)."""
    pytest.importorskip("llama_cpp")
    ids = ",".join(str(t) for t in ROW[0].tolist())
    run = subprocess.run([sys.executable, "-c", _CHILD, path, ids, path + ".npy"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.from_numpy(np.load(path + ".npy"))


def _load(tmp_path, name: str, **kw):
    return autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, progress=False, **kw)


def _row(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ROW).logits[0]


def _close_to_llama_cpp(
    ours: torch.Tensor, theirs: torch.Tensor, scale: float = 1.0, kept: bool = False
) -> None:
    """tests/test_gguf_llamacpp.py's bounds: on a float file, within llama.cpp's float16 KV cache and the same next
    tokens; on a Q8_0 file kept in its blocks (llama.cpp rounds the activations to 8 bits for its dot products, as
    autolm's kernel does where built), within 5% on average and the same next tokens at 90% of the positions."""
    theirs = theirs / scale
    if kept:
        assert (ours - theirs).abs().mean() < 0.05 * theirs.abs().mean()
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
        return
    assert (ours - theirs).abs().max() < 2e-2 * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


CASES = {
    "exaone": (EXAONE, _exaone, "LlamaForCausalLM"),
    "internlm2": (INTERNLM2, _internlm2, "LlamaForCausalLM"),
    "minicpm": (MINICPM, _minicpm, "GraniteForCausalLM"),
}


@pytest.mark.parametrize("arch", CASES)
def test_converters_file_computes_as_transformers_and_llama_cpp(arch, tmp_path_factory, tmp_path):
    """The converter's F32 file loads as the family with transformers' logits (a left-padded batch) and llama.cpp's
    on the same file; its Q8_0 version, kept in its blocks, gives llama.cpp's logits on that file, and the
    dequantized load of it close to them."""
    family, convert, cls = CASES[arch]
    _, hf = family.checkpoint(tmp_path_factory)
    write(str(tmp_path / "m.gguf"), convert(hf))
    model = _load(tmp_path, "m.gguf")
    assert type(model).__name__ == cls
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    _close_to_llama_cpp(_row(model), llama_cpp_logits(str(tmp_path / "m.gguf")))
    write(str(tmp_path / "q.gguf"), convert(hf), q8_0=True)
    kept = _load(tmp_path, "q.gguf", quantization="gguf")
    assert any(type(m).__name__.startswith("GGML") for m in kept.modules())
    on_file = _row(kept)
    _close_to_llama_cpp(on_file, llama_cpp_logits(str(tmp_path / "q.gguf")), kept=True)
    dequantized = _row(_load(tmp_path, "q.gguf"))
    assert (dequantized - on_file).abs().mean() < 0.05 * on_file.abs().mean()


def test_exaone_config_read_back(tmp_path_factory, tmp_path):
    """EXAONE: its epsilon read from layer_norm_rms_epsilon (Hub files) and from layer_norm_epsilon (what today's
    converter writes, which llama.cpp's exaone does not load), Llama 3's scaling from rope_freqs, q/k unpermuted."""
    _, hf = EXAONE.checkpoint(tmp_path_factory)
    for i, eps_key in enumerate(("rms", "plain")):
        write(str(tmp_path / f"m{i}.gguf"), _exaone(hf, eps_key))
        model = _load(tmp_path, f"m{i}.gguf")
        assert model.config.rms_norm_eps == pytest.approx(1e-5)
        assert model.config.rope_parameters["rope_type"] == "longrope"  # rope_freqs' form (sources.gguf)
        with torch.no_grad():
            torch.testing.assert_close(model(ROW).logits, hf(ROW).logits, atol=1e-4, rtol=1e-4)


def test_minicpm_multipliers_and_an_older_file_without_scales(tmp_path_factory, tmp_path):
    """MiniCPM's scales read as Granite's multipliers (attention at 1 / sqrt(head size), which llama.cpp's minicpm
    takes whatever the file says); a file without the scales (older converters) computes with MiniCPM's constants as
    transformers does, and as llama.cpp does but for its fallback logit scale, 256 / hidden where MiniCPM's is
    hidden / 256: llama.cpp's logits there are (hidden / 256)^2 times MiniCPM's."""
    _, hf = MINICPM.checkpoint(tmp_path_factory)
    want = hf.config
    for i, scales in enumerate((True, False)):
        write(str(tmp_path / f"m{i}.gguf"), _minicpm(hf, scales))
        model = _load(tmp_path, f"m{i}.gguf")
        got = model.config
        for field in (
            "embedding_multiplier",
            "residual_multiplier",
            "logits_scaling",
            "attention_multiplier",
        ):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-6), (scales, field)
        with torch.no_grad():
            torch.testing.assert_close(model(ROW).logits, hf(ROW).logits, atol=1e-4, rtol=1e-4)
    _close_to_llama_cpp(_row(model), llama_cpp_logits(str(tmp_path / "m1.gguf")), scale=(64 / 256) ** 2)


def test_minicpm_longrope_is_refused(tmp_path_factory, tmp_path):
    """A minicpm file with LongRoPE factors (MiniCPM 4's, which llama.cpp picks by context size) is refused naming
    the tensor, not read with plain RoPE."""
    _, hf = MINICPM.checkpoint(tmp_path_factory)
    arch, keys, _, state = _minicpm(hf)
    factors = [(f"rope_factors_{k}.weight", torch.ones(8)) for k in ("long", "short")]
    write(str(tmp_path / "long.gguf"), (arch, keys, factors, state))
    with pytest.raises(autolm.GGUFError, match="rope_factors_long"):
        _load(tmp_path, "long.gguf")
