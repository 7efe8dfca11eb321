"""The README's Python snippets run as written: every ```python block, in order, in one process, in a
folder laid out as the snippets assume (./dir, ./my-model, ./adapter, a local lm-eval task, and the
default model's repo id in a Hugging Face cache). Blocks that need something a test machine lacks say
so on their fence (```python (with `autolm serve` running)) and are only compiled."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[tuple[str, str]]:
    """(what follows ```python on the fence, the code) for each Python block of the README."""
    text = open(README, encoding="utf-8").read()
    return [
        (m.group(1).strip(), m.group(2))
        for m in re.finditer(r"^```python([^\n]*)\n(.*?)^```", text, re.M | re.S)
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smol_dir, smol_gguf):
    from test_loading import hf_cache_layout, link_or_copy

    import autolm
    from autolm.lora import LoraConfig, get_peft_model

    w = tmp_path_factory.mktemp("readme")
    hf_cache_layout(
        smol_dir,
        w / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct",
        "1234567890abcdef1234567890abcdef12345678",
    )
    shutil.copytree(smol_dir, w / "dir", copy_function=link_or_copy)
    link_or_copy(os.path.join(*smol_gguf), w / "dir" / "model.gguf")
    os.symlink(w / "dir", w / "my-model")
    get_peft_model(
        autolm.AutoModelForCausalLM.from_pretrained(smol_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    ).save_pretrained(w / "adapter")
    (w / "my-tasks").mkdir()
    (w / "my-tasks" / "data.jsonl").write_text(
        '{"question": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}\n'
    )
    (w / "my-tasks" / "my_task.yaml").write_text(
        f"task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {w / 'my-tasks' / 'data.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    )
    return w


def test_every_block_either_runs_or_says_why_not():
    blocks = python_blocks()
    assert len(blocks) >= 5
    for info, code in blocks:
        compile(code, "README.md", "exec")
        assert info == "" or re.fullmatch(r"\(.+\)", info), (
            f"```python {info}: say why it is not run, in brackets"
        )


def test_readme_python_blocks_run_as_written(workspace, tmp_path):
    pytest.importorskip("lm_eval")
    from autolm._util import autolm_home

    script = "\n\n".join(code for info, code in python_blocks() if info == "")
    # a fresh home, but the suite's compiled graphs (a cache keyed by what it compiled): precompile_decode()
    # in the README then loads what another test compiled for the same model, or compiles it for them
    shared = os.path.join(autolm_home(), "compiled")
    os.makedirs(shared, exist_ok=True)
    (tmp_path / "home").mkdir()
    os.symlink(shared, tmp_path / "home" / "compiled")
    env = dict(
        os.environ,
        HF_HUB_CACHE=str(workspace / "hub"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        AUTOLM_HOME=str(tmp_path / "home"),
    )
    p = subprocess.run(
        [sys.executable, "-c", script], cwd=workspace, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "'disk'" in p.stdout  # the offloading example placed blocks on disk
    for made in ("my-adapter", "merged", "dir-int4"):
        assert (workspace / made).exists(), made
