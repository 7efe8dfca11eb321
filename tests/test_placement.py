"""device_map / max_memory planning, disk offload, and the peak memory of loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import padded_batch, positions

import autolm
from autolm.errors import ConfigError
from autolm.load.placement import blocks, plan, resolve_device_map


def _weight_bytes(model, dtype) -> int:
    return sum(p.numel() * dtype.itemsize for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize(
    "name,dtype",
    [
        (
            "llama_gqa_llama3_sharded",
            torch.float32,
        ),  # safetensors in the right dtype: read from the checkpoint
        ("llama_gqa_llama3_sharded", torch.bfloat16),  # cast: copies written to the offload folder
        ("qwen2_tied_bias", torch.float32),  # tied LM head follows the embeddings
    ],
)
def test_disk_offload_gives_the_same_logits_and_tokens(checkpoint, tmp_path, name, dtype):
    directory, _ = checkpoint(name)
    full = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    half = _weight_bytes(full, dtype) // 2
    offload = tmp_path / "offload"
    model = autolm.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, device_map="auto", max_memory={"cpu": half, "disk": 0}, offload_folder=offload
    )
    dmap = model.hf_device_map
    assert "disk" in dmap.values() and "cpu" in dmap.values()
    on_cpu = sum(size for block, size in blocks(model) if dmap[block] == "cpu")
    # blocks() of a dispatched model sees meta tensors of the right dtype, so sizes are still exact
    assert 0 < on_cpu <= half
    order = [dmap[b] for b, _ in blocks(model) if b != "lm_head" or not model.config.tie_word_embeddings]
    assert order == sorted(order, key=lambda d: d == "disk")  # cpu blocks first, then disk, never interleaved
    written = os.listdir(offload) if offload.exists() else []
    assert (len(written) > 0) == (dtype != torch.float32)

    ids, mask = padded_batch()
    with torch.no_grad():
        ref = full(ids, attention_mask=mask, position_ids=positions(mask)).logits
        out = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for block, device in dmap.items():
        if device == "disk":  # brought in for the forward pass only
            assert all(p.device.type == "meta" for p in model.get_submodule(block).parameters()), block
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), full.generate(ids, **kwargs))


def test_planner_spreads_layers_over_gpus_from_sizes():
    units = (
        [("model.embed_tokens", 40)]
        + [(f"model.layers.{i}", 10) for i in range(8)]
        + [("model.norm", 1), ("lm_head", 40)]
    )
    seq = plan(units, {"cuda:0": 100, "cuda:1": 100, "cpu": 1000}, "sequential")
    assert [seq[f"model.layers.{i}"] for i in range(8)] == ["cuda:0"] * 6 + ["cuda:1"] * 2
    assert seq["lm_head"] == "cuda:1"
    bal = plan(units, {"cuda:0": 1000, "cuda:1": 1000, "cpu": 1000}, "balanced")
    used = {d: sum(s for n, s in units if bal[n] == d) for d in ("cuda:0", "cuda:1")}
    assert bal["model.embed_tokens"] == "cuda:0" and bal["lm_head"] == "cuda:1"
    assert abs(used["cuda:0"] - used["cuda:1"]) <= 40  # about even: within one block
    spill = plan(units, {"cuda:0": 60, "cpu": 50, "disk": 0}, "auto")
    assert spill["model.embed_tokens"] == "cuda:0" and spill["model.layers.1"] == "cuda:0"
    assert spill["model.layers.2"] == "cpu" and spill["lm_head"] == "disk"
    tied = plan(units[:-1] + [("lm_head", 0)], {"cuda:0": 50, "cuda:1": 200}, "sequential", tied=True)
    assert tied["lm_head"] == tied["model.embed_tokens"] == "cuda:0"
    with pytest.raises(ConfigError, match="cannot hold block 'model.layers.6'"):
        plan(units, {"cpu": 100}, "sequential")
    with pytest.raises(ConfigError, match="not supported"):
        plan(units, {"cpu": 100}, "fastest")


def test_device_map_dicts_are_checked(checkpoint):
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    dmap = resolve_device_map(model, {"model.layers": "disk", "": "cpu"})
    assert dmap["model.layers.1"] == "disk" and dmap["lm_head"] == "cpu"
    with pytest.raises(ConfigError, match="split block 'model.layers.0.mlp'"):
        resolve_device_map(model, {"model.layers.0.mlp.up_proj": "cpu", "": "cpu"})
    with pytest.raises(ConfigError, match="names no module"):
        resolve_device_map(model, {"decoder": "cpu"})
    with pytest.raises(ConfigError, match="does not place block 'lm_head'"):
        resolve_device_map(model, {"model": "cpu"})
    assert set(resolve_device_map(model, "cpu").values()) == {"cpu"}


def test_disk_without_offload_folder_is_an_error_when_a_copy_is_needed(checkpoint):
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    with pytest.raises(ConfigError, match="offload_folder"):
        autolm.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.bfloat16, device_map={"model.layers": "disk", "": "cpu"}
        )


_PEAK = textwrap.dedent("""
    import json, sys, torch
    import autolm
    def status(key):  # bytes; VmHWM is this process's peak RSS (ru_maxrss would count the parent's, via fork)
        line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    before = status("VmRSS")
    model = autolm.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2],
                                                        quantization=sys.argv[3] if len(sys.argv) > 3 else None)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # touch every weight
    peak = status("VmHWM")
    from autolm.quant import memory_report
    print(json.dumps({"before": before, "peak": peak, "weights": memory_report(model)[0]}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc")
def test_peak_rss_of_loading(tmp_path):
    """Own dtype: about the weight bytes (zero-copy). Converting: below the result + largest shard.
    Quantizing: below the result + largest shard + the largest tensor in bf16 (one tensor at a time)."""
    cfg = autolm.LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = autolm.AutoModelForCausalLM.from_config(cfg)
    directory = tmp_path / "ckpt"
    model.save_pretrained(directory, max_shard_size="40MB")
    weights = _weight_bytes(model, torch.float32)
    shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    largest = max(os.path.getsize(directory / f) for f in shards)
    assert len(shards) > 2
    del model

    def peak(*args: str) -> tuple[int, int]:
        """The smaller of two runs' peaks: a one-off allocation elsewhere in a process can add ~8 MB."""
        runs = []
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", _PEAK, str(directory), *args],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append((r["peak"] - r["before"], r["weights"]))
        return min(runs)

    slack = 16e6  # activations, allocator and interpreter noise
    one_tensor = (
        cfg.vocab_size * cfg.hidden_size * 2
    )  # the largest tensor, converted to bf16 before quantizing
    own, _ = peak("float32")
    assert own <= weights + slack, (own, weights)
    converted, _ = peak("bfloat16")
    assert converted <= weights // 2 + largest + slack, (converted, weights // 2, largest)
    quantized, result = peak("bfloat16", "int8")  # quantized layer by layer: never the whole float model
    assert result < weights // 3
    assert quantized <= result + largest + one_tensor + slack, (quantized, result, largest)
