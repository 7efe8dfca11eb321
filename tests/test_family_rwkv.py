"""RWKV-4 against transformers (its CPU path: the max-tracking WKV recurrence): a checkpoint with rescale_every=2
over 3 blocks (block 2's output and value weights divided, the hidden states halved after block 1) and a large
layer_norm_epsilon (ln_out keeps 1e-5), so the rescaling shows in the logits; one without rescaling with a tied head;
one whose attention width differs from the hidden size (transformers runs it only without a cache).

transformers' RWKV ignores attention_mask (a padded row reads its padding): the battery's comparisons with
transformers run on unpadded batches (the `unpadded` fixture), and autolm's left-padded rows (padding zeroed, the
WKV state kept) are checked against transformers' unpadded rows. The recurrent checks (pieces through the cache,
speculation, the serving engine, the compiled one-token graphs carrying the five state tensors) run on padded
batches, autolm against itself."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB, padded_batch
from family_checks import Family, check_config_defaults

import autolm

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3)
RESCALED = Family(
    "RwkvConfig", dict(SIZES, rescale_every=2, layer_norm_epsilon=0.05), lora_targets=["key", "receptance"]
)
PLAIN = Family("RwkvConfig", dict(SIZES, rescale_every=0, tie_word_embeddings=True))  # peft's default targets
WIDE = Family("RwkvConfig", dict(SIZES, attention_hidden_size=48))


@pytest.fixture
def unpadded(monkeypatch):
    """The battery's batches without padding (lengths all the longest's): transformers ignores attention_mask."""
    import family_checks

    def full(seed=0, lengths=(13, 9, 4), vocab=VOCAB):
        return padded_batch(seed, (max(lengths),) * len(lengths), vocab)

    monkeypatch.setattr(family_checks, "padded_batch", full)


@pytest.mark.parametrize("family", [RESCALED, PLAIN], ids=["rescaled", "plain"])
def test_logits_and_generate(tmp_path_factory, unpadded, family):
    """The battery's logits; greedy and beam search on two rows give transformers' tokens with use_cache=False
    (its one-token step with a state broadcasts a batch of B rows to B x B: only one row decodes right), one row
    transformers' tokens through its state."""
    family.check_logits(tmp_path_factory)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, _ = padded_batch(lengths=(9, 9))
    for kwargs in (dict(max_new_tokens=10), dict(max_new_tokens=6, num_beams=3)):
        ours = model.generate(ids, do_sample=False, **kwargs)
        assert torch.equal(ours, hf.generate(ids, do_sample=False, use_cache=False, **kwargs)), kwargs
    row = ids[:1]
    assert torch.equal(model.generate(row, max_new_tokens=16, do_sample=False),
                       hf.generate(row, max_new_tokens=16, do_sample=False))  # fmt: skip


def test_padded_rows_are_transformers_unpadded_rows(tmp_path_factory):
    """A left-padded batch: each row's logits (real positions) and greedy tokens are transformers' for the row
    alone; transformers' own padded batch differs (it reads the padding), which is why autolm zeroes it."""
    directory, hf = RESCALED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs_padded = hf(ids, attention_mask=mask).logits
        for i in range(ids.shape[0]):
            row = ids[i][mask[i].bool()][None]
            alone = hf(row).logits[0]
            torch.testing.assert_close(ours[i][mask[i].bool()], alone, atol=1e-4, rtol=1e-4)
    short = mask[-1].bool()
    assert not torch.allclose(theirs_padded[-1][short], ours[-1][short], atol=1e-3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()][None]
        want = hf.generate(row, max_new_tokens=10, do_sample=False)[0, row.shape[1] :]
        assert torch.equal(out[i, ids.shape[1] :], want), i


def test_rescale_every(tmp_path_factory):
    """Inference (eval) divides block 2's output / value by 2 and halves after block 1, training mode does not:
    each mode's logits are transformers' in that mode, the two differ (layer_norm_epsilon 0.05), and autolm's
    weights stay the checkpoint's (transformers divides its own in place)."""
    from safetensors.torch import load_file

    directory, hf = RESCALED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        evals = model(ids).logits, hf(ids).logits
        model.train(), hf.train()
        trains = model(ids).logits, hf(ids).logits
        model.eval(), hf.eval()
    torch.testing.assert_close(*evals, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(*trains, atol=1e-4, rtol=1e-4)
    assert (evals[0] - trains[0]).abs().max() > 1e-2
    saved = load_file(f"{directory}/model.safetensors")
    name = "rwkv.blocks.2.attention.output.weight"
    assert torch.equal(model.state_dict()[name], saved[name])


def test_pieces_and_long_generation(tmp_path_factory):
    """70 tokens in pieces through the cache give one forward's and transformers' logits; the cache keeps each
    block's five state tensors in transformers' order (feed-forward x, attention x, num, den, max); a 30-token
    prompt and 45 greedy tokens are transformers'."""
    cache = RESCALED.check_pieces(tmp_path_factory)
    ffn_x, att_x, num, den, mx = cache.states[2]
    assert ffn_x.shape == att_x.shape == num.shape == (2, 64)
    assert num.dtype == den.dtype == mx.dtype == torch.float32
    assert all(k.shape[-1] == 0 for k in cache.keys)
    RESCALED.check_long_generation(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    """Padded pieces, speculation, the serving engine and the compiled one-token graphs."""
    RESCALED.check_recurrent(tmp_path_factory, tmp_path)


def test_one_token_step(tmp_path_factory):
    PLAIN.check_one_token_step(tmp_path_factory)


def test_hidden_states(tmp_path_factory):
    """transformers' hidden_states: each block's output (after the rescaling), then ln_out's."""
    RESCALED.check_hidden_states(tmp_path_factory)


def test_wide_attention(tmp_path_factory):
    """attention_hidden_size 48 (key/value/receptance 64 -> 48, output 48 -> 64, the WKV state 48 wide):
    transformers' logits (it runs this only without a cache: its state is hidden_size wide); pieces agree."""
    directory, hf = WIDE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(ids).logits
        torch.testing.assert_close(whole, hf(ids, use_cache=False).logits, atol=1e-4, rtol=1e-4)
        first = model(ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], past_key_values=first.past_key_values).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), whole, atol=1e-4, rtol=1e-4)
    assert first.past_key_values.states[0][2].shape == (2, 48)


def test_bf16(tmp_path_factory, unpadded):
    RESCALED.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path, unpadded):
    """key / receptance under rescaling; peft's default targets (output and value too) without it (transformers
    divides only the base weight under an adapter: see autolm.models.rwkv)."""
    RESCALED.check_lora(tmp_path_factory, tmp_path / "a")
    PLAIN.check_lora(tmp_path_factory, tmp_path / "b")


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    RESCALED.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path, unpadded):
    """transformers' names (`head.weight`, `pre_ln` in block 0) in the state dict and the saved file; the saved
    config holds the checkpoint's keys and values; a tied head is not saved twice."""
    from safetensors import safe_open

    for fam, out in ((RESCALED, tmp_path / "a"), (PLAIN, tmp_path / "b")):
        fam.check_save(tmp_path_factory, out)
        model, hf = fam.check_names_and_config(tmp_path_factory, out / "config")
        assert model.state_dict().keys() == hf.state_dict().keys() and "head.weight" in model.state_dict()
        directory = fam.checkpoint(tmp_path_factory)[0]
        with (
            safe_open(f"{directory}/model.safetensors", "pt") as theirs,
            safe_open(out / "saved" / "model.safetensors", "pt") as ours,
        ):
            assert set(ours.keys()) == set(theirs.keys())


def test_disk_offload(tmp_path_factory, tmp_path):
    RESCALED.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    check_cli_without_template(RESCALED, tmp_path_factory, tmp_path, "RwkvForCausalLM (rwkv)")


def test_config():
    """transformers' defaults; a released config.json (rwkv-4-169m-pile's keys) read and written back as it is."""
    from autolm.models.rwkv import RwkvConfig

    check_config_defaults(RwkvConfig)
    d = dict(architectures=["RwkvForCausalLM"], attention_hidden_size=768, bos_token_id=0, context_length=1024,
             eos_token_id=0, hidden_size=768, intermediate_size=3072, layer_norm_epsilon=1e-05, model_type="rwkv",
             num_hidden_layers=12, rescale_every=6, tie_word_embeddings=False, use_cache=True, vocab_size=50277)  # fmt: skip
    c = RwkvConfig.from_dict(d)
    assert c.max_position_embeddings > 1 << 20  # no context window: the recurrence runs any length
    assert json.loads(c.to_json_string()) == d
    assert RwkvConfig(hidden_size=100).intermediate_size == 400


@pytest.mark.parametrize(
    "key, value",
    [
        ("attention_hidden_size", 0),
        ("rescale_every", 1.5),
        ("context_length", "1k"),
        ("layer_norm_epsilon", 0),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.rwkv import RwkvConfig

    with pytest.raises(autolm.ConfigError, match=key.replace("layer_norm_epsilon", "rms_norm_eps")):
        RwkvConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 2, key: value})
