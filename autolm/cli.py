"""The `autolm` command: generate, chat, inspect, convert (and serve / bench where installed)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .errors import AutolmError


def _add_model(p: argparse.ArgumentParser, optional: bool = True) -> None:
    p.add_argument("model", nargs="?" if optional else None, default=None,
                   help="model directory, HF repo id or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default cpu)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantization of the decoder's linear layers, done while loading")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: a slow first token (compiling), faster tokens after")


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    # Any sampling setting implies sampling; plain invocations decode greedily.
    kw["do_sample"] = bool(args.do_sample or any(k in kw for k in ("temperature", "top_k", "top_p", "min_p")))
    return kw


def locate(model: str | None) -> tuple[str, str | None]:
    """(directory or repo id, GGUF file name or None) for a model argument; None is the default model."""
    if model is None:
        from .convert import default_model_dir

        model = default_model_dir()
    if str(model).endswith(".gguf"):
        if not os.path.isfile(model):
            from .errors import ResolveError

            raise ResolveError(f"{model}: GGUF file not found")
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, None


def load(model: str | None, dtype: str = "auto", device: str | None = None, quantize: str | None = None,
         tp_plan: str | None = None):
    """(model, tokenizer) for a directory, repo id, .gguf file, or the default model when None."""
    from .load import from_pretrained
    from .tokenizer import AutoTokenizer

    where, gguf_file = locate(model)
    m = from_pretrained(where, gguf_file=gguf_file, dtype=dtype, device=device, quantization=quantize, tp_plan=tp_plan)
    return m, AutoTokenizer.from_pretrained(m.load_report.directory, gguf_file=gguf_file)


def launch(nproc: int, argv: list[str], flag: str) -> int | None:
    """Run this command (less `flag N`) in nproc processes under torchrun and return its exit code; None
    when there is nothing to launch (one process, or already one of torchrun's ranks)."""
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return None
    import subprocess

    rest, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2  # the flag and its value
            continue
        if not argv[i].startswith(f"{flag}="):
            rest.append(argv[i])
        i += 1
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", str(nproc), "-m", "autolm.cli", *rest])


def distributed() -> bool:
    """One of several ranks under torchrun (launched by --tp / --nproc, or by the user)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _stream(model, tok, ids: list[int], args, out=sys.stdout, seed: int | None = None) -> str:
    import torch

    from .generation import stream_generate

    kwargs = _sampling_kwargs(args)
    if args.compile and (model.get_base_model() if hasattr(model, 'get_base_model') else model).decode_step is None:
        from .generation import compile_decode

        compile_decode(model)
    seed = args.seed if seed is None else seed
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    text, last = [], None
    for chunk in stream_generate(model, tok, ids, **kwargs):
        out.write(chunk.text)
        out.flush()
        text.append(chunk.text)
        last = chunk
    out.write("\n")
    if last is not None and out is sys.stdout:
        print(f"[{last.prompt_tokens} prompt tokens, {last.generation_tokens} generated, "
              f"{last.prompt_tps:.1f} prompt tok/s, {last.generation_tps:.1f} tok/s]", file=sys.stderr)
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    model_name, prompt = (args.model, args.prompt) if args.prompt is not None else (None, args.model)
    if prompt is None:
        raise SystemExit("autolm generate: a prompt is required: autolm generate [MODEL] PROMPT")
    code = launch(args.tp, args.argv, "--tp")
    if code is not None:
        return code
    model, tok = load(model_name, args.dtype, args.device, args.quantize, tp_plan="auto" if distributed() else None)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=False)
    else:
        ids = tok.encode(prompt)
    if not distributed():
        _stream(model, tok, ids, args)
        return 0
    from .distributed import exit_all, same_seed, world

    # Every rank must pick the same tokens; rank 0 prints them.
    with open(os.devnull, "w") as devnull:
        _stream(model, tok, ids, args, out=sys.stdout if world()[0] == 0 else devnull, seed=same_seed(args.seed))
    exit_all(0)


def cmd_chat(args: argparse.Namespace) -> int:
    model, tok = load(args.model, args.dtype, args.device, args.quantize)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []

    def turn(user: str) -> None:
        messages.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        messages.append({"role": "assistant", "content": _stream(model, tok, ids, args).strip()})

    if args.prompt is not None:
        turn(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("autolm chat — type your message; /reset clears the history, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            del messages[1 if args.system else 0:]
            continue
        turn(line)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model, _ = load(args.model, args.dtype, args.device, args.quantize)
    cfg = model.config
    from .quant import memory_report

    params = model.num_parameters()
    weight_bytes, unquantized = memory_report(model)
    print(f"architecture: {type(model).__name__} ({cfg.model_type})")
    print(f"layers:       {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads} "
          f"(kv {cfg.num_key_value_heads}), head_dim {cfg.head_dim}, ffn {cfg.intermediate_size}")
    print(f"vocab:        {cfg.vocab_size}, tied embeddings: {cfg.tie_word_embeddings}")
    print(f"rope:         {cfg.rope_parameters}")
    windows = sorted(w for w in cfg.windows() if w)
    print(f"sliding:      {windows or 'none'}")
    print(f"parameters:   {params:,} ({params / 1e6:.1f} M)")
    print(f"dtype:        {str(model.dtype).removeprefix('torch.')}")
    print(f"memory:       {weight_bytes / 2**20:.1f} MiB of weights")
    if "quantization_config" in cfg.extra:
        print(f"quantization: {cfg.extra['quantization_config']}: saves {(unquantized - weight_bytes) / 2**20:.1f} MiB "
              f"of {unquantized / 2**20:.1f} MiB ({unquantized / weight_bytes:.2f}x smaller)")
    print("load report:")
    for line in model.load_report.lines():
        print("  " + line)
    print(f"total:        {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_gguf

    if not args.source.endswith(".gguf"):
        raise SystemExit("autolm convert: SOURCE must be a .gguf file")
    convert_gguf(args.source, args.out, dtype=args.dtype, quantization=args.quantize)
    print(f"wrote {args.out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    code = launch(args.nproc, args.argv, "--nproc")
    if code is not None:
        return code
    import torch

    from .lora import LoraConfig, get_peft_model
    from .train import TrainConfig, finetune

    dtype = args.dtype if args.dtype != "auto" else "float32"
    targets = args.lora_targets
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets if targets == "all-linear" else targets.split(","))
    torch.manual_seed(args.seed)  # the adapter's initial weights: the same for every rank and process count
    if distributed():
        from .distributed import exit_all, fsdp_from_pretrained, world
        from .tokenizer import AutoTokenizer

        where, gguf_file = locate(args.model)
        pm = fsdp_from_pretrained(where, lora, dtype, gguf_file=gguf_file)
        tok = AutoTokenizer.from_pretrained(lora.base_model_name_or_path, gguf_file=gguf_file)
        main_rank = world()[0] == 0
    else:
        model, tok = load(args.model, dtype, args.device)
        pm = get_peft_model(model, lora)
        main_rank = True
    if main_rank:
        pm.print_trainable_parameters()
    cfg = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, max_length=args.max_length,
                      gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every, seed=args.seed)
    losses = finetune(pm, tok, args.data, args.out, cfg)
    if main_rank:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; adapter saved to {args.out}")
    if distributed():
        exit_all(0)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import serve
    except ImportError as e:
        raise SystemExit(f"autolm serve needs the server extras: pip install 'autolm[serve]' ({e})") from None
    model, tok = load(args.model, args.dtype, args.device, args.quantize)
    if args.compile:
        from .generation import compile_decode

        compile_decode(model)
    name = args.model_name or os.path.basename(os.path.normpath(model.load_report.directory or "autolm"))
    print(f"serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(model, tok, name, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .eval import evaluate

    where, gguf_file = locate(args.model)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    results = evaluate(where, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                       num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size, dtype=args.dtype,
                       adapter=args.adapter, apply_chat_template=args.chat, device=args.device, **extra)
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        from ._util import atomic_write_text

        atomic_write_text(args.output, json.dumps(results["results"], indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autolm", description="Load, run, adapt and serve decoder LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="autolm vs transformers side by side (see autolm bench --help)", add_help=False)

    p = sub.add_parser("generate", help="stream a completion of a prompt")
    _add_model(p)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (the model may be omitted)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel over N processes (torchrun; heads must divide by N)")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal, using the chat template")
    _add_model(p)
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="a system message")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="architecture, parameters, dtype, memory and the load report")
    _add_model(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat/completions, completions, models)")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("AUTOLM_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (the first requests of each batch size wait for it)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("finetune", help="train a LoRA adapter on a JSONL file (chat or prompt/completion)")
    p.add_argument("model", help="model directory, HF repo id or .gguf file")
    p.add_argument("data", help="JSONL: {'messages': [...]} or {'prompt': ..., 'completion': ...} per line")
    p.add_argument("--out", required=True, help="directory for the adapter (peft format)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated names, or all-linear")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="shard the model over N processes with FSDP2 (torchrun); each takes a share of every batch")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks on a model (pip install 'autolm[eval]')")
    _add_model(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="a folder of task YAML files (local tasks)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="items per task (a fraction below 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to evaluate with the model")
    p.add_argument("--chat", action="store_true", help="apply the chat template to the prompts")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face directory")
    p.add_argument("source", help="FILE.gguf")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="save weight-only quantized")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: see autolm/bench
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    from .malloc import keep_freed_memory

    keep_freed_memory()  # the command line opts in to reusing freed activation memory (see malloc.py)
    try:
        return args.func(args)
    except AutolmError as e:
        print(f"autolm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
