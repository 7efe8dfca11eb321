"""Nothing lost, nothing corrupted, every bad input gets autolm's own error: one test per defect class
(adapter loading, saving, config types, resource bombs, raw exceptions, compressed .bin, NaN logits)."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

import autolm
from autolm.errors import (
    AdapterError,
    AutolmError,
    CheckpointError,
    ConfigError,
    GenerationError,
    GGUFError,
    TokenizerError,
)
from autolm.lora import LoraConfig, PeftModel, get_peft_model

NAME = "qwen2_tied_bias"
IDS = torch.tensor([[1, 5, 9, 33, 7]])


@pytest.fixture
def model_dir(checkpoint, tmp_path):
    directory, _ = checkpoint(NAME)
    d = tmp_path / "m"
    shutil.copytree(directory, d)
    return d


def _edit_config(d, **change):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))


# ---- 1. adapter loading is all or nothing ----------------------------------------------------------


def _saved_adapter(model_dir, tmp_path, **kw):
    pm = get_peft_model(
        autolm.AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw),
    )
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("damage", ["rank", "extra_tensor", "bad_config"])
def test_failed_adapter_load_leaves_the_base_model_untouched(model_dir, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    adapter = _saved_adapter(model_dir, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    sd = load_file(weights)
    if damage == "rank":
        key = next(k for k in sd if k.endswith("lora_A.weight") and ".layers.1." in k)
        sd[key] = torch.zeros(8, sd[key].shape[1])
    elif damage == "extra_tensor":
        sd["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 48)
    if damage == "bad_config":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["lora_dropout"] = "high"
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(sd, weights)
    base = autolm.AutoModelForCausalLM.from_pretrained(model_dir)
    names = [n for n, _ in base.named_modules()]
    with torch.no_grad():
        before = base(IDS).logits
    with pytest.raises(AdapterError):
        PeftModel.from_pretrained(base, adapter)
    assert [n for n, _ in base.named_modules()] == names
    with torch.no_grad():
        assert torch.equal(base(IDS).logits, before)


# ---- 2. saving keeps the user's files and leaves nothing behind -------------------------------------


def test_save_keeps_user_files_and_follows_a_symlinked_folder(model_dir, tmp_path):
    model = autolm.AutoModelForCausalLM.from_pretrained(model_dir)
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    for name in ("model-card.md", "model.safetensors.sha256", "pytorch_model_notes.txt"):
        (real / name).write_text(name)
    model.save_pretrained(link, max_shard_size="20KB")
    model.save_pretrained(link)  # the shards of the first save are autolm's own: replaced, not kept
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    names = sorted(os.listdir(real))
    assert names == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "model-card.md",
            "model.safetensors.sha256",
            "pytorch_model_notes.txt",
        ]
    )
    assert (real / "model-card.md").read_text() == "model-card.md"
    assert sorted(os.listdir(tmp_path)) == ["link", "m", "real"]


def test_save_onto_a_file_or_a_full_disk_is_an_autolm_error_with_nothing_left(
    model_dir, tmp_path, monkeypatch
):
    import autolm.saving as saving

    model = autolm.AutoModelForCausalLM.from_pretrained(model_dir)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(AutolmError, match="not a directory"):
        model.save_pretrained(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "save_file", full)
    with pytest.raises(AutolmError, match="No space left"):
        model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["afile", "m"]


def test_saved_files_follow_the_umask(model_dir, tmp_path):
    model = autolm.AutoModelForCausalLM.from_pretrained(model_dir)
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "model.safetensors").st_mode) == 0o644


_SAVER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    import autolm
    model = autolm.AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model.save_pretrained(sys.argv[2] + "-warm")  # imports done before the first kill
    for line in sys.stdin:          # "go": fork a process that saves in a loop; "kill": kill -9 it
        if line.strip() == "kill":
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("killed", flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            i = 0
            while True:
                with torch.no_grad():
                    model.model.norm.weight.fill_(float(i % 2 + 1))
                model.save_pretrained(sys.argv[2], max_shard_size="20KB")
                i += 1
        print("started", flush=True)
""")


def test_kill_during_save_keeps_the_previous_model(model_dir, tmp_path):
    """kill -9 a process that saves in a loop, at random moments: the folder always loads, holding one
    of the versions written, the user's file survives, and the next save leaves no temporary behind."""
    target = tmp_path / "out"
    autolm.AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(target)
    (target / "notes.md").write_text("mine")
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(model_dir), str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    rng = random.Random(0)
    seen = set()
    try:
        for _ in range(12):
            for command in ("go", "kill"):
                proc.stdin.write(command + "\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() in ("started", "killed")
                if command == "go":
                    time.sleep(rng.uniform(0.05, 0.6))
            loaded = autolm.AutoModelForCausalLM.from_pretrained(target)
            values = loaded.model.norm.weight.unique().tolist()
            assert len(values) == 1 or not any(v in (1.0, 2.0) for v in values)
            seen.add(values[0] if len(values) == 1 else "original")
            assert (target / "notes.md").read_text() == "mine"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert seen & {1.0, 2.0}, "no save completed before a kill: the test did not exercise anything"
    loaded.save_pretrained(target)
    assert sorted(os.listdir(tmp_path)) == ["m", "out", "out-warm", "saver.py"]
    assert (target / "notes.md").read_text() == "mine"


# ---- 3. config types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ({"rms_norm_eps": True}, "rms_norm_eps"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"max_position_embeddings": float("inf")}, "max_position_embeddings"),
        ({"num_attention_heads": 4.0}, "num_attention_heads"),
        ({"attention_bias": 1}, "attention_bias"),
        (
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 1e4,
                    "factor": 8.0,
                    "low_freq_factor": 0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            },
            "low_freq_factor",
        ),
    ],
)
def test_config_values_are_type_checked(model_dir, change, message):
    _edit_config(model_dir, **change)
    with pytest.raises(ConfigError, match=message) as e:
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)
    assert "config.json" in str(e.value)


# ---- 4. resource bombs are refused before the work -------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"num_hidden_layers": 100000},
        {"num_hidden_layers": 10**9},
        {"num_hidden_layers": 3},
        {"vocab_size": 10**12},
    ],
)
def test_config_that_does_not_match_the_checkpoint_is_refused_before_building(model_dir, change):
    _edit_config(model_dir, layer_types=None, **change)
    with pytest.raises(ConfigError, match=next(iter(change))):
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)


def test_huge_json_is_refused_by_size(model_dir):
    with open(model_dir / "config.json", "r+") as f:
        f.truncate(10**9)  # sparse: costs no disk
    with pytest.raises(ConfigError, match="limit for a JSON file"):
        autolm.AutoConfig.from_pretrained(model_dir)


def _gguf(path, kv: list[tuple[str, int, bytes]], n_tensors: int = 0, tail: bytes = b""):
    """A GGUF header written byte by byte: (key, value type, encoded value) triples."""
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kv))
    for key, kind, value in kv:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + value
    path.write_bytes(out + tail)
    return path


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


@pytest.mark.parametrize("bomb", ["array_count", "string_length", "many_items", "tensor_count", "kv_count"])
def test_gguf_counts_are_bounded_by_the_file_size(tmp_path, bomb):
    arch = ("general.architecture", 8, _s("llama"))
    if bomb == "array_count":
        kv = [arch, ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**62) + _s("a") * 100)]
    elif bomb == "string_length":
        kv = [arch, ("general.name", 8, struct.pack("<Q", 2**60) + b"x" * 100)]
    elif bomb == "many_items":  # 5 MB of one-byte items: fits the file, but past the per-array cap
        kv = [arch, ("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 0, 5_000_000) + bytes(5_000_000))]
    else:
        kv = [arch]
    path = _gguf(tmp_path / "bomb.gguf", kv, n_tensors=2**40 if bomb == "tensor_count" else 0)
    if bomb == "kv_count":
        raw = bytearray(path.read_bytes())
        raw[16:24] = struct.pack("<Q", 2**50)
        path.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match="bomb.gguf"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="bomb.gguf")


@pytest.mark.parametrize(
    "template,message",
    [
        ("{{ 'x' * 10**11 }}", "longer than"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "range"),
        (
            "{% for x in 'a' * 5000 %}{% for y in 'b' * 5000 %}{{ x }}{{ y }}{% endfor %}{% endfor %}",
            "output exceeds",
        ),
        ("{{ 'x' | center(10**11) }}", "width"),
        ("{{ 2 ** 100000 }}", "power"),
    ],
)
def test_chat_template_bombs_stop_at_limits(template, message):
    from autolm.chat_template import render_chat_template

    with pytest.raises(TokenizerError, match=message):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


# ---- 5. every error a file causes is autolm's own ---------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages[0]['content'] + 1 }}",  # TypeError
        "{{ (messages | first).nope.deeper }}",  # UndefinedError
        "{{ {}['x'] | int + [][3] }}",  # IndexError / Undefined
        "{{ 1 / 0 }}",  # ZeroDivisionError
        "{{ '%d' % 'x' }}",  # TypeError inside the sandbox's format
        "{% if %}",  # syntax error
        "{{ messages.__class__.__mro__ }}",  # the sandbox refuses
    ],
)
def test_chat_template_failures_are_tokenizer_errors(template):
    from autolm.chat_template import render_chat_template

    with pytest.raises(TokenizerError, match="chat template"):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_deeply_nested_json_is_an_autolm_error(model_dir):
    header = b'{"a":' * 50000 + b"1" + b"}" * 50000
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)
    (model_dir / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        autolm.AutoConfig.from_pretrained(model_dir)


def test_undecodable_chat_template_file(smol_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(smol_dir, name), tmp_path)
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ '\xff\xfe' }}")
    with pytest.raises(TokenizerError, match="chat_template.jinja"):
        autolm.AutoTokenizer.from_pretrained(tmp_path)


def test_generation_config_with_a_string_token_id(model_dir):
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id"):
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)


def test_gguf_with_a_string_token_id(tmp_path):
    kv = [
        ("general.architecture", 8, _s("llama")),
        ("llama.block_count", 4, struct.pack("<I", 2)),
        ("tokenizer.ggml.bos_token_id", 8, _s("1")),
    ]
    _gguf(tmp_path / "bad.gguf", kv)
    with pytest.raises(GGUFError, match="bos_token_id must be an integer"):
        autolm.AutoConfig.from_pretrained(tmp_path, gguf_file="bad.gguf")


# ---- 6. compressed .bin entries --------------------------------------------------------------------


def test_deflate_compressed_bin_loads_the_right_values(checkpoint, tmp_path):
    directory, ref = checkpoint(NAME)
    shutil.copy(os.path.join(directory, "config.json"), tmp_path)
    torch.save(ref.state_dict(), tmp_path / "plain.bin")
    with (
        zipfile.ZipFile(tmp_path / "plain.bin") as zin,
        zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    os.remove(tmp_path / "plain.bin")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits)


# ---- 7. NaN logits stop generation -------------------------------------------------------------------


def test_nan_logits_during_generation_raise(model_dir):
    model = autolm.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(GenerationError, match="NaN or infinite logits"):
        model.generate(IDS, max_new_tokens=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "at", [0, 17, 49151]
)  # the first value, inside a vector, the tail after the last vector
def test_finite_check_finds_each_bad_value(bad, at):
    from autolm.generation.decode import _finite

    x = torch.randn(2, 49152)
    assert _finite(x)
    x[1, at] = bad
    assert not _finite(x)
