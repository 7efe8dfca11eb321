"""How the commands decode: the CPU step compiled ahead of time (loaded, compiled now, or compiled by a background
process once the eager step has given the first reply: background.py), torch.compile for --compile, and the
--draft-model (its step prepared as the model's is, by a background process of its own)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

from .._util import autolm_home
from .common import UsageError, distributed, load


def load_draft(args: argparse.Namespace, model, tok, background: bool = False) -> tuple[dict[str, Any], Any]:
    """({"assistant_model": the draft}, its Pending compile or None) for --draft-model, else ({}, None): loaded as a
    model argument is (with --dtype, --device, --quantize; a .gguf in its own blocks), its decode step prepared as
    the model's is (`background`: by a background process after the first reply, as generate and chat do)."""
    if getattr(args, "draft_model", None) is None:
        return {}, None
    draft, _ = load(args.draft_model, args.dtype, args.device, args.quantize)
    if draft.config.vocab_size != model.config.vocab_size:
        raise UsageError(
            f"--draft-model {args.draft_model}: its vocabulary has {draft.config.vocab_size} tokens and the "
            f"model's {model.config.vocab_size}; the draft must use the model's tokenizer"
        )
    from ..errors import GenerationError
    from ..generation.target_draft import reads_target

    if reads_target(draft):  # it drafts from the model's state: a model it can read (Gemma 4 with KV sharing)
        try:
            draft.shared_kv_layers(model.get_base_model() if hasattr(model, "get_base_model") else model)
        except GenerationError as e:
            raise UsageError(f"--draft-model {args.draft_model}: {e}") from None
    source = load_source(args.draft_model, args) if background else None
    return {"assistant_model": draft}, prepare_decode(
        draft, tok, args, source=source, label="the draft model's"
    )


def prepare_decode(
    model, tok, args, batched: bool = False, source: dict | None = None, label: str = "the"
) -> Pending | None:
    """--compile: torch.compile the decode step now. Otherwise, on the CPU, the one-token step compiled ahead
    of time (with `batched`, for several rows too: the server): loaded from $AUTOLM_HOME/compiled where it is
    there; else compiled now with a progress bar (the server), or, given the `source` the command loaded the
    model from (generate, chat), by a background process that Pending.start() starts once the first reply is
    out, the eager step answering meanwhile. --eager or AUTOLM_EAGER=1 skip it."""
    if args.compile:
        compile_once(model, tok)
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if args.eager:
        base.decode_mode = "eager"  # not even graphs compiled by an earlier run
    if args.eager or os.environ.get("AUTOLM_EAGER", "") not in ("", "0") or distributed():
        return None
    from ..step import compilable, compiled_plan

    if not hasattr(base, "precompile_decode") or base.device.type != "cpu" or not compilable(base):
        return None
    if source is None:
        base.precompile_decode(progress=True, batched=batched)
        return None
    return None if compiled_plan(base) is not None else Pending(source, model, label)


def background_log(source: dict) -> str:
    """The log (and lock) of the background compile of the model `source` describes."""
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(autolm_home(), "compiled", f"background-{digest}.log")


def load_source(model: str | None, args, adapters=None) -> dict:
    """How a command loads its model, for `python -m autolm.cli.background` to load the same one."""
    import torch

    return {"model": model, "dtype": args.dtype, "device": args.device, "quantize": args.quantize,
            "adapters": adapters or [], "threads": torch.get_num_threads()}  # fmt: skip


class Pending:
    """The background compile of `model`, loaded as `source` describes (autolm/cli/background.py): start() starts
    it (after the first reply, which then decodes without it on the cores), ready() once it has ended. `label`
    names whose step it is in the messages ("the", "the draft model's")."""

    def __init__(self, source: dict, model, label: str = "the"):
        self.source, self.model, self.label = source, model, label
        self.proc, self.log, self.started, self.elsewhere = None, None, False, False

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        try:
            self.proc, self.log = start_background_compile(self.source)
        except OSError as e:  # an AUTOLM_HOME it cannot write, no process to spare
            print(
                f"autolm: could not compile {self.label} CPU decode step ({e}); replies run the eager step",
                file=sys.stderr,
            )
            return
        self.elsewhere = self.proc is None
        where = f"log: {self.log}" if self.proc else "another process compiles it now"
        print(
            f"autolm: compiling {self.label} CPU decode step in the background for the next replies and runs (once "
            f"per machine and model shape, tens of seconds; {where}); until then the eager step answers",
            file=sys.stderr,
            flush=True,
        )

    def ready(self) -> bool:
        """Whether the compile has ended: its process exited or let go of the log's lock (it wrote its last line
        then, and may still be exiting: on a busy machine that can take longer than the next question)."""
        if self.proc is not None and self.proc.poll() is not None:
            return True
        if self.proc is None and not self.elsewhere:
            return False  # not started, or it could not start
        log = locked_log(self.source, truncate=False)  # done once the compiling process lets go
        if log is not None:
            log.close()
        return log is not None


def start_background_compile(source: dict) -> tuple:
    """(process, log path) of `python -m autolm.cli.background SOURCE` in a process of its own, which outlives this
    one; (None, None) where another process compiles this model now. The log's lock passes on with the file."""
    import subprocess

    log = locked_log(source)
    if log is None:
        return None, None
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autolm.cli.background", json.dumps(source), str(log.fileno())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(log.fileno(),),
        )
    return proc, log.name


def locked_log(source: dict, truncate: bool = True):
    """The background compile's log for this source, opened (emptied) and locked by this process; None where
    another process holds the lock."""
    import fcntl

    path = background_log(source)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a")  # noqa: SIM115 - closed by the caller, or kept by the compiling process
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    if truncate:
        f.truncate(0)
    return f


def use_compiled(pending: Pending) -> bool:
    """After the background compile `pending` has ended: its model's compiled step from the next generation on,
    where its graphs are there now (a line on stderr says which)."""
    from ..step import compiled_plan, forget_plans

    model, log = pending.model, pending.log or background_log(pending.source)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forget_plans(base)
    ok = compiled_plan(base) is not None
    print(
        f"autolm: {pending.label} compiled decode step is ready; the next replies run it"
        if ok
        else f"autolm: {pending.label} decode step was not compiled (see {log}); replies keep the eager step",
        file=sys.stderr,
        flush=True,
    )
    return ok


def compile_once(model, tok) -> None:
    """--compile: compile the decode step now, with a message, so the speed printed later is the compiled one."""
    from ..generation import compile_decode, generate_text

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.decode_step is not None:
        return
    print(
        "compiling the decode step (once per shape; cached for later runs) ...", file=sys.stderr, flush=True
    )
    t0 = time.perf_counter()
    compile_decode(base)
    generate_text(model, tok, [tok.eos_token_id or 0] * 4, max_new_tokens=3, do_sample=False)
    print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


__all__ = [
    "Pending",
    "background_log",
    "compile_once",
    "load_draft",
    "load_source",
    "locked_log",
    "prepare_decode",
    "start_background_compile",
    "use_compiled",
]
