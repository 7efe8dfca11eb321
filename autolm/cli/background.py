"""`python -m autolm.cli.background SOURCE`: the CPU decode step compiled in a process of its own.

Compiling the one-token step ahead of time takes tens of seconds, once per machine and model shape. Until its
graphs are cached, `generate` and `chat` answer with the eager step and, once the first reply is out, start this
process (decode.Pending), which loads the same model (SOURCE: how the command loaded it, as JSON) at the lowest
CPU priority (nice 19) and compiles the graphs into $AUTOLM_HOME/compiled. It outlives the command that started
it (a one-shot `generate` leaves the graphs to the next run); a chat notices it end and runs the compiled step
from the next reply on. One process per model at a time: each holds a lock on its log,
$AUTOLM_HOME/compiled/background-<hash>.log, taken by the command that starts it.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from .common import load
from .decode import locked_log


def main(argv: list[str]) -> int:
    os.nice(19)  # its command decodes meanwhile: the compiler takes what the reply leaves
    # Ctrl-C stops a reply (the command and this process share the terminal's process group); a closed terminal
    # ends the command: the compile goes on for the next run either way
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    source = json.loads(argv[0])
    # the log its command opened and locked (passed on with the file), or (run by hand) locked now
    log = os.fdopen(int(argv[1]), "a") if len(argv) > 1 else locked_log(source)
    if log is None:
        return 0  # another process compiles this model now
    sys.stdout = sys.stderr = log
    import torch

    torch.set_num_threads(source["threads"])  # compiled graphs are keyed by the thread count
    model, _ = load(
        source["model"],
        source["dtype"],
        source["device"],
        source["quantize"],
        adapters=[tuple(a) for a in source["adapters"]],
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ok = base.precompile_decode()
    print("done" if ok else "not compiled (see the warning above)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
