"""save_pretrained: the HF layout, loadable by transformers and by autolm bit for bit; atomic."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from conftest import VOCAB, hf_reference

import autolm


def _ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name,dtype,shard",
    [
        ("llama_gqa_llama3_sharded", torch.float32, "30KB"),
        ("qwen2_tied_bias", torch.float32, "5GB"),
        ("qwen2_tied_bias", torch.bfloat16, "20KB"),
        ("mistral_sliding", torch.bfloat16, "5GB"),
    ],
)
def test_saved_checkpoint_loads_in_transformers_and_back(checkpoint, tmp_path, name, dtype, shard):
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size=shard)
    files = os.listdir(out)
    assert "config.json" in files and "generation_config.json" in files
    saved = json.loads((out / "config.json").read_text())  # the keys transformers' config of the family has
    theirs = set(json.loads(transformers.AutoConfig.from_pretrained(directory).to_json_string()))
    assert set(saved) - theirs == set() and saved["dtype"] == str(dtype).removeprefix("torch.")
    if shard == "5GB":
        assert "model.safetensors" in files
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert index["metadata"]["total_size"] == sum(
            p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
        )
    if model.config.tie_word_embeddings:
        from autolm.sources import CheckpointSource

        names = [n for _, n, _ in CheckpointSource(str(out)).tensors()]
        assert "lm_head.weight" not in names  # tied weights are stored once
    ref = hf_reference(out, dtype="auto")
    back = autolm.AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == dtype
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(ref(_ids()).logits, model(_ids()).logits, atol=1e-5, rtol=1e-5)
    # transformers' static-cache generation reads more of the config (a null layer_types once broke it).
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(
        ref.generate(_ids(), cache_implementation="static", **kw), model.generate(_ids(), **kw)
    )


def test_unknown_config_keys_survive_a_save(checkpoint, tmp_path):
    directory, _ = checkpoint("qwen2_tied_bias")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    model.config.extra["my_key"] = [1, 2]
    model.save_pretrained(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["my_key"] == [1, 2]


def test_interrupted_save_leaves_previous_model_intact(checkpoint, tmp_path, monkeypatch):
    import autolm.saving as saving

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    target = tmp_path / "model"
    model.save_pretrained(target, max_shard_size="30KB")
    (target / "README.md").write_text("my notes")
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    calls = {"n": 0}
    real = saving.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(saving, "save_file", failing)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(target, max_shard_size="30KB")
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert [p for p in os.listdir(tmp_path) if p != "model"] == []  # no temporary left behind
    monkeypatch.setattr(saving, "save_file", real)
    model.save_pretrained(target, max_shard_size="5GB")  # a later good save replaces it, keeps README.md
    assert (target / "README.md").read_text() == "my notes"
    assert "model.safetensors" in os.listdir(target) and "model.safetensors.index.json" not in os.listdir(
        target
    )


def test_merged_lora_model_saves_as_plain_checkpoint(checkpoint, tmp_path):
    from autolm.lora import LoraConfig, get_peft_model

    directory, _ = checkpoint("qwen3")
    pm = get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), LoraConfig(r=2))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    with torch.no_grad():
        expected = pm(_ids()).logits
    merged = pm.merge_and_unload()
    merged.save_pretrained(tmp_path / "m")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any("lora" in k for k in back.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, expected, atol=1e-5, rtol=1e-5)
