"""Tensor parallelism with 2 processes (gloo, CPU) launched by torchrun, against one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import padded_batch, positions

import autolm
from autolm.errors import ConfigError

_TP = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import autolm
    from conftest import padded_batch, positions
    torch.set_num_threads(1)
    model = autolm.AutoModelForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto")
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    weights = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                  for n, p in model.named_parameters() if ".layers." in n)
    cache = autolm.KVCache.for_model(model, 1, 8)
    torch.save({"logits": logits, "tokens": tokens, "layer_bytes": weights, "kv_heads": cache.keys[0].shape[1]},
               f"{sys.argv[2]}.{dist.get_rank()}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called ...")
""")


def torchrun(script: str, *args: str, nproc: int = 2) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                          "--master-addr", "127.0.0.1", "--master-port", str(port), script, *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.parametrize("name", ["llama_gqa_llama3_sharded", "qwen2_tied_bias", "qwen3"])
def test_tensor_parallel_equals_one_process(checkpoint, tmp_path, name):
    directory, _ = checkpoint(name)
    script = tmp_path / "tp.py"
    script.write_text(_TP)
    torchrun(str(script), directory, str(tmp_path / "out"))
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    full = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." in n)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(r["logits"], ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(r["tokens"], want)
        assert r["layer_bytes"] < 0.55 * full  # about half: only the small norms are replicated
        assert r["kv_heads"] == model.config.num_key_value_heads // 2


def test_tp_plan_outside_torchrun_is_a_clear_error(checkpoint, monkeypatch):
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
