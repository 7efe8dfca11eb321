"""`autolm generate` and `autolm chat`."""

from __future__ import annotations

import argparse
import os
import sys

from .common import (
    UsageError,
    check_draft,
    check_heads,
    check_model_arg,
    distributed,
    launch,
    load,
    parse_adapters,
    sampling_kwargs,
    stream_reply,
    use_chat_template,
)
from .decode import load_draft, load_source, prepare_decode, use_compiled


def cmd_generate(args: argparse.Namespace) -> int:
    model_name, prompt = (args.model, args.prompt) if args.prompt is not None else (None, args.model)
    if prompt is None or (args.prompt is None and (os.path.isdir(prompt) or prompt.endswith(".gguf"))):
        raise UsageError("a prompt is required: autolm generate [MODEL] PROMPT")
    check_model_arg(model_name, args.device)
    kwargs = sampling_kwargs(args)
    check_draft(args)
    adapters = parse_adapters(args.adapter)
    check_heads(model_name, args.tp)
    code = launch(args.tp, args.argv, "--tp")
    if code is not None:
        return code
    model, tok = load(
        model_name,
        args.dtype,
        args.device,
        args.quantize,
        tp_plan="auto" if distributed() else None,
        adapters=adapters,
    )
    use_chat_template(tok, args.chat_template, required=args.chat)
    if args.chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
        )
    else:
        ids = tok.encode(prompt)
    pending = prepare_decode(model, tok, args, source=load_source(model_name, args, adapters))
    draft, draft_pending = load_draft(args, model, tok, background=True)
    kwargs.update(draft)
    if not distributed():
        stream_reply(model, tok, ids, kwargs, seed=args.seed)
        for p in (pending, draft_pending):
            if p is not None:
                p.start()  # for the next runs
        return 0
    from ..distributed import exit_all, same_seed, world

    # Every rank must pick the same tokens; rank 0 prints them.
    with open(os.devnull, "w") as devnull:
        stream_reply(
            model, tok, ids, kwargs, out=sys.stdout if world()[0] == 0 else devnull, seed=same_seed(args.seed)
        )
    exit_all(0)


HELP = """commands:
  /help            this list
  /reset           forget the conversation (the system message stays)
  /system [TEXT]   set the system message (no TEXT: remove it) and start over
  /adapter [NAME]  list the loaded adapters, or make NAME the active one
  /exit            quit (so does Ctrl-D); Ctrl-C stops a reply and keeps the conversation"""


def cmd_chat(args: argparse.Namespace) -> int:
    check_model_arg(args.model, args.device)
    kwargs = sampling_kwargs(args)
    check_draft(args)
    adapters = parse_adapters(args.adapter)
    model, tok = load(args.model, args.dtype, args.device, args.quantize, adapters=adapters)
    use_chat_template(tok, args.chat_template, required=True)  # none (GPT-2): the error now, before decoding
    pending = prepare_decode(model, tok, args, source=load_source(args.model, args, adapters))
    draft, draft_pending = load_draft(args, model, tok, background=True)
    kwargs.update(draft)
    pendings = [p for p in (pending, draft_pending) if p is not None]  # background compiles not yet used
    system = args.system
    messages: list[dict[str, str]] = []

    def history() -> list[dict[str, str]]:
        return ([{"role": "system", "content": system}] if system else []) + messages

    def turn(user: str) -> None:
        for p in [p for p in pendings if p.ready()]:
            use_compiled(p)
            pendings.remove(p)
        messages.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(history(), add_generation_prompt=True, return_dict=False)
        reply = []
        try:
            reply.append(stream_reply(model, tok, ids, kwargs, seed=args.seed))
        except KeyboardInterrupt:
            print("[stopped]", file=sys.stderr)
        except UsageError as e:  # e.g. the conversation has outgrown the context window
            messages.pop()
            print(f"autolm: {e} (/reset starts over)", file=sys.stderr)
            return
        finally:
            for p in pendings:
                p.start()  # the first reply is out: the compile takes the cores while the user reads
        messages.append({"role": "assistant", "content": "".join(reply).strip()})

    if args.prompt is not None:
        turn(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("autolm chat — type a message; /help lists the commands, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)")
            continue
        line = line.strip()
        command, _, rest = line.partition(" ")
        if not line:
            continue
        if command == "/exit":
            break
        if command == "/help":
            print(HELP)
        elif command == "/reset":
            messages.clear()
            print("[conversation cleared]")
        elif command == "/system":
            system, messages[:] = rest.strip() or None, []
            print(f"[system message {'set' if system else 'removed'}; conversation cleared]")
        elif command == "/adapter":
            _adapter_command(model, rest.strip())
        elif command.startswith("/") and " " not in command and len(command) > 1 and command[1:].isalpha():
            print(f"[unknown command {command}; /help lists them]")
        else:
            turn(line)
    return 0


def _adapter_command(model, name: str) -> None:
    if not hasattr(model, "peft_config"):
        print("[no adapters loaded; start with --adapter PATH]")
    elif not name:
        print(
            "[adapters: "
            + ", ".join(f"{n}{' (active)' if n == model.active_adapter else ''}" for n in model.peft_config)
            + "]"
        )
    elif name not in model.peft_config:
        print(f"[no adapter named {name!r}; loaded: {', '.join(model.peft_config)}]")
    else:
        model.set_adapter(name)
        print(f"[adapter {name} active]")
