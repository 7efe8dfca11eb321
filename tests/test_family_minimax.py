"""MiniMax (MiniMax-Text-01 / M1) against transformers and peft: lightning-attention layers (blocks of 4 tokens, so
every prompt here crosses several blocks) among full-attention layers (a linear layer first, head_dim apart from
hidden_size / heads), every residual factor off 1, Mixtral's experts; a second checkpoint with transformers' default
layer pattern, a sliding window on the full-attention layers and tied embeddings. The recurrent battery (pieces
through the cache, the one-token step, the serving engine, generation far past the blocks), the blocked rule against
the token-by-token recurrence, the checkpoint's decay buffers, config defaults and errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

FACTORS = dict(full_attn_alpha_factor=0.8, full_attn_beta_factor=1.25, linear_attn_alpha_factor=0.9,
               linear_attn_beta_factor=1.1, mlp_alpha_factor=0.7, mlp_beta_factor=1.3)  # fmt: skip
MINIMAX = Family(
    "MiniMaxConfig",
    dict(
        FACTORS,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=4,
    ),
    lora_targets=[
        "q_proj",
        "v_proj",
        "qkv_proj",
        "output_gate",
        "out_proj",
    ],  # peft has no default for minimax
)
# transformers' default layer pattern (full attention on the even layers), a window, tied embeddings
WINDOWED = Family(
    "MiniMaxConfig",
    dict(
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        num_local_experts=3,
        num_experts_per_tok=1,
        block_size=3,
        sliding_window=5,
        tie_word_embeddings=True,
    ),
)


def test_logits(tmp_path_factory):
    MINIMAX.check_logits(tmp_path_factory)
    WINDOWED.check_logits(tmp_path_factory)


@pytest.fixture
def beams_keep_states(monkeypatch):
    """transformers' beam search reorders MiniMaxCache's keys and values but not its lightning states (each beam
    would go on from another beam's state): here it reorders both, as autolm does."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    reorder = MiniMaxCache.reorder_cache

    def reorder_both(self, beam_idx):
        reorder(self, beam_idx)
        self.linear_cache = [
            t.index_select(0, beam_idx) if torch.is_tensor(t) else t for t in self.linear_cache
        ]

    monkeypatch.setattr(MiniMaxCache, "reorder_cache", reorder_both)


def test_generate(tmp_path_factory, beams_keep_states):
    WINDOWED.check_generate(tmp_path_factory)


def test_generate_linear_first(tmp_path_factory, beams_keep_states):
    """A lightning layer first (as in MiniMax-Text-01): each row of a left-padded batch, greedy and beam search, gives
    transformers' tokens for that row alone. (transformers' own padded batch goes wrong here: its MiniMaxCache reads
    the cached length from layer 0, which keeps no keys, so the full-attention mask after the prompt is wrong.)"""
    directory, hf = MINIMAX.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5))
    for kwargs in (dict(max_new_tokens=12), dict(max_new_tokens=8, num_beams=3)):
        ours = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        for row, n in enumerate((9, 5)):
            alone = ids[row : row + 1, 9 - n :]
            theirs = hf.generate(alone, do_sample=False, **kwargs)
            assert torch.equal(ours[row : row + 1, 9 - n :], theirs), (kwargs, row)


def test_generate_past_the_blocks(tmp_path_factory):
    """40 new tokens after a 30-token prompt (the prompt in blocks of 4, then the one-token recurrence) are
    transformers' tokens; the decoded logits equal those of the whole 70 tokens in one forward."""
    MINIMAX.check_long_generation(tmp_path_factory, new=40, exact_length=True, whole_atol=1e-4)


def test_one_token_step(tmp_path_factory):
    MINIMAX.check_one_token_step(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    MINIMAX.check_recurrent(tmp_path_factory, tmp_path)


def test_pieces(tmp_path_factory):
    """70 tokens in pieces (5, 13, 1, 1, 30, 20) through the cache: one forward's logits and transformers'; the
    lightning layers keep only their fp32 state (B, H, d, d), the full-attention layer keys."""
    cache = MINIMAX.check_pieces(tmp_path_factory)
    assert sorted(cache.states) == [0, 2, 3]
    (state,) = cache.state(0)
    assert state.dtype == torch.float32 and tuple(state.shape) == (2, 4, 24, 24)
    assert cache.keys[0].shape[-1] == 0 and cache.keys[1].shape[-1] == 24


def test_blocks_are_the_recurrence():
    """The blocked rule (blocks of 1, 4 and 64 tokens, from a random state) gives the token-by-token recurrence's
    outputs and final state over 23 tokens."""
    from autolm.models.minimax import LightningAttention, MiniMaxConfig, lightning_attention

    g = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 4, 23, 8
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))
    state = torch.randn(B, H, d, d, generator=g)
    config = MiniMaxConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=H, num_key_value_heads=H, head_dim=d
    )
    layer = LightningAttention(config, 1)
    slope = layer.slope_rate
    want, s = [], state
    for t in range(T):
        s = torch.exp(-slope) * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        want.append(q[:, :, t, None] @ s)
    want = torch.cat(want, dim=2)
    for block in (1, 4, 64):
        layer.block_size = block
        tables = layer.decay_tables(slope)
        y, last = lightning_attention(q, k, v, slope, tables, block, state)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(last, s, atol=1e-4, rtol=1e-4)


def test_bf16(tmp_path_factory):
    MINIMAX.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    MINIMAX.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    """On the windowed checkpoint: the other one, its residual factors above 1 and four layers of top-2 routing,
    turns bf16's rounding alone into 13% of the logits (its experts picked otherwise), more than int8's own error."""
    WINDOWED.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict (the lightning layers' decay buffers too); the checkpoint's per-expert
    tensors and decay tables, and only transformers' config keys, in the files autolm saves."""
    _, saved = MINIMAX.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in saved
    assert "model.layers.0.self_attn.diagonal_decay" in saved


def test_disk_offload(tmp_path_factory, tmp_path):
    MINIMAX.check_disk_offload(tmp_path_factory, tmp_path)


def test_names_and_config_json(tmp_path_factory, tmp_path):
    """The windowed checkpoint's names and shapes; its config.json (default layer_types written out) saved back
    as read."""
    model, hf = WINDOWED.check_names_and_config(tmp_path_factory, tmp_path)
    assert (
        model.config.layer_types
        == hf.config.layer_types
        == [
            "full_attention",
            "linear_attention",
            "full_attention",
        ]
    )


def test_config_defaults_are_transformers():
    check_config_defaults(autolm.MiniMaxConfig)


def test_config_errors_name_the_key():
    from autolm.models.minimax import MiniMaxConfig

    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    cases = {
        "layer_types": dict(layer_types=["linear_attention", "mamba"]),
        "block_size": dict(block_size=0),
        "linear_attn_beta_factor": dict(linear_attn_beta_factor="1"),
        "mlp_alpha_factor": dict(mlp_alpha_factor=float("nan")),
        "num_experts_per_tok": dict(num_local_experts=2, num_experts_per_tok=3),
    }
    for key, kwargs in cases.items():
        with pytest.raises(ConfigError, match=key):
            MiniMaxConfig.from_dict({**small, **kwargs})
    with pytest.raises(ConfigError, match="layer_types"):
        MiniMaxConfig.from_dict({**small, "layer_types": ["full_attention"] * 3, "num_hidden_layers": 4})


# ---- GGUF: llama.cpp's "minimax-01" ------------------------------------------------------------------------------

# what llama.cpp's graph runs: one residual scale (the alphas equal, the betas 1), no window, whole-head RoPE, and
# (as the converter writes no layer pattern) full attention on every 8th layer
GGUF_FAMILY = Family(
    "MiniMaxConfig",
    dict(
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=8,
        layer_types=["linear_attention"] * 7 + ["full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        num_local_experts=3,
        num_experts_per_tok=2,
        block_size=4,
        full_attn_alpha_factor=0.9,
        linear_attn_alpha_factor=0.9,
        mlp_alpha_factor=0.9,
    ),
)


# gguf-py's tensor map for "minimax-01" (MODEL_ARCH.MINIMAX01; the gguf package installed here predates it)
_GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.out_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.output_gate": "attn_gate",
    "self_attn.norm": "attn_norm_2",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "block_sparse_moe.experts.w1": "ffn_gate_exps",
    "block_sparse_moe.experts.w2": "ffn_down_exps",
    "block_sparse_moe.experts.w3": "ffn_up_exps",
}


def write_minimax_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's MiniMaxText01Model converter makes of `hf` (--outtype f32), from the checkpoint files:
    TextModel's keys (the head size), the experts' counts, the one residual scale (it asserts the alphas equal and
    the betas 1), rope.dimension_count (the rotary dimensions: here the whole head); no layer pattern (llama.cpp
    then takes every 8th layer as full attention); the experts stacked, the rest by gguf-py's map (the decay
    tables, which the original checkpoints do not hold, left out); a plain vocabulary."""
    import gguf
    from gguf_mimic import add_text_model, add_toy_vocab, stacked_experts
    from safetensors.torch import load_file

    c, hp = hf.config, json.load(open(f"{hf.name_or_path}/config.json"))
    assert hp["full_attn_alpha_factor"] == hp["linear_attn_alpha_factor"] == hp["mlp_alpha_factor"]
    assert hp["full_attn_beta_factor"] == hp["linear_attn_beta_factor"] == hp["mlp_beta_factor"] == 1
    w = gguf.GGUFWriter(path, "minimax-01")
    add_text_model(w, c)
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_expert_count(hp["num_local_experts"])
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_residual_scale(hp["mlp_alpha_factor"])
    w.add_rope_dimension_count(hp["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".block_sparse_moe.experts.", hp["num_local_experts"]):
        if name.endswith(("_decay", "slope_rate")):
            continue
        base, kind = name.rsplit(".", 1)
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
        out = f"blk.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}" if m else _GGUF_NAMES[base]
        w.add_tensor(f"{out}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as MiniMaxForCausalLM with transformers' logits (the layer kinds by the interval,
    the residual scale as the alphas, the decay tables computed); llama.cpp runs it with close logits (its lightning
    norm takes rms_norm_eps where transformers' takes 1e-6)."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    path = str(tmp_path / "model.gguf")
    write_minimax_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "MiniMaxForCausalLM"
    c = model.config
    assert c.layer_types == hf.config.layer_types and c.head_dim == 24
    assert c.linear_attn_alpha_factor == pytest.approx(0.9) and c.mlp_beta_factor == 1
    with torch.no_grad():
        ours, theirs = model(ROW).logits[0], hf(ROW).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    _close_to_llama_cpp(ours, llama_cpp_logits(path))


def test_gguf_out_writes_no_pattern_where_llama_cpp_assumes_it(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """Full attention on every 8th layer goes out as the converter writes it: no layer pattern at all."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    model = autolm.AutoModelForCausalLM.from_pretrained(GGUF_FAMILY.checkpoint(tmp_path_factory)[0])
    g = GGUFFile(save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32"))
    assert g.get("attention.recurrent_layers") is None and g.get("residual_scale") == pytest.approx(0.9)


def test_gguf_out_of_another_layer_pattern(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """A layer pattern off llama.cpp's every-8th goes out as attention.recurrent_layers (which llama.cpp reads; the
    converter writes none) and reads back as the same model, its decay tables computed."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, _ = WINDOWED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, sliding_window=None)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    g = GGUFFile(path)
    assert g.get("attention.recurrent_layers") == [False, True, False]
    assert not any("decay" in t.name or "slope" in t.name for t in g.tensors)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back.config.layer_types == model.config.layer_types
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-5)


def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """GGUF out: residual factors llama.cpp's one residual scale cannot hold are a ConfigError naming them, and no
    file. GGUF in: a file rotating part of each head (the released MiniMax-Text-01's 64 of 128) is refused."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(MINIMAX.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="alpha_factor") as e:
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert "beta_factor" in str(e.value)
    assert not (tmp_path / "no.gguf").exists()
    from autolm.models.minimax import _gguf_derive

    keys = {"rope.dimension_count": 64, "attention.key_length": 128}
    with pytest.raises(ConfigError, match="rotates whole heads"):
        _gguf_derive({"num_hidden_layers": 8}, lambda k, default=None: keys.get(k, default))
