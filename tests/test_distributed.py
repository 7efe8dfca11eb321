"""torch.distributed with 2 processes (gloo, CPU) launched by torchrun, against one process:
tensor-parallel inference, FSDP2 fine-tuning (LoRA and full), and the CLI's --tp / --nproc."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import padded_batch, positions, write_char_tokenizer
from safetensors.torch import load_file

import autolm
from autolm.errors import ConfigError
from autolm.lora import LoraConfig, get_peft_model
from autolm.train import TrainConfig, finetune

_TP = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import autolm
    from autolm.distributed import exit_all
    from conftest import padded_batch, positions
    torch.set_num_threads(1)
    for directory, out in zip(sys.argv[1::2], sys.argv[2::2]):  # one launch for every checkpoint
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
        ids, mask = padded_batch()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        weights = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                      for n, p in model.named_parameters() if n.startswith(model.layers_prefix + "."))
        cache = model.make_cache(1, 8)
        rows = {n: (p.to_local() if hasattr(p, "to_local") else p).shape[0] for n, p in model.named_parameters()
                if n in (model.embeddings_name + ".weight", "lm_head.weight")}
        torch.save({"logits": logits, "tokens": tokens, "layer_bytes": weights,
                    "kv_heads": next(k.shape[1] for k in cache.keys if k.shape[3]), "vocab_rows": rows},
                   f"{out}.{dist.get_rank()}")
    exit_all()  # skips interpreter teardown, which gloo's threads can abort
""")


_FSDP = textwrap.dedent("""
    import os, sys, json, torch, torch.distributed as dist
    from autolm.distributed import exit_all, fsdp_from_pretrained
    from autolm.lora import LoraConfig
    from autolm.tokenizer import AutoTokenizer
    from autolm.train import TrainConfig, finetune
    torch.set_num_threads(1)
    directory, data, out, lora, train = sys.argv[1:6]
    torch.manual_seed(0)
    lora = LoraConfig(**json.loads(lora)) if lora != "full" else None
    model = fsdp_from_pretrained(directory, lora)
    base = getattr(model, "base_model", model)
    local = sum(p.to_local().numel() for n, p in base.named_parameters() if ".lora_" not in n)
    losses = finetune(model, AutoTokenizer.from_pretrained(directory), data, out, TrainConfig(**json.loads(train)))
    torch.save({"losses": losses, "local": local}, f"{out}.{dist.get_rank()}")
    exit_all()
""")


def torchrun(script: str, *args: str, nproc: int = 2) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            script,
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]


_TP_FAMILIES = [
    "llama_gqa_llama3_sharded",
    "qwen2_tied_bias",
    "qwen3",
    "phi3_longrope",
    "olmo2",
    "granite",
    "smollm3_nope",
    "gemma2",
    "gemma3_text",
    "mixtral",
    "qwen2_moe",
    "starcoder2",
    "phi_qk_norm",
    "gpt_neox",
    "olmo",
    "granitemoe",
    "cohere_qk_norm",
    "glm4",
    "exaone4",
    "olmoe",
    "olmo3",
    "ernie4_5",
    "nemotron",
    "arcee",
    "glm4_moe",
    "dots1",
    "kolibri1",
    "ernie4_5_moe",
    "seed_oss",
    "hunyuan_v1_dense",
    "falcon_40b",
    "falcon_rw",
    "deepseek_v3",
    "deepseek_v32",
    "mistral4",
    "axk1",
    "axk2",
    "solar_open",
    "youtu",
    "apertus",
    "helium",
    "aria_text",
    "jais2",
    "cwm",
    "hyperclovax",
    "granitemoeshared",
    "vaultgemma",
    "nanochat",
    "ministral3",
    "ministral",
    "minimax_m2",
    "hunyuan_v1_moe",
    "hy_v3",
    "exaone_moe",
    "minicpm3",
    "glm",
    "cohere2",
    "qwen3_5_text",
    "qwen3_next",
    "bailing_hybrid",
    "inkling_text",
    "inkling2_text",
    "qwen4_exp_text",
    "granitemoehybrid",
    "lfm2_moe",
    "lfm2",
    "dbrx",
    "phimoe",
    "afmoe",
    "beam",
    "mimo_v2_flash",
    "laguna",
    "mellum",
    "granite_swa",
    "granitemoe_swa",
    "step3p7",
    "flint",
    "kimi_linear",
    "longcat_flash",
    "gemma4_text",
    "gemma4_unified_text",
    "llama4_text",
    "nemotron_h",
    "falcon_h1",
    "jamba",
    "minimax",
    "bamba",
    "flex_olmo",
    "gptj",
    "codegen",
    "stablelm_qk_norm",
    "doge_moe",
    "deepseek_v4",
    "minimax_m3_vl_text",
    "glm5_next",
    "molmo2_olmo",
    "molmo2_qwen3",
    "muse_glimmer",
    "muse_spark",
    "ernie4_5_vl_moe_text",
    "deepseek_ocr2_text",
    "unlimited_ocr_text",
    "cosmos3_edge_text",
    "paddleocr_vl_text",
    "mistral_large4_text",
]

# the share of the layers' bytes a rank holds where a family keeps more than norms whole on every rank, as
# transformers' plans do: Muse Spark's experts (each one's output norm needs all of it), Mistral Large 4's attention
_TP_SHARE = {"muse_spark": 0.7, "mistral_large4_text": 0.7}


@pytest.fixture(scope="module")
def tensor_parallel(checkpoint, tmp_path_factory, request):
    """Every selected family's checkpoint run tensor-parallel by 2 processes, in one torchrun launch: name -> the
    directory and where rank r's results are (out.r). (-k selects the families the launch runs.)"""
    tmp = tmp_path_factory.mktemp("tp")
    script = tmp / "tp.py"
    script.write_text(_TP)
    test = test_tensor_parallel_equals_one_process.__name__
    chosen = {
        i.callspec.params["name"] for i in request.session.items if getattr(i, "originalname", "") == test
    }
    runs = {name: (checkpoint(name)[0], str(tmp / name)) for name in _TP_FAMILIES if name in chosen}
    torchrun(str(script), *(x for pair in runs.values() for x in pair))
    return runs


@pytest.mark.parametrize("name", _TP_FAMILIES)
def test_tensor_parallel_equals_one_process(tensor_parallel, name):
    directory, out = tensor_parallel[name]
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    full = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if n.startswith(model.layers_prefix + ".")
    )
    for rank in (0, 1):
        r = torch.load(f"{out}.{rank}")
        tol = 1e-4 if model.recurrent else 1e-5  # recurrent scans sum in their own order (as in test_models)
        # the ranks' partial sums round apart in proportion to the logits' size (Step 3.5's by 1.2e-5 once)
        scale = max(1.0, float(ref.abs().max()) / 4)
        torch.testing.assert_close(r["logits"], ref, atol=tol * scale, rtol=tol)
        assert torch.equal(r["tokens"], want)
        # about half: only the small norms are replicated (and a hybrid model's recurrent mixers, run whole)
        assert r["layer_bytes"] < _TP_SHARE.get(name, 0.9 if model.recurrent else 0.55) * full
        # Heads are split where o_proj takes a slice of them; where the attention's outputs are gathered
        # (rowwise_split: Phi-3, OLMo 2) every rank runs every head.
        attn = {  # the attention's output projection (Nemotron-H's is `mixer.o_proj`)
            s
            for n, s in model.tp_plan().items()
            if ("att" in n or n.endswith("o_proj")) and s.startswith("rowwise")
        }
        split = attn == {"rowwise"}
        assert r["kv_heads"] == model.config.num_key_value_heads // (2 if split else 1)
        # Untied embeddings and head are vocabulary-parallel; a tied pair stays replicated. (Molmo 2's
        # embeddings have rows beyond the head's.)
        share = 1 if model.config.tie_word_embeddings else 2
        rows = {n: p.shape[0] // share for n, p in model.named_parameters() if n in r["vocab_rows"]}
        assert r["vocab_rows"] == rows and model.config.vocab_size // share in rows.values()


def test_tp_plan_or_fsdp_outside_torchrun_is_a_clear_error(checkpoint, monkeypatch):
    from autolm.distributed import fsdp_from_pretrained

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
    with pytest.raises(ConfigError, match="torchrun"):
        fsdp_from_pretrained(directory, LoraConfig())


def _with_tokenizer_and_data(checkpoint, tmp_path, name):
    """A copy of a tiny checkpoint with a character tokenizer, and prompt/completion training data."""
    directory = str(tmp_path / name)
    shutil.copytree(checkpoint(name)[0], directory)
    write_char_tokenizer(directory)
    data = tmp_path / "data.jsonl"
    rows = [
        {"prompt": f"Question {i}: what is {i} + {i}?", "completion": f" It is {2 * i}."} for i in range(7)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return directory, str(data)


@pytest.mark.parametrize(
    "name,lora,train",
    [
        # 7 rows in batches of 3 with 2 micro-batches per step: uneven shares, and ranks with no rows of their own.
        (
            "llama_gqa_llama3_sharded",
            dict(r=4, lora_alpha=8, target_modules="all-linear"),
            dict(max_steps=3, lr=1e-2, batch_size=3, grad_accum=2, gradient_checkpointing=True),
        ),
        (
            "qwen2_tied_bias",
            dict(r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"], bias="lora_only"),
            dict(max_steps=4, lr=1e-2, batch_size=1, grad_accum=1),
        ),
        ("qwen2_tied_bias", "full", dict(max_steps=3, lr=1e-3, batch_size=4, grad_accum=1)),
    ],
)
def test_fsdp_finetune_equals_one_process(checkpoint, tmp_path, name, lora, train):
    directory, data = _with_tokenizer_and_data(checkpoint, tmp_path, name)
    train = dict(train, progress=False)
    script = tmp_path / "fsdp.py"
    script.write_text(_FSDP)
    torchrun(
        str(script),
        directory,
        data,
        str(tmp_path / "fsdp"),
        json.dumps(lora) if lora != "full" else "full",
        json.dumps(train),
    )

    torch.manual_seed(0)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    full_numel = sum(p.numel() for p in model.parameters())
    if lora != "full":
        model = get_peft_model(model, LoraConfig(**lora))
    losses = finetune(
        model,
        autolm.AutoTokenizer.from_pretrained(directory),
        data,
        str(tmp_path / "one"),
        TrainConfig(**train),
    )

    weights = "model.safetensors" if lora == "full" else "adapter_model.safetensors"
    want, got = load_file(tmp_path / "one" / weights), load_file(tmp_path / "fsdp" / weights)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-6, rtol=1e-5)
    if lora != "full":
        assert max(want[k].abs().max() for k in want if "lora_B" in k) > 1e-3  # training moved the adapter
        config = json.loads((tmp_path / "fsdp" / "adapter_config.json").read_text())
        assert config == json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    for rank in (0, 1):
        r = torch.load(tmp_path / f"fsdp.{rank}")
        assert r["losses"] == pytest.approx(losses, rel=1e-5)
        assert r["local"] <= 0.5 * full_numel + 64  # each rank holds its half of the base weights, no more


def test_cli_wraps_torchrun_for_finetune_and_generate(checkpoint, tmp_path):
    """`autolm finetune --nproc 2` trains the same adapter as one process; `autolm generate --tp 2` prints the same text."""
    directory, data = _with_tokenizer_and_data(checkpoint, tmp_path, "qwen2_tied_bias")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "autolm.cli"]
    train = [
        directory,
        data,
        "--max-steps",
        "3",
        "--batch-size",
        "3",
        "--lr",
        "1e-2",
        "--lora-targets",
        "all-linear",
    ]
    outs = {}
    for extra in ([], ["--nproc", "2"]):
        out = str(tmp_path / f"adapter{len(extra)}")
        r = subprocess.run(
            cli + ["finetune", *train, "--out", out, *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("adapter saved") == 1  # rank 0 alone reports
        outs[len(extra)] = load_file(os.path.join(out, "adapter_model.safetensors"))
    for k in outs[0]:
        torch.testing.assert_close(outs[2][k], outs[0][k], atol=2e-6, rtol=1e-5)

    texts = {}
    for extra in ([], ["--tp", "2"]):
        r = subprocess.run(
            cli + ["generate", directory, "Hello there", "--max-new-tokens", "12", *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        texts[len(extra)] = r.stdout
    assert texts[2] == texts[0] and len(texts[0].strip()) > 0
