"""The `autolm` command: generate, chat, inspect, convert, merge, finetune, serve, eval (and bench).

Every mistake a user can make ends in one line on stderr naming the problem and the fix: exit status 1,
or 2 for a malformed command line (argparse's usage message). Arguments are checked before any model
is loaded.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import AutolmError
from .chat import cmd_chat, cmd_generate
from .serve_flags import add_serve_flags, positive
from .tools import cmd_convert, cmd_eval, cmd_finetune, cmd_inspect, cmd_merge, cmd_serve


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=positive, default=None, help="CPU threads for PyTorch (default: all cores)"
    )


def _add_model(p: argparse.ArgumentParser, adapters: bool = True) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model directory, HF repo id, .gguf file or adapter folder (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default cpu)")
    p.add_argument(
        "--quantize",
        choices=("int8", "int4", "gguf", "none"),
        default=None,
        help="weight-only quantization of the linear layers (int8 LM head), done while loading; the "
        "default model runs int4 unless this says none or --dtype is given; a .gguf model runs in its own "
        "blocks (gguf) unless this says otherwise",
    )
    if adapters:
        p.add_argument(
            "--adapter",
            action="append",
            metavar="[NAME=]PATH",
            help="a LoRA adapter (peft format); repeat for several, the first is active (serve: each "
            "served by its name)",
        )
    _add_common(p)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="0 decodes greedily (the default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    _add_decode_flags(p)
    _add_speculative_flags(p)


def _add_speculative_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (the same tokens greedily, the same distribution sampled)")
    g.add_argument(
        "--draft-model",
        default=None,
        metavar="PATH",
        help="a smaller model with the same tokenizer drafts tokens the model checks several at a time "
        "(directory, repo id or .gguf, loaded with --dtype, --device and --quantize as the model is)",
    )
    g.add_argument(
        "--prompt-lookup",
        type=positive,
        default=None,
        metavar="N",
        help="draft up to N tokens copied from the prompt where its last tokens occurred before "
        "(fast for edits, summaries and code that repeat the prompt)",
    )


def _add_chat_template(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|TEMPLATE",
        help="the chat template to use instead of the model's (a Jinja file, or the template itself, as vLLM's "
        "flag takes it): for a model without one, e.g. a GGUF file that carries none",
    )


def _add_decode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step first (shown as it happens), then decode faster (GPUs)",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="on the CPU, skip the decode step compiled ahead of time (compiled once per machine and "
        "model shape, cached in $AUTOLM_HOME/compiled; AUTOLM_EAGER=1 does the same)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="autolm", description="Load, run, adapt, serve and evaluate decoder LMs."
    )
    parser.add_argument("--version", action="version", version=f"autolm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "bench", help="autolm vs transformers side by side (see autolm bench --help)", add_help=False
    )
    _add_run_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_run_commands(sub) -> None:
    """generate, chat, inspect, serve."""
    p = sub.add_parser("generate", help="stream a completion of a prompt")
    _add_model(p)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (the model may be omitted)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_chat_template(p)
    p.add_argument(
        "--tp",
        type=positive,
        default=1,
        metavar="N",
        help="tensor parallel over N processes (torchrun; heads must divide by N)",
    )
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal, using the chat template (/help inside)")
    _add_model(p)
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="a system message")
    _add_chat_template(p)
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "inspect", help="architecture, parameters, dtype, memory, adapters and the load report"
    )
    _add_model(p)
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the files' content hashes where they come from the Hugging Face cache (blob names)",
    )
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (chat/completions, completions, models)"
    )
    _add_model(p)
    add_serve_flags(p)
    _add_chat_template(p)
    _add_decode_flags(p)
    _add_speculative_flags(p)
    p.set_defaults(func=cmd_serve)


def _add_tool_commands(sub) -> None:
    """finetune, merge, eval, convert."""
    p = sub.add_parser("finetune", help="train a LoRA adapter on a JSONL file (chat or prompt/completion)")
    p.add_argument("model", help="model directory, HF repo id or .gguf file")
    p.add_argument("data", help="JSONL: {'messages': [...]} or {'prompt': ..., 'completion': ...} per line")
    p.add_argument("--out", required=True, help="directory for the adapter (peft format)")
    p.add_argument("--lora-r", type=positive, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--use-dora", action="store_true", help="DoRA: a learned magnitude per output row")
    p.add_argument("--quantize", choices=("none", "int8", "int4", "gguf"), default="none",
                   help="train over int8 / int4 weights or a .gguf file's own blocks (QLoRA), one process "
                        "only; none (the default): over float weights")  # fmt: skip
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated names, or all-linear (default: peft's for the model type, e.g. "
                        "q_proj,v_proj; c_attn for GPT-2)")  # fmt: skip
    p.add_argument("--epochs", type=positive, default=1)
    p.add_argument("--max-steps", type=positive, default=None)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=positive, default=4)
    p.add_argument("--grad-accum", type=positive, default=1)
    p.add_argument("--max-length", type=positive, default=1024)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-every", type=positive, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--nproc",
        type=positive,
        default=1,
        metavar="N",
        help="shard the model over N processes with FSDP2 (torchrun); each takes a share of every batch",
    )
    _add_common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model and save a plain checkpoint")
    p.add_argument("base", help="the base model (directory, repo id or .gguf)")
    p.add_argument("adapter", help="the adapter folder (peft format)")
    p.add_argument("out", help="output directory, or a .gguf file llama.cpp / ollama run")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantize", default=None,
                   help="a .gguf OUT's type (q4_k_m, q8_0, f16, ...; default: a .gguf base's own, else f16)")  # fmt: skip
    _add_common(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks on a model (pip install 'autolm[eval]')")
    _add_model(p, adapters=False)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="a folder of task YAML files (local tasks)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="items per task (a fraction below 1)")
    p.add_argument("--batch-size", type=positive, default=1)
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to evaluate with the model")
    p.add_argument("--chat", action="store_true", help="apply the chat template to the prompts")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "convert", help="a GGUF file into a Hugging Face directory, or a model directory into a GGUF file"
    )
    p.add_argument("source", help="FILE.gguf, or a model directory (HF layout) to write as OUT.gguf")
    p.add_argument("out", help="output directory, or OUT.gguf (llama.cpp's format)")
    p.add_argument(
        "--dtype",
        default=None,
        help="bfloat16 (default for a directory), float32, float16, or auto (GGUF's float32; the "
        "checkpoint's own for a GGUF out)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        help="a directory: int8 or int4 (weight-only); a GGUF: f16 (default), bf16, f32, q8_0, q6_k, q5_k_m, "
        "q4_k_m (llama.cpp's mixes), q5_k, q4_k (their heads q6_k), q5_0, q5_1, q4_0, q4_1",
    )
    _add_common(p)
    p.set_defaults(func=cmd_convert)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: see autolm/bench
        from ..bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.threads:
        import torch

        torch.set_num_threads(
            args.threads
        )  # the command is the whole process: its thread count is ours to set
    from ..malloc import keep_freed_memory, settle_imports

    keep_freed_memory()  # the command line opts in to reusing freed activation memory (see malloc.py)
    settle_imports()  # and to leaving torch's objects out of the garbage collector's full passes
    try:
        return args.func(args)
    except AutolmError as e:
        print(f"autolm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
