"""xLSTM against transformers (its native torch kernels: the xlstm package is absent): weight_mode "single" with
biases everywhere (use_bias), chunks of 4 tokens, low gate and logit soft-caps, norms reduced in the model's dtype;
a second checkpoint with weight_mode "fused" (qkv_opreact, ifgate_preact, proj_up_gate_z), no biases, v wider than
q/k, transformers' default caps and chunks of 64 (crossed by the 70-token pieces and the long generation).

transformers 5.23 cannot make or load a fused model (its _init_weights adds tensors of mismatched shapes): the
fused checkpoint is the single one's tensors concatenated, and transformers loads it with _init_weights switched
off (every tensor comes from the file). transformers ignores attention_mask (a left-padded row's padding reaches
its states); autolm's padding leaves the states as they were, so the battery compares with transformers on
unpadded batches (`unpadded`) and test_padding_is_invisible checks left-padded rows against transformers' unpadded
rows."""

from __future__ import annotations

import json
import shutil

import family_checks
import pytest
import torch
from conftest import VOCAB, padded_batch
from family_checks import Family, check_config_defaults

import autolm

TARGETS = ["q", "v", "out_proj", "proj_up", "proj_down"]
SINGLE = Family(
    "xLSTMConfig",
    dict(hidden_size=64, num_hidden_layers=2, num_heads=4, qk_dim_factor=1.0, use_bias=True, chunk_size=4,
         gate_soft_cap=3.0, output_logit_soft_cap=5.0, norm_reduction_force_float32=False),
    lora_targets=TARGETS,
)  # fmt: skip
FUSE = {
    "mlstm_layer.qkv_opreact": ("q", "k", "v", "ogate_preact"),
    "mlstm_layer.ifgate_preact": ("igate_preact", "fgate_preact"),
    "ffn.proj_up_gate_z": ("proj_up_gate", "proj_up"),
}


class Fused(Family):
    """The checkpoint of `kwargs` in weight_mode "single", its tensors fused into weight_mode "fused"'s."""

    def checkpoint(self, tmp_path_factory, dtype=None):
        from safetensors.torch import load_file, save_file

        key = ("fused", repr(sorted(self.kwargs.items())), str(dtype))
        if key not in family_checks._CACHE:
            single, _ = Family(self.config_cls, self.kwargs).checkpoint(tmp_path_factory, dtype)
            d = str(tmp_path_factory.mktemp("xlstm_fused"))
            shutil.copytree(single, d, dirs_exist_ok=True)
            sd = load_file(f"{d}/model.safetensors")
            for name in [n for n in sd if n.endswith(".q.weight")]:
                block = name.rsplit(".mlstm_layer.", 1)[0]
                for fused, parts in FUSE.items():
                    where = f"{block}.{fused.split('.')[0]}"
                    for s in ("weight", "bias"):
                        names = [f"{where}.{p}.{s}" for p in parts]
                        if names[0] in sd:
                            sd[f"{block}.{fused}.{s}"] = torch.cat([sd.pop(n) for n in names])
            save_file(sd, f"{d}/model.safetensors", metadata={"format": "pt"})
            config = json.load(open(f"{d}/config.json"))
            json.dump({**config, "weight_mode": "fused"}, open(f"{d}/config.json", "w"))
            import transformers

            ref = transformers.AutoModelForCausalLM.from_pretrained(d)
            family_checks._CACHE[key] = (d, ref.eval())
        return family_checks._CACHE[key]


FUSED = Fused(
    "xLSTMConfig",
    dict(hidden_size=64, num_hidden_layers=2, num_heads=2, qk_dim_factor=1.0, v_dim_factor=2.0,
         ffn_proj_factor=1.5, ffn_round_up_to_multiple_of=32),
    lora_targets=["qkv_opreact", "out_proj", "proj_up_gate_z"],
)  # fmt: skip


@pytest.fixture(autouse=True)
def loadable_fused(monkeypatch):
    """transformers' _init_weights off (its fused branch fails; every tensor comes from a file or randomize)."""
    import transformers

    monkeypatch.setattr(transformers.xLSTMPreTrainedModel, "_init_weights", lambda self, module: None)


@pytest.fixture
def unpadded(monkeypatch):
    """The battery's batches without padding (each row as long as the longest)."""

    def batch(seed: int = 0, lengths=(13, 9, 4), vocab: int = VOCAB):
        return padded_batch(seed, (max(lengths),) * len(lengths), vocab)

    monkeypatch.setattr(family_checks, "padded_batch", batch)


@pytest.mark.parametrize("family", [SINGLE, FUSED], ids=["single", "fused"])
def test_logits(tmp_path_factory, unpadded, family):
    family.check_logits(tmp_path_factory)


def test_padding_is_invisible(tmp_path_factory):
    """A left-padded batch's rows (logits, and greedy tokens) are transformers' for each row unpadded."""
    for fam in (SINGLE, FUSED):
        directory, hf = fam.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        ids, mask = padded_batch()
        with torch.no_grad():
            ours = model(ids, attention_mask=mask).logits
            for i in range(ids.shape[0]):
                row = ids[i][mask[i].bool()][None]
                torch.testing.assert_close(ours[i][mask[i].bool()], hf(row).logits[0], atol=1e-4, rtol=1e-4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()][None]
        assert torch.equal(out[i, -10:], hf.generate(row, max_new_tokens=10, do_sample=False)[0, -10:])


def test_generate(tmp_path_factory):
    """Greedy and beam search on a batch, and greedy on one row (the one-token step), give transformers' tokens;
    its beam search without its cache (which it cannot reorder: it refuses)."""
    directory, hf = SINGLE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    greedy = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, **greedy), hf.generate(ids, **greedy))
    beam = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, **beam), hf.generate(ids, use_cache=False, **beam))
    row = ids[:1]
    assert torch.equal(model.generate(row, max_new_tokens=16, do_sample=False),
                       hf.generate(row, max_new_tokens=16, do_sample=False))  # fmt: skip


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the chunks of 64 crossed while decoding): transformers' greedy tokens,
    and the decoded logits are those of the whole sequence in one forward."""
    FUSED.check_long_generation(tmp_path_factory, new=45, exact_length=True, whole_atol=1e-4)


@pytest.mark.parametrize("family", [SINGLE, FUSED], ids=["single", "fused"])
def test_pieces(tmp_path_factory, family):
    """70 tokens in pieces through the cache (inside and across chunks of 4, and of 64): one forward's logits and
    transformers'; the float32 (C, n, m) per head each layer keeps."""
    cache = family.check_pieces(tmp_path_factory)
    C, n, m = cache.states[1]
    nh, dqk, dv = (4, 16, 16) if family is SINGLE else (2, 32, 64)
    assert C.shape == (2, nh, dqk, dv) and n.shape == (2, nh, dqk) and m.shape == (2, nh, 1)
    assert {t.dtype for t in (C, n, m)} == {torch.float32}
    assert all(k.shape[-1] == 0 for k in cache.keys)


def test_hidden_states(tmp_path_factory):
    SINGLE.check_hidden_states(tmp_path_factory)


def test_chunks_are_the_recurrence():
    """mlstm_chunked from a given state over 23 tokens (chunks of 5), with padding tokens (i = -inf, no decay)
    among them, equals mlstm_step token by token."""
    from autolm.models.xlstm import mlstm_chunked, mlstm_step

    g = torch.Generator().manual_seed(0)
    b, nh, t, dqk, dv = 2, 3, 23, 4, 6
    q, k = torch.randn(b, nh, t, dqk, generator=g), torch.randn(b, nh, t, dqk, generator=g)
    v, i = torch.randn(b, nh, t, dv, generator=g), 3 * torch.randn(b, nh, t, generator=g)
    logf = torch.nn.functional.logsigmoid(2 * torch.randn(b, nh, t, generator=g))
    i[0, :, :4], logf[0, :, :4] = -torch.inf, 0.0
    state = (torch.randn(b, nh, dqk, dv, generator=g), torch.randn(b, nh, dqk, generator=g),
             torch.randn(b, nh, 1, generator=g))  # fmt: skip
    h, final = mlstm_chunked(q, k, v, i, logf, state, 5, 1e-6)
    hs = []
    for s in range(t):
        out, state = mlstm_step(q[:, :, s], k[:, :, s], v[:, :, s], i[..., s : s + 1], logf[..., s : s + 1], state,
                                1e-6)  # fmt: skip
        hs.append(out)
    torch.testing.assert_close(h, torch.stack(hs, 2), atol=1e-5, rtol=1e-5)
    for a, want in zip(final, state):
        torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)


def test_recurrent(tmp_path_factory, tmp_path):
    """Pieces of a padded batch, speculation, the serving engine and the compiled one-token step's graphs."""
    SINGLE.check_recurrent(tmp_path_factory, tmp_path)


def test_one_token_step(tmp_path_factory):
    FUSED.check_one_token_step(tmp_path_factory)


def test_bf16(tmp_path_factory, unpadded):
    SINGLE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("family", [SINGLE, FUSED], ids=["single", "fused"])
def test_lora(tmp_path_factory, tmp_path, unpadded, family):
    family.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    SINGLE.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("family", [SINGLE, FUSED], ids=["single", "fused"])
def test_save(tmp_path_factory, tmp_path, unpadded, family):
    """transformers' tensor names and shapes (`backbone.blocks.0.mlstm_layer.q.weight`), its config.json keys and
    values, loadable by transformers with equal logits and by autolm bit-identical."""
    model, saved = family.check_saved_files(tmp_path_factory, tmp_path / "a")
    assert type(model).__name__ == "xLSTMForCausalLM"
    name = "qkv_opreact" if family is FUSED else "q"
    assert f"backbone.blocks.1.mlstm_layer.{name}.weight" in saved and "backbone.out_norm.weight" in saved
    family.check_names_and_config(tmp_path_factory, tmp_path / "config")


def test_disk_offload(tmp_path_factory, tmp_path):
    SINGLE.check_disk_offload(tmp_path_factory, tmp_path)


def test_config():
    """transformers' defaults; embedding_dim and num_blocks from hidden_size and num_hidden_layers; the widths as
    transformers' modules size them; the kernel choices of xLSTM-7b's config.json read and kept."""
    from autolm.models.xlstm import xLSTMConfig

    check_config_defaults(xLSTMConfig)
    d = {"hidden_size": 96, "num_hidden_layers": 3, "num_heads": 3, "chunkwise_kernel": "chunkwise--triton_xl_chunk",
         "step_kernel": "triton", "norm_eps": 1e-5}  # fmt: skip
    c = xLSTMConfig.from_dict(d)
    assert (c.embedding_dim, c.num_blocks, c.qk_dim, c.v_dim, c.ffn_width, c.rms_norm_eps) == (
        96,
        3,
        48,
        96,
        256,
        1e-5,
    )
    out = c.to_dict()
    assert out["chunkwise_kernel"] == "chunkwise--triton_xl_chunk" and out["norm_eps"] == 1e-5
    assert not {"num_attention_heads", "rope_parameters", "intermediate_size", "hidden_act"} & set(out)


@pytest.mark.parametrize(
    "key, value",
    [
        ("weight_mode", "grouped"),
        ("mode", "training"),
        ("inference_state_dtype", "bfloat16"),
        ("num_heads", 0),
        ("qk_dim_factor", 0.3),
        ("v_dim_factor", -1.0),
        ("chunk_size", 0),
        ("gate_soft_cap", 0),
        ("output_logit_soft_cap", "30"),
        ("embedding_dim", 32),
        ("num_blocks", 5),
        ("use_bias", "no"),
        ("norm_reduction_force_float32", 1),
        ("ffn_round_up_to_multiple_of", 0),
        ("eps", 0),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.xlstm import xLSTMConfig

    with pytest.raises(autolm.ConfigError, match=key):
        xLSTMConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 4, key: value})
