"""Files under faults: every save is one transaction (all of it or none of it), whatever the disk does.

Faults are real where the machine allows: a small tmpfs that fills up and is remounted read-only, a
folder another user cannot write, two processes saving one folder, `kill -9` at random moments of
`autolm convert` and `autolm merge`, a checkpoint truncated or rewritten while it loads. Where mounting
is not permitted (not root), the tmpfs tests skip and the patched-writer test covers the same faults.
Each asserts the error type, that the previous contents are intact and that nothing is left behind.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from conftest import write_char_tokenizer

import autolm
import autolm._atomic as atomic
import autolm.saving as saving
from autolm._atomic import atomic_directory
from autolm.errors import CheckpointError, SaveError
from autolm.lora import LoraConfig, PeftModel, get_peft_model
from autolm.saving import save_with_tokenizer

CODES = (errno.ENOSPC, errno.EROFS, errno.EACCES)


def snapshot(directory) -> dict[str, bytes]:
    """Every file under a folder, by relative path, with its bytes."""
    out = {}
    for d, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = fh.read()
    return out


def set_norm(model, value: float) -> None:
    with torch.no_grad():
        model.model.norm.weight.fill_(value)


def norm_of(directory) -> list[float]:
    return autolm.AutoModelForCausalLM.from_pretrained(directory).model.norm.weight.unique().tolist()


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    """A tiny checkpoint with a tokenizer, and a LoRA adapter for it."""
    directory, _ = checkpoint("qwen2_tied_bias")
    d = tmp_path_factory.mktemp("faults") / "base"
    shutil.copytree(directory, d)
    write_char_tokenizer(str(d))
    pm = get_peft_model(
        autolm.AutoModelForCausalLM.from_pretrained(d),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    pm.save_pretrained(d.parent / "adapter")
    return d


@pytest.fixture
def loaded(model_dir):
    return autolm.AutoModelForCausalLM.from_pretrained(model_dir), autolm.AutoTokenizer.from_pretrained(
        model_dir
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A small llama GGUF with a tokenizer, for `autolm convert`."""
    import gguf

    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for add, value in [
        (w.add_context_length, 32),
        (w.add_embedding_length, 16),
        (w.add_block_count, 2),
        (w.add_feed_forward_length, 24),
        (w.add_head_count, 2),
        (w.add_head_count_kv, 1),
        (w.add_layer_norm_rms_eps, 1e-5),
        (w.add_rope_freq_base, 10000.0),
        (w.add_tokenizer_model, "gpt2"),
    ]:
        add(value)
    tokens = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["ab", "abc", "<s>", "</s>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), 16)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(16, np.float32))
    for i in range(2):
        for name, shape in [
            ("attn_norm", (16,)),
            ("ffn_norm", (16,)),
            ("attn_q", (16, 16)),
            ("attn_k", (8, 16)),
            ("attn_v", (8, 16)),
            ("attn_output", (16, 16)),
            ("ffn_gate", (24, 16)),
            ("ffn_up", (24, 16)),
            ("ffn_down", (16, 24)),
        ]:
            w.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- a helper process that runs the CLI (or code) in forked children: imports paid once -------------

_RUNNER = textwrap.dedent("""
    import contextlib, json, os, sys, traceback
    import torch
    torch.set_num_threads(1)
    import autolm, autolm.cli, autolm.convert, autolm.lora, autolm.saving
    from autolm.cli import main
    loop = None
    for line in sys.stdin:
        req = json.loads(line)
        if req["do"] == "kill":  # kill -9 the looping child
            os.kill(loop, 9)
            os.waitpid(loop, 0)
            print(json.dumps({"killed": True}), flush=True)
            continue
        if req["do"] == "here":  # in this process: a first run imports what the forked ones then share
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                print(json.dumps({"rc": main(req["argv"])}), file=sys.__stdout__, flush=True)
            continue
        if req["do"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            code = 99
            # tqdm's lock is a semaphore shared with every process forked from here: a sibling killed while it
            # held it (the kill loops) would block this child's progress bars for good; a lock of its own
            import multiprocessing, tqdm
            tqdm.tqdm.set_lock(multiprocessing.RLock())
            try:
                for fd, name in ((1, req["stdout"]), (2, req["stderr"])):
                    os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), fd)
                os.environ.update(req.get("env", {}))
                if req.get("uid") is not None:
                    os.setgroups([])
                    os.setgid(req["uid"])
                    os.setuid(req["uid"])
                while True:
                    code = main(req["argv"]) if "argv" in req else exec(req["code"]) or 0
                    if req["do"] != "loop":
                        break
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        if req["do"] == "loop":
            loop = pid
        print(json.dumps({"pid": pid}), flush=True)
""")


class Runner:
    def __init__(self, directory):
        self.dir = str(directory)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.n = 0
        self.warm = self.looping = False

    def _ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(600)  # generous: a command here takes seconds; a hang fails this test, not the whole run
        assert answer, f"the helper process did not answer {req['do']!r} within 600 s"
        return json.loads(answer[0])

    def start(self, do: str = "run", **req) -> tuple[int, str, str]:
        self.n += 1
        self.looping = self.looping or do == "loop"
        out, err = (os.path.join(self.dir, f"{self.n}.{s}") for s in ("out", "err"))
        return self._ask(do=do, stdout=out, stderr=err, **req)["pid"], out, err

    def wait(self, started) -> tuple[int, str, str]:
        pid, out, err = started
        rc = self._ask(do="wait", pid=pid)["rc"]
        with open(out) as fo, open(err) as fe:
            return rc, fo.read(), fe.read()

    def cli(self, *argv, **req) -> tuple[int, str, str]:
        return self.wait(self.start(argv=[str(a) for a in argv], **req))

    def kill(self) -> None:
        assert self._ask(do="kill")["killed"]
        self.looping = False


@pytest.fixture(scope="module", autouse=True)
def started_runner(tmp_path_factory):
    """Started first, so that its imports overlap with building the checkpoints."""
    d = tmp_path_factory.mktemp("runner")
    os.chmod(d, 0o777)
    r = Runner(d)
    yield r
    if r.looping:  # a test stopped inside a kill loop: end the child that saves forever
        r.kill()
    r.proc.kill()  # a helper with nothing left to do: no need to wait for its interpreter to wind down
    r.proc.wait(timeout=60)


@pytest.fixture
def runner(started_runner, tiny_gguf, model_dir):
    r = started_runner
    if not r.warm:
        for argv in (
            ["convert", tiny_gguf, os.path.join(r.dir, "warm-c"), "--threads", "1"],
            [
                "merge",
                model_dir,
                model_dir.parent / "adapter",
                os.path.join(r.dir, "warm-m"),
                "--threads",
                "1",
            ],
        ):
            assert r._ask(do="here", argv=[str(a) for a in argv])["rc"] == 0
        r.warm = True
    return r


def one_line_error(rc: int, stderr: str, command: str, *fragments: str) -> None:
    """The CLI's way to fail: exit status 1 and one line, no traceback."""
    assert rc == 1, stderr
    assert stderr.count("\n") == 1 and stderr.startswith(f"autolm {command}: error: "), stderr
    for f in fragments:
        assert f in stderr, stderr


# ---- a real small file system: full, then read-only ----------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs of its own (root only), unmounted afterwards."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_each_fault_at_each_point_of_a_save covers the faults")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"mount not permitted here ({p.stderr.strip()!r}); the patched-writer test covers it")
    yield mnt
    subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True)
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def leave_free(mnt, pages: int) -> None:
    """Fill the file system with one file until exactly `pages` pages are free."""
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(mnt)
    with open(filler, "wb") as f:
        f.write(b"\1" * ((st.f_bavail - pages) * st.f_frsize))
    assert os.statvfs(mnt).f_bavail == pages


def pages(directory, names) -> int:
    """The 4 KiB pages a tmpfs takes to hold these files."""
    return sum(-(-os.path.getsize(os.path.join(directory, n)) // 4096) for n in names)


def test_a_full_disk_fails_each_save_with_nothing_written(tmpfs, loaded, model_dir, runner, tmp_path):
    """Weights, model + tokenizer, tokenizer alone, adapter and quantized saves into a disk that fills up
    at several points (the weights, the configs, the tokenizer): a SaveError (ENOSPC) naming the folder,
    the folder as it was, nothing beside it; with room again the same save succeeds."""
    model, tok = loaded
    out, adapter = tmpfs / "out", tmpfs / "adapter"
    save_with_tokenizer(model, tok, out)
    (out / "notes.md").write_text("mine")
    pm = get_peft_model(
        autolm.AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj"])
    )
    pm.save_pretrained(adapter)
    quantized = autolm.AutoModelForCausalLM.from_pretrained(model_dir, quantization="int8")
    before = {d: snapshot(d) for d in (out, adapter)}
    set_norm(model, 3.0)
    saves = {  # name: (save into a folder, the folder it saves into here)
        "model+tokenizer": (lambda d: save_with_tokenizer(model, tok, d), out),
        "model": (model.save_pretrained, out),
        "sharded": (lambda d: model.save_pretrained(d, max_shard_size="40KB"), out),
        "tokenizer": (tok.save_pretrained, out),
        "adapter": (pm.save_pretrained, adapter),
        "quantized": (quantized.save_pretrained, out),
        "new folder": (model.save_pretrained, tmpfs / "new"),
    }
    need = {}  # the pages each save writes, from a dry run elsewhere
    for name, (save, _) in saves.items():
        save(tmp_path / "dry" / name)
        need[name] = sum(pages(d, files) for d, _, files in os.walk(tmp_path / "dry" / name))
    weights = need["model"]
    for free in sorted({0, 1, weights // 2, weights - 1, weights + 1}):
        leave_free(tmpfs, free)
        for name, (save, folder) in saves.items():
            if free >= need[name]:
                continue
            with pytest.raises(SaveError) as e:
                save(folder)
            assert e.value.errno == errno.ENOSPC, name
            assert str(folder) in str(e.value) and "No space left on device" in str(e.value), str(e.value)
            assert {d: snapshot(d) for d in (out, adapter)} == before, name
            assert sorted(os.listdir(tmpfs)) == ["adapter", "filler", "out"], name
    # The CLI: `merge` with room for the weights but not the tokenizer: one line, nothing written.
    leave_free(tmpfs, weights + 1)
    rc, _, err = runner.cli("merge", model_dir, model_dir.parent / "adapter", out, "--threads", "1")
    one_line_error(rc, err, "merge", str(out), "No space left on device", "previous contents are unchanged")
    assert {d: snapshot(d) for d in (out, adapter)} == before
    assert sorted(os.listdir(tmpfs)) == ["adapter", "filler", "out"]
    (tmpfs / "filler").unlink()
    save_with_tokenizer(model, tok, out)
    assert norm_of(out) == [3.0] and (out / "notes.md").read_text() == "mine"
    assert sorted(os.listdir(tmpfs)) == ["adapter", "out"]


def test_a_full_disk_fails_convert_in_one_line(tmpfs, tiny_gguf, runner):
    out = tmpfs / "out"
    rc, _, err = runner.cli("convert", tiny_gguf, out, "--threads", "1")
    assert rc == 0, err
    (out / "notes.md").write_text("mine")
    before = snapshot(out)
    for free in (0, pages(out, ["model.safetensors"]) - 1):
        leave_free(tmpfs, free)
        rc, _, err = runner.cli("convert", tiny_gguf, out, "--dtype", "float32", "--threads", "1")
        one_line_error(rc, err, "convert", str(out), "No space left on device")
        assert snapshot(out) == before
        assert sorted(os.listdir(tmpfs)) == ["filler", "out"]


def test_a_read_only_file_system_fails_each_save_with_nothing_written(
    tmpfs, loaded, model_dir, tiny_gguf, runner
):
    model, tok = loaded
    out = tmpfs / "out"
    save_with_tokenizer(model, tok, out)
    before = snapshot(out)
    pm = get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2))
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    saves = {
        "model+tokenizer": lambda: save_with_tokenizer(model, tok, out),
        "model": lambda: model.save_pretrained(out),
        "tokenizer": lambda: tok.save_pretrained(out),
        "config": lambda: model.config.save_pretrained(out),
        "new folder": lambda: model.save_pretrained(tmpfs / "new" / "model"),
        "adapter": lambda: pm.save_pretrained(tmpfs / "adapter"),
    }
    for name, save in saves.items():
        with pytest.raises(SaveError) as e:
            save()
        assert e.value.errno == errno.EROFS and "Read-only file system" in str(e.value), name
        assert snapshot(out) == before and os.listdir(tmpfs) == ["out"], name
    for argv in (("convert", tiny_gguf, out), ("merge", model_dir, model_dir.parent / "adapter", out)):
        rc, _, err = runner.cli(*argv, "--threads", "1")
        one_line_error(rc, err, argv[0], str(out), "Read-only file system")
    assert snapshot(out) == before and os.listdir(tmpfs) == ["out"]


def test_no_permission_is_one_line_for_another_user(tiny_gguf, runner):
    """As root every write succeeds, so the command runs as `nobody` in a folder it may read, not write."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root; test_each_fault_at_each_point_of_a_save covers EACCES")
    scratch = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(scratch, 0o755)
        shutil.copy(tiny_gguf, scratch)
        out = os.path.join(scratch, "out")
        os.mkdir(out)
        open(os.path.join(out, "notes.md"), "w").write("mine")
        for target in (out, os.path.join(scratch, "new")):
            rc, _, err = runner.cli("convert", os.path.join(scratch, "tiny.gguf"), target, uid=65534)
            one_line_error(rc, err, "convert", target, "Permission denied")
        assert sorted(os.listdir(scratch)) == ["out", "tiny.gguf"] and os.listdir(out) == ["notes.md"]
    finally:
        shutil.rmtree(scratch)


# ---- every fault at every point, by a patched writer (runs anywhere) --------------------------------


def _patch(monkeypatch, point: str, code: int, out) -> None:
    """Make the save fail with OSError(code) at one point: as the system would, whoever writes."""
    from safetensors import SafetensorError

    def fail(path=None):
        raise OSError(code, os.strerror(code), None if path is None else os.fspath(path))

    def only(real, test):
        return lambda p, *a, **k: fail(p) if test(os.fspath(p)) else real(p, *a, **k)

    name = f".{out.name}."
    if point == "lock":
        monkeypatch.setattr(os, "open", only(os.open, lambda p: p.endswith(name + "lock")))
    elif point == "folder":
        monkeypatch.setattr(
            os, "mkdir", only(os.mkdir, lambda p: os.path.basename(p).startswith(name + "tmp"))
        )
    elif point == "weights":

        def save_file(*a, **k):
            raise SafetensorError(
                f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})"
            )

        monkeypatch.setattr(saving, "save_file", save_file)
    elif point == "tokenizer":
        monkeypatch.setattr(
            builtins,
            "open",
            only(builtins.open, lambda p: name + "tmp" in p and p.endswith("tokenizer.json")),
        )
    elif point == "keep user files":
        monkeypatch.setattr(os, "link", lambda *a, **k: fail())
        monkeypatch.setattr(shutil, "copy2", lambda src, dst, **k: fail(dst))
    elif point == "swap":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: fail(b))
    elif point == "swap without exchange":  # the second of two renames fails: the first is undone
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        monkeypatch.setattr(os, "replace", only(os.replace, lambda p: name + "tmp" in p))


@pytest.mark.parametrize(
    "point", ["lock", "folder", "weights", "tokenizer", "keep user files", "swap", "swap without exchange"]
)
def test_each_fault_at_each_point_of_a_save(loaded, tmp_path, monkeypatch, point):
    """A model + tokenizer save (as merge and convert write) over a folder holding an earlier save and the
    user's notes: ENOSPC, EROFS or EACCES at any point is a SaveError with that errno naming the folder,
    and the folder is as it was with nothing beside it."""
    model, tok = loaded
    out = tmp_path / "out"
    save_with_tokenizer(model, tok, out)
    (out / "notes.md").write_text("mine")
    before = snapshot(out)
    set_norm(model, 3.0)
    for code in CODES:
        with monkeypatch.context() as m:
            _patch(m, point, code, out)
            with pytest.raises(SaveError) as e:
                save_with_tokenizer(model, tok, out)
        assert e.value.errno == code and str(out) in str(e.value), str(e.value)
        assert os.strerror(code) in str(e.value) and "\n" not in str(e.value)
        assert snapshot(out) == before and os.listdir(tmp_path) == ["out"], (point, code)
    save_with_tokenizer(model, tok, out)
    assert norm_of(out) == [3.0] and (out / "notes.md").read_text() == "mine"


def test_adapters_save_in_one_transaction(loaded, model_dir, tmp_path, monkeypatch):
    """Two adapters (one in a subfolder) and a failure at the second: neither is written."""
    pm = PeftModel.from_pretrained(loaded[0], model_dir.parent / "adapter")
    pm.load_adapter(model_dir.parent / "adapter", "second")
    real, calls = saving.save_file, []

    def second_fails(*a, **k):
        calls.append(a[1])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), a[1])
        return real(*a, **k)

    monkeypatch.setattr(saving, "save_file", second_fails)
    with pytest.raises(SaveError, match="No space left"):
        pm.save_pretrained(tmp_path / "adapters")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(saving, "save_file", real)
    pm.save_pretrained(tmp_path / "adapters")
    assert sorted(os.listdir(tmp_path / "adapters")) == [
        "README.md",  # peft's model card
        "adapter_config.json",
        "adapter_model.safetensors",
        "second",
    ]
    assert os.listdir(tmp_path) == ["adapters"]
    pm.unload()


# ---- ownership of temporary folders, and two writers ---------------------------------------------------

_WRITER = textwrap.dedent("""
    import os, sys
    from autolm._atomic import atomic_directory
    with atomic_directory(sys.argv[1]) as tmp:
        open(os.path.join(tmp, "from-" + sys.argv[2]), "w").write(sys.argv[2])
        print(os.path.basename(tmp), flush=True)
        sys.stdin.readline()
    print("done", flush=True)
""")


def _writer(target, name):
    p = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return p, p.stdout.readline().strip()


def test_a_live_writers_folder_is_kept_and_a_dead_ones_cleaned(tmp_path):
    """A save cleans up what killed saves left (their writer's lock is gone, or they never had one) but
    never the temporary folder of a writer that is still running, which then completes."""
    parent = tmp_path / "p"
    target = parent / "out"
    live, live_tmp = _writer(target, "live")
    dead, dead_tmp = _writer(target, "dead")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    (parent / ".out.tmp-abcd1234").mkdir()  # an older autolm's, without an owner file
    assert sorted(os.listdir(parent)) == sorted([".out.tmp-abcd1234", dead_tmp, live_tmp])
    with atomic_directory(target) as tmp:
        (parent / tmp / "from-me").write_text("me")
    assert sorted(os.listdir(parent)) == sorted(["out", live_tmp])
    assert sorted(os.listdir(parent / live_tmp)) == [".autolm-owner", "from-live"]
    live.stdin.write("\n")
    live.stdin.flush()
    assert live.stdout.readline() == "done\n" and live.wait() == 0
    assert sorted(os.listdir(target)) == ["from-live", "from-me"]  # it kept the folder's other file
    assert os.listdir(parent) == ["out"]


def test_a_swap_killed_between_its_renames_is_undone_by_the_next_save(tmp_path):
    (tmp_path / ".out.old-123-abcdef12").mkdir()
    (tmp_path / ".out.old-123-abcdef12" / "notes.md").write_text("mine")
    with atomic_directory(tmp_path / "out") as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert sorted(os.listdir(tmp_path / "out")) == ["new", "notes.md"] and os.listdir(tmp_path) == ["out"]


_SAVES = textwrap.dedent("""
    model = autolm.AutoModelForCausalLM.from_pretrained(req["env"]["BASE"])
    tok = autolm.AutoTokenizer.from_pretrained(req["env"]["BASE"])
    with torch.no_grad():
        model.model.norm.weight.fill_(float(req["env"]["VALUE"]))
    for i in range(8):
        if req["env"]["VALUE"] == "1":
            model.save_pretrained(req["env"]["OUT"], max_shard_size="40KB")
            tok.save_pretrained(req["env"]["OUT"])
        else:
            autolm.saving.save_with_tokenizer(model, tok, req["env"]["OUT"])
""")


def test_two_processes_saving_one_folder_both_complete(model_dir, tmp_path, runner):
    """Two processes save one folder over and over, in different layouts (shards + index, one file):
    neither fails, and the folder holds one whole version of one of them, with nothing beside it."""
    out = tmp_path / "p" / "out"
    env = {"BASE": str(model_dir), "OUT": str(out)}
    started = [runner.start(code=_SAVES, env={**env, "VALUE": v}) for v in ("1", "2")]
    for s in started:
        rc, _, err = runner.wait(s)
        assert rc == 0, err
    names = set(os.listdir(out))
    sharded = {n for n in names if n.startswith("model-")}
    assert ("model.safetensors" in names) != bool(sharded), names
    assert ("model.safetensors.index.json" in names) == bool(sharded)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert norm_of(out) in ([1.0], [2.0])
    autolm.AutoTokenizer.from_pretrained(out)
    assert os.listdir(out.parent) == ["out"]


# ---- kill -9 at random moments of convert and merge ------------------------------------------------------


def _kill_loop(runner, argv, out, check, rounds: int = 4, seed: int = 0) -> int:
    """Run a command in a loop and kill -9 it at random moments; after each kill the folder is whole
    (check) with the user's file; then one more run cleans up. Returns how many swaps were seen."""
    rng = random.Random(seed)
    inodes = {os.stat(out).st_ino}
    for _ in range(rounds):
        runner.start(do="loop", argv=[str(a) for a in argv])
        time.sleep(rng.uniform(0.05, 0.7))
        runner.kill()
        if not out.exists():  # only between the two renames of a swap, where RENAME_EXCHANGE is missing
            assert any(n.startswith(f".{out.name}.old-") for n in os.listdir(out.parent))
            continue
        check(out)
        assert (out / "notes.md").read_text() == "mine"
        inodes.add(os.stat(out).st_ino)
    rc, _, err = runner.cli(*argv)
    assert rc == 0, err
    check(out)
    assert (out / "notes.md").read_text() == "mine"
    assert os.listdir(out.parent) == [out.name]  # no temporary folder, old folder or lock left
    return len(inodes)


def test_kill_during_convert_and_merge_leaves_whole_folders_and_no_leftovers(
    tiny_gguf, model_dir, tmp_path, runner
):
    """`kill -9` at random moments: the output is always a whole checkpoint with its tokenizer (never
    weights without tokenizer), and the next run removes whatever the killed ones left."""
    swaps = 0
    for seed, (out, argv) in enumerate(
        [
            (tmp_path / "c" / "out", ["convert", tiny_gguf, tmp_path / "c" / "out", "--dtype", "float32"]),
            (
                tmp_path / "m" / "out",
                ["merge", model_dir, model_dir.parent / "adapter", tmp_path / "m" / "out"],
            ),
        ]
    ):
        argv += ["--threads", "1"]
        rc, _, err = runner.cli(*argv)
        assert rc == 0, err
        (out / "notes.md").write_text("mine")
        names = set(os.listdir(out))
        assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names

        def check(out, names=names):
            assert set(os.listdir(out)) == names
            autolm.AutoModelForCausalLM.from_pretrained(out)
            autolm.AutoTokenizer.from_pretrained(out)

        swaps += _kill_loop(runner, argv, out, check, seed=seed) - 1
    assert swaps, "no run completed between kills: the loop exercised nothing"


# ---- loading: a checkpoint that changes under the memory map ---------------------------------------------

_LOADER = textwrap.dedent("""
    import autolm.sources.safetensors as st
    from autolm.errors import CheckpointError

    real_get = st.SafetensorsFile.get
    for directory, how in json.loads(os.environ["CASES"]):
        os.environ["AUTOLM_NO_MMAP"] = "1" if how.endswith("no-mmap") else ""
        calls = []

        def get(self, name, how=how, calls=calls):  # after the first tensor, the file is cut short or rewritten
            calls.append(name)
            if len(calls) == 2:
                if how.startswith("truncate"):
                    os.truncate(self.path, os.path.getsize(self.path) // 3)
                else:
                    with open(self.path, "r+b") as f:
                        f.seek(-4096, 2)
                        f.write(bytes(4096))
            return real_get(self, name)

        st.SafetensorsFile.get = get
        try:
            model = autolm.AutoModelForCausalLM.from_pretrained(directory)
            model(torch.tensor([[1, 2, 3]]))  # where a lost page of the mapping would be touched at last
            print(how, "loaded", flush=True)
        except CheckpointError as e:
            print(how, "CheckpointError", e, flush=True)
""")


def test_a_checkpoint_changed_while_loading_is_a_checkpoint_error_not_sigbus(checkpoint, tmp_path, runner):
    """Cut short under the memory map, rewritten in place, or cut short while read without a map: each
    ends in a CheckpointError naming the file, never in SIGBUS or silently changed weights."""
    directory, _ = checkpoint("qwen2_tied_bias")
    hows = ["truncate", "rewrite", "truncate no-mmap"]
    for i in range(len(hows)):
        shutil.copytree(directory, tmp_path / str(i))
    cases = json.dumps([[str(tmp_path / str(i)), how] for i, how in enumerate(hows)])
    rc, out, err = runner.wait(runner.start(code=_LOADER, env={"CASES": cases}))  # in a child of its own
    assert rc != -signal.SIGBUS, "killed by SIGBUS"
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == len(hows), out
    for i, (how, line) in enumerate(zip(hows, lines)):
        assert line.startswith(f"{how} CheckpointError {tmp_path / str(i) / 'model.safetensors'}: "), line
        assert "changed while it was being loaded" in line


def test_reading_without_mmap_gives_the_same_model(checkpoint, monkeypatch):
    directory, _ = checkpoint("qwen2_tied_bias")
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        mapped = autolm.AutoModelForCausalLM.from_pretrained(directory)(ids).logits
        monkeypatch.setenv("AUTOLM_NO_MMAP", "1")
        assert torch.equal(autolm.AutoModelForCausalLM.from_pretrained(directory)(ids).logits, mapped)


# ---- verify=True: content hashes of the Hugging Face cache -------------------------------------------------


def _hf_cache(model_dir, root) -> str:
    """model_dir laid out as the HF cache does it: blobs named by sha256 (LFS) or git's sha1, linked."""
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in os.listdir(model_dir):
        path = os.path.join(model_dir, name)
        if name.endswith(".safetensors"):
            blob = hashlib.sha256(open(path, "rb").read()).hexdigest()
        else:  # git's own hash of the file, as the hub names the blobs of files kept in git
            blob = subprocess.run(["git", "hash-object", path], capture_output=True, text=True).stdout.strip()
        shutil.copy(path, repo / "blobs" / blob)
        (snap / name).symlink_to(os.path.join("..", "..", "blobs", blob))
    return str(repo / "blobs" / os.path.basename(os.path.realpath(snap / "model.safetensors")))


def test_verify_checks_hf_cache_hashes(model_dir, tmp_path, monkeypatch, runner):
    weights = _hf_cache(model_dir, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = autolm.AutoModelForCausalLM.from_pretrained("org/tiny", verify=True)
    assert any(n.startswith("verify: 3 files match") for n in m.load_report.notes), m.load_report.notes
    local = autolm.AutoModelForCausalLM.from_pretrained(model_dir, verify=True)
    assert any("not in the Hugging Face cache" in n for n in local.load_report.notes)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    rc, out, err = runner.cli("inspect", "org/tiny", "--verify", "--threads", "1", env=env)
    assert rc == 0 and "verify: 3 files match" in out, err
    with open(weights, "r+b") as f:  # one byte flipped, size kept: only the hash can tell
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(CheckpointError, match="does not match its Hugging Face cache hash"):
        autolm.AutoModelForCausalLM.from_pretrained("org/tiny", verify=True)
    autolm.AutoModelForCausalLM.from_pretrained("org/tiny")  # off by default
    rc, _, err = runner.cli("inspect", "org/tiny", "--verify", "--threads", "1", env=env)
    one_line_error(rc, err, "inspect", "model.safetensors", "does not match")
