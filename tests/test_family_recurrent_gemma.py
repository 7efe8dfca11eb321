"""RecurrentGemma (Griffin) against transformers: recurrent blocks (conv + RG-LRU, lru_width unlike hidden_size) and
local MQA attention blocks by block_types (cycled), Gemma's scaled inputs (sqrt(48) rounded to bfloat16) and norms,
partial rotary, soft-capped logits; a second checkpoint with the default block pattern over 4 layers, GQA, full
rotary, a 3-tap conv, exact GeLU and a low soft-cap. Generations run far past the attention window.

transformers lets a left-padded row's padding reach its recurrent blocks (its padded rows differ from its own
unpadded ones); autolm zeroes the padding's conv inputs, so the battery compares with transformers on unpadded
batches (`unpadded`) and test_padding_is_invisible checks left-padded rows against transformers' unpadded rows."""

from __future__ import annotations

import family_checks
import pytest
import torch
from conftest import VOCAB, padded_batch
from family_checks import Family, check_config_defaults

import autolm

TARGETS = ["q_proj", "v_proj", "linear_x", "linear_y", "linear_out", "gate_proj", "up_proj", "down_proj"]
GRIFFIN = Family(
    "RecurrentGemmaConfig",
    dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
         lru_width=64, attention_window_size=8, block_types=["recurrent", "attention"], attention_bias=True),
    lora_targets=TARGETS,
)  # fmt: skip
DEFAULTS = Family(
    "RecurrentGemmaConfig",
    dict(hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
         attention_window_size=6, conv1d_width=3, logits_soft_cap=5.0, hidden_activation="gelu",
         rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}),
    lora_targets=TARGETS,
)  # fmt: skip


@pytest.fixture
def unpadded(monkeypatch):
    """The battery's batches without padding (each row as long as the longest)."""

    def batch(seed: int = 0, lengths=(13, 9, 4), vocab: int = VOCAB):
        return padded_batch(seed, (max(lengths),) * len(lengths), vocab)

    monkeypatch.setattr(family_checks, "padded_batch", batch)


def test_logits(tmp_path_factory, unpadded):
    GRIFFIN.check_logits(tmp_path_factory)
    DEFAULTS.check_logits(tmp_path_factory)


def test_padding_is_invisible(tmp_path_factory):
    """A left-padded batch's rows (logits, and greedy tokens) are transformers' for each row unpadded."""
    for fam in (GRIFFIN, DEFAULTS):
        directory, hf = fam.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        ids, mask = padded_batch()
        with torch.no_grad():
            ours = model(ids, attention_mask=mask).logits
            for i in range(ids.shape[0]):
                row = ids[i][mask[i].bool()][None]
                torch.testing.assert_close(ours[i][mask[i].bool()], hf(row).logits[0], atol=1e-4, rtol=1e-4)
        if fam is DEFAULTS:
            continue  # the generation once
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        for i in range(ids.shape[0]):
            row = ids[i][mask[i].bool()][None]
            assert torch.equal(out[i, -10:], hf.generate(row, max_new_tokens=10, do_sample=False)[0, -10:])


def test_generate(tmp_path_factory):
    """Greedy and beam search on a batch give transformers' tokens; its beam search without its cache (its cache
    keeps the recurrent states in the modules, which beam search does not reorder)."""
    directory, hf = GRIFFIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    greedy = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, **greedy), hf.generate(ids, **greedy))
    beam = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, **beam), hf.generate(ids, use_cache=False, **beam))


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 45 new tokens, windows of 8 and 6 keys: transformers' greedy tokens, and the decoded
    logits are those of the whole sequence in one forward."""
    for fam in (GRIFFIN, DEFAULTS):
        fam.check_long_generation(tmp_path_factory, new=45, exact_length=True, whole_atol=1e-4)


def test_pieces(tmp_path_factory):
    """70 tokens in pieces through the cache: one forward's logits and transformers'; the state each recurrent
    layer keeps (the conv's last inputs, the RG-LRU's float32 state)."""
    cache = GRIFFIN.check_pieces(tmp_path_factory)
    conv, lru = cache.states[0]
    assert conv.shape == (2, 64, 3) and lru.shape == (2, 64) and lru.dtype == torch.float32
    assert 1 not in cache.states  # the attention layer keeps keys and values only


def test_recurrent(tmp_path_factory, tmp_path):
    """Pieces of a padded batch, speculation, the serving engine and the compiled one-token step's graphs."""
    GRIFFIN.check_recurrent(tmp_path_factory, tmp_path)


def test_one_token_step(tmp_path_factory):
    DEFAULTS.check_one_token_step(tmp_path_factory)


def test_hidden_states(tmp_path_factory):
    GRIFFIN.check_hidden_states(tmp_path_factory)


def test_bf16(tmp_path_factory, unpadded):
    GRIFFIN.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path, unpadded):
    GRIFFIN.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GRIFFIN.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path, unpadded):
    """transformers' tensor names and shapes, its config.json keys and values (head_dim and
    final_w_init_variance_scale as it derives them), loadable by transformers with equal logits."""
    for fam, out in ((GRIFFIN, tmp_path / "a"), (DEFAULTS, tmp_path / "b")):
        model, _ = fam.check_saved_files(tmp_path_factory, out)
        assert type(model).__name__ == "RecurrentGemmaForCausalLM"
        fam.check_names_and_config(tmp_path_factory, out / "config")


def test_disk_offload(tmp_path_factory, tmp_path):
    GRIFFIN.check_disk_offload(tmp_path_factory, tmp_path)


def test_config():
    """transformers' defaults; the derived fields as it derives them; its names for autolm's fields; the block kinds
    cycled over the layers."""
    from autolm.models.recurrent_gemma import RecurrentGemmaConfig

    check_config_defaults(RecurrentGemmaConfig)
    d = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 5, "head_dim": 99,
         "hidden_activation": "gelu", "attention_window_size": 16}  # fmt: skip
    c = RecurrentGemmaConfig.from_dict(d)
    assert (c.head_dim, c.lru_width, c.final_w_init_variance_scale) == (16, 64, 0.4)
    assert (c.hidden_act, c.hidden_activation, c.sliding_window, c.attention_window_size) == (
        "gelu",
        "gelu",
        16,
        16,
    )
    assert c.rope_parameters["partial_rotary_factor"] == 0.5
    assert (
        c.layers_block_type
        == ["linear_attention", "linear_attention", "sliding_attention"] + ["linear_attention"] * 2
    )
    out = c.to_dict()
    assert out["attention_window_size"] == 16 and "sliding_window" not in out
    assert (
        out["hidden_activation"] == "gelu"
        and "hidden_act" not in out
        and "max_position_embeddings" not in out
    )


def test_config_errors_name_the_key():
    from autolm.models.recurrent_gemma import RecurrentGemmaConfig

    for kwargs, key in (
        (dict(block_types=["recurrent", "mlp"]), "block_types"),
        (dict(block_types=[]), "block_types"),
        (dict(lru_width=2561), "lru_width"),
        (dict(conv1d_width=0), "conv1d_width"),
        (dict(logits_soft_cap=0), "logits_soft_cap"),
        (dict(attention_window_size=None), "attention_window_size"),
        (dict(attention_bias="no"), "attention_bias"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_parameters"),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            RecurrentGemmaConfig(**kwargs)
