"""`autolm inspect`, `convert`, `merge`, `finetune`, `serve` and `eval`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

from .common import (
    UsageError,
    check_draft,
    check_model_arg,
    distributed,
    launch,
    load,
    locate,
    model_directory,
    parse_adapters,
    use_chat_template,
)
from .decode import load_draft, prepare_decode
from .serve_flags import served_task


def cmd_inspect(args: argparse.Namespace) -> int:
    check_model_arg(args.model, args.device)
    t0 = time.perf_counter()
    model, _ = load(
        args.model,
        args.dtype,
        args.device,
        args.quantize,
        adapters=parse_adapters(args.adapter),
        verify=args.verify,
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    from ..quant import memory_report

    weight_bytes, unquantized, params = memory_report(base)
    print(f"architecture: {type(base).__name__} ({cfg.model_type})")
    print(
        f"layers:       {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads} "
        f"(kv {cfg.num_key_value_heads}), head_dim {cfg.head_dim}, ffn {cfg.intermediate_size}"
    )
    print(f"vocab:        {cfg.vocab_size}, tied embeddings: {cfg.tie_word_embeddings}")
    print(f"rope:         {cfg.rope_parameters if cfg.rope_kinds() else 'none (learned positions)'}")
    windows = sorted(w for w in cfg.windows() if w)
    print(f"sliding:      {windows or 'none'}")
    print(f"parameters:   {params:,} ({params / 1e6:.1f} M)")
    from ..nn.moe import experts_summary

    moe = experts_summary(base, params)
    if moe is not None:
        layers, experts, used, active = moe
        print(f"experts:      {experts} in each of {layers} layers, {used} used per token; active parameters "
              f"per token {active:,} ({active / 1e6:.1f} M)")  # fmt: skip
    print(f"dtype:        {str(base.dtype).removeprefix('torch.')}")
    print(f"memory:       {weight_bytes / 2**20:.1f} MiB of weights")
    if "quantization_config" in cfg.extra:
        print(
            f"quantization: {cfg.extra['quantization_config']}: saves {(unquantized - weight_bytes) / 2**20:.1f} MiB "
            f"of {unquantized / 2**20:.1f} MiB ({unquantized / weight_bytes:.2f}x smaller)"
        )
    for name, lora in getattr(model, "peft_config", {}).items():
        n = sum(p.numel() for k, p in base.named_parameters() if f".{name}." in k)
        active = " (active)" if name == model.active_adapter else ""
        print(
            f"adapter:      {name}{active}: LoRA r={lora.r}, alpha={lora.lora_alpha}, "
            f"targets {lora.target_modules}, {n:,} parameters"
        )
    print("load report:")
    for line in base.load_report.lines():
        print("  " + line)
    print(f"total:        {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..convert import convert_gguf, convert_to_gguf

    if args.out.endswith(".gguf"):
        from ..gguf_writer import TYPES

        if args.quantize not in (None, *TYPES):
            raise UsageError(f"--quantize {args.quantize}: a GGUF out takes one of {', '.join(TYPES)}")
        if not os.path.isdir(args.source):
            raise UsageError(f"{args.source}: expected a model directory to write as {args.out}")
        convert_to_gguf(args.source, args.out, args.quantize or "f16", args.dtype or "auto")
        print(f"wrote {args.out}")
        return 0
    if args.quantize not in (None, "int8", "int4"):
        raise UsageError(f"--quantize {args.quantize}: a directory out takes int8 or int4")
    if not args.source.endswith(".gguf"):
        raise UsageError("autolm convert: SOURCE must be a .gguf file (or OUT a .gguf file)")
    if not os.path.isfile(args.source):
        raise UsageError(f"{args.source}: file not found")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"{args.out}: exists and is not a directory; name a new or existing folder")
    convert_gguf(
        args.source,
        args.out,
        dtype=args.dtype or "bfloat16",
        quantization=args.quantize,
        progress=sys.stderr.isatty(),
    )
    print(f"wrote {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """BASE + ADAPTER -> a plain checkpoint with the adapter merged into the weights, and the tokenizer; OUT.gguf:
    one GGUF file llama.cpp runs, in --quantize's type (a .gguf base's own by default, else f16)."""
    check_model_arg(args.base)
    adapters = parse_adapters([args.adapter], flag="ADAPTER ")
    to_gguf = args.out.endswith(".gguf")
    quantize = _merge_quantize(args) if to_gguf else None
    if to_gguf and os.path.isdir(args.out):
        raise UsageError(f"{args.out}: is a directory; a .gguf OUT is one file")
    if not to_gguf and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"{args.out}: exists and is not a directory")
    if not to_gguf and args.quantize is not None:
        raise UsageError(f"--quantize {args.quantize}: only a .gguf OUT is quantized")
    model, tok = load(args.base, args.dtype, quantize="none", adapters=adapters)  # merged into float weights
    merged = model.merge_and_unload()
    if to_gguf:
        from ..gguf_writer import save_gguf

        save_gguf(merged, tok, args.out, quantize)  # through a temporary file and a rename
    else:
        from ..saving import save_with_tokenizer

        save_with_tokenizer(merged, tok, args.out)  # both or neither: one transaction
    done = f" in {quantize}" if to_gguf else ""
    print(f"wrote {args.out}{done} ({adapters[0][1]} merged into {args.base or 'the default model'})")
    return 0


def _merge_quantize(args: argparse.Namespace) -> str:
    """A GGUF OUT's type: --quantize, else a .gguf base's own file type where autolm writes it, else f16."""
    from ..gguf_writer import TYPES

    if args.quantize is not None:
        if args.quantize not in TYPES:
            raise UsageError(f"--quantize {args.quantize}: a GGUF out takes one of {', '.join(TYPES)}")
        return args.quantize
    if args.base and str(args.base).endswith(".gguf") and os.path.isfile(args.base):
        from ..sources.gguf import GGUFFile

        kind = GGUFFile(args.base, strings=False, weights=False).metadata.get("general.file_type")
        return next((name for name, (_, file_type) in TYPES.items() if file_type == kind), "f16")
    return "f16"


def cmd_finetune(args: argparse.Namespace) -> int:
    check_model_arg(args.model, args.device)
    if not os.path.isfile(args.data):
        raise UsageError(
            f"{args.data}: data file not found (JSONL: one {{'messages': [...]}} or "
            "{'prompt': ..., 'completion': ...} per line)"
        )
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    if args.quantize != "none" and (args.nproc > 1 or distributed()):
        raise UsageError("--quantize trains in one process: FSDP (--nproc) shards float weights")
    code = launch(args.nproc, args.argv, "--nproc")
    if code is not None:
        return code
    import torch

    from ..lora import LoraConfig, get_peft_model
    from ..train import TrainConfig, finetune

    dtype = args.dtype if args.dtype != "auto" else "float32"
    targets = args.lora_targets
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        use_dora=args.use_dora,
        target_modules=targets if targets in (None, "all-linear") else targets.split(","),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(args.seed)  # the adapter's initial weights: the same for every rank and process count
    if distributed():
        from ..distributed import exit_all, fsdp_from_pretrained, world
        from ..tokenizer import AutoTokenizer

        where, gguf_file = locate(args.model, quantize="none")  # training runs on float weights
        pm = fsdp_from_pretrained(where, lora, dtype, gguf_file=gguf_file)
        tok = AutoTokenizer.from_pretrained(lora.base_model_name_or_path, gguf_file=gguf_file)
        main_rank = world()[0] == 0
    else:
        model, tok = load(args.model, dtype, args.device, quantize=args.quantize)
        pm = get_peft_model(model, lora)
        main_rank = True
    if main_rank:
        pm.print_trainable_parameters()
    cfg = TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every,
        seed=args.seed,
    )
    losses = finetune(pm, tok, args.data, args.out, cfg)
    if main_rank:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; adapter saved to {args.out}")
    if distributed():
        exit_all(0)
    return 0


def served_name(model: str | None, directory: str | None) -> str:
    """The model id clients use by default: a GGUF file's name without .gguf, else the model's directory name."""
    if model is not None and str(model).endswith(".gguf"):
        return os.path.basename(str(model))[: -len(".gguf")]
    return os.path.basename(os.path.normpath(directory or "autolm"))


def cmd_serve(args: argparse.Namespace) -> int:
    missing = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"autolm serve needs the server extras ({', '.join(missing)} missing): "
            "pip install 'autolm[serve]'"
        )
    check_model_arg(args.model, args.device)
    check_draft(args)
    adapters = parse_adapters((args.adapter or []) + (args.lora_modules or []))
    from ..serve import serve
    from ..serve.speculation import Speculation

    args.task = served_task(args.task, model_directory(args.model), args.hf_overrides)
    embed = args.task != "generate"  # embed / classify: the pooling endpoints
    if embed and (args.draft_model is not None or args.prompt_lookup is not None):
        raise UsageError(f"--task {args.task}: --draft-model and --prompt-lookup are for generation")
    head = {"generate": "causal_lm", "embed": "base", "classify": "sequence_classification"}[args.task]
    model, tok = load(args.model, args.dtype, args.device, args.quantize, adapters=adapters, head=head,
                      overrides=args.hf_overrides)  # fmt: skip
    use_chat_template(tok, args.chat_template)  # none: chat requests must send one ('chat_template')
    if not embed:
        prepare_decode(model, tok, args, batched=True)
    draft = None if embed else load_draft(args, model, tok)[0].get("assistant_model")
    speculation = (
        Speculation(draft, args.prompt_lookup)
        if draft is not None or args.prompt_lookup is not None
        else None
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = args.model_name or served_name(args.model, base.load_report.directory)  # adapters: by their names
    from ..serve.validation import Limits

    limits = Limits(args.max_prompts, args.max_prompt_tokens, args.max_n, args.max_logprobs)
    serve(
        model,
        tok,
        name,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        prefix_cache_mb=args.prefix_cache_mb,
        max_body=args.max_body,
        shutdown_timeout=args.shutdown_timeout,
        limits=limits,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        speculation=speculation,
        prefill_chunk=args.prefill_chunk,
        task=args.task,
        runtime_lora=args.allow_runtime_lora,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("autolm eval needs lm-evaluation-harness: pip install 'autolm[eval]'")
    check_model_arg(args.model, args.device)
    adapters = parse_adapters([args.adapter] if args.adapter else None)
    from ..eval import evaluate

    where, gguf_file = locate(args.model, args.dtype)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    results = evaluate(
        where,
        [t for t in args.tasks.split(",") if t],
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        dtype=args.dtype,
        adapter=adapters[0][1] if adapters else None,
        apply_chat_template=args.chat,
        device=args.device,
        **extra,
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        from .._util import atomic_write_text

        atomic_write_text(args.output, json.dumps(results["results"], indent=2, default=str))
    return 0
