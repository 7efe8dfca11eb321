"""What the commands share: finding and loading the model (with adapters), checking arguments before
anything is loaded, launching torchrun, and streaming a reply with honest speed figures."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from ..errors import AutolmError, ConfigError, GenerationError

# A mistake the user can fix: one line on stderr, exit status 1.
UsageError = AutolmError


def locate(model: str | None, dtype: str = "auto", quantize: str | None = None) -> tuple[str, str | None]:
    """(directory or repo id, GGUF file name or None) for a model argument; None is the default model, which
    runs int4 (its GGUF's own 4-bit blocks) unless --quantize or --dtype asks otherwise."""
    if model is None and quantize == "gguf":
        from ..convert import default_gguf_path

        model = default_gguf_path()
    if model is None:
        from ..convert import default_model_dir

        if quantize is None and dtype == "auto":
            quantize = "int4"
        return default_model_dir(
            dtype, progress=sys.stderr.isatty(), quantization=None if quantize == "none" else quantize
        ), None
    if str(model).endswith(".gguf"):
        if not os.path.isfile(model):
            raise UsageError(f"{model}: GGUF file not found")
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, None


def model_directory(model: str | None) -> str | None:
    """The folder of a model argument that names a directory or a repo id (None for the default model, a .gguf
    file, or one that does not resolve: the load says why)."""
    if model is None or str(model).endswith(".gguf"):
        return None
    from ..hub import resolve_model_dir

    try:
        return resolve_model_dir(model)
    except AutolmError:
        return None


def parse_adapters(specs: list[str] | None, flag: str = "--adapter ") -> list[tuple[str, str]]:
    """--adapter PATH or NAME=PATH (repeatable) -> [(name, path)]; the first is the active one."""
    out: list[tuple[str, str]] = []
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)) or "default", spec
        if not os.path.isfile(os.path.join(path, "adapter_config.json")) and not re.fullmatch(
            r"[\w.-]+/[\w.-]+", path
        ):
            raise UsageError(
                f"{flag}{spec}: no adapter_config.json in {path} (expected a peft adapter folder)"
            )
        if name in {n for n, _ in out}:
            raise UsageError(f"{flag}{spec}: two adapters named {name!r}; name them with NAME=PATH")
        out.append((name, path))
    return out


def load(
    model: str | None,
    dtype: str = "auto",
    device: str | None = None,
    quantize: str | None = None,
    tp_plan: str | None = None,
    adapters: list[tuple[str, str]] | None = None,
    verify: bool = False,
    head: str = "causal_lm",
    overrides: dict | None = None,
):
    """(model, tokenizer) for a directory, repo id, .gguf file or adapter folder (its base model is loaded),
    or the default model when None; adapters are attached with the first one active. verify checks content
    hashes (see from_pretrained); head: what from_pretrained builds ("base": the body alone, for embeddings);
    overrides: config keys over the checkpoint's (vLLM's hf_overrides)."""
    from ..load import from_pretrained
    from ..tokenizer import AutoTokenizer

    if tp_plan and quantize is None:
        quantize = (
            "none"  # tensor parallelism runs on float weights (LoRA adapters on any: lora.config.LINEAR)
        )
    where, gguf_file = locate(model, dtype, quantize)
    if gguf_file is not None and quantize is None:
        quantize = "gguf"  # a .gguf model runs in its own blocks, as llama.cpp runs it
    if quantize == "gguf":
        _say_when_building()
    m = from_pretrained(
        where,
        gguf_file=gguf_file,
        dtype=dtype,
        device=device,
        quantization=None if quantize == "none" else quantize,
        tp_plan=tp_plan,
        progress=sys.stderr.isatty(),
        verify=verify,
        head=head,
        hf_overrides=overrides,
    )
    if adapters:
        from ..lora import PeftModel

        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        first, *rest = adapters
        m = PeftModel.from_pretrained(base, first[1], adapter_name=first[0])
        for name, path in rest:
            m.load_adapter(path, name)
    return m, AutoTokenizer.from_pretrained(m.load_report.directory, gguf_file=gguf_file)


def use_chat_template(tok, value: str | None, required: bool = False) -> None:
    """--chat-template: a Jinja file's path, or the template itself (vLLM's flag), in place of the tokenizer's.
    `required`: the command needs a template (chat, generate --chat): where there is none, a usage error now
    that says how to give one."""
    from ..errors import TokenizerError

    if value is not None:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                value = f.read()
        elif "{{" not in value and "{%" not in value:
            raise UsageError(
                f"--chat-template {value}: no such file, and no Jinja template ({{{{ or {{% in it)"
            )
        tok.chat_template = value
    if required:
        try:
            tok.get_chat_template()
        except TokenizerError as e:
            raise UsageError(f"{e}; --chat-template FILE gives one") from None


def _say_when_building() -> None:
    """A line on stderr where loading blocks is about to build the C++ kernels (once per machine and home)."""
    from ..kernels import native

    if native.march() is not None and not native.ready():
        print(
            "autolm: building the C++ kernels for this machine (once, about 10 s) ...",
            file=sys.stderr,
            flush=True,
        )


def check_model_arg(model: str | None, device: str | None = None) -> None:
    """A model argument that names a local path must exist, and a device must be there (checked before
    anything heavy happens)."""
    if device is not None:
        from .._util import check_device

        check_device(device, "--device")
    if model is None or str(model).endswith(".gguf"):
        locate(model) if model else None
        return
    if os.path.exists(model) and not os.path.isdir(model):
        raise UsageError(f"{model}: expected a model directory, a .gguf file or a repo id, found a file")
    if not os.path.exists(model) and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise UsageError(f"{model}: no such directory")


_FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
}


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """generate() keyword arguments from the sampling flags, validated (errors name the flags).
    --temperature 0 means greedy decoding; any other sampling setting turns sampling on."""
    from ..generation import GenerationConfig

    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if kw.get("temperature") == 0:
        del kw["temperature"]
        kw["do_sample"] = False
    else:
        kw["do_sample"] = bool(
            args.do_sample or any(k in kw for k in ("temperature", "top_k", "top_p", "min_p"))
        )
    if getattr(args, "prompt_lookup", None) is not None:
        kw["prompt_lookup_num_tokens"] = args.prompt_lookup
    if kw.get("temperature") is not None and kw["temperature"] < 0:
        raise UsageError("--temperature must be >= 0 (0 decodes greedily)")
    try:
        GenerationConfig().updated(**kw)
    except GenerationError as e:
        message = str(e)
        for name, flag in _FLAGS.items():
            message = re.sub(rf"\b{name}\b", flag, message)
        raise UsageError(
            message.replace(" (use do_sample=False for greedy)", " (0 decodes greedily)")
        ) from None
    return kw


def check_draft(args: argparse.Namespace) -> None:
    """--draft-model: alone (not with --prompt-lookup or --tp), naming a model that is there."""
    if getattr(args, "draft_model", None) is None:
        return
    if args.prompt_lookup is not None:
        raise UsageError("--draft-model and --prompt-lookup both draft tokens: give one of them")
    if getattr(args, "tp", 1) > 1:
        raise UsageError("--draft-model does not run under --tp: drop one of them")
    try:
        check_model_arg(args.draft_model)
    except UsageError as e:
        raise UsageError(f"--draft-model {e}") from None


def check_heads(model: str | None, n: int) -> None:
    """--tp N: the model's attention heads must split evenly (checked before torchrun starts)."""
    if n <= 1:
        return
    from ..load.auto import AutoConfig

    where, gguf_file = locate(model, quantize="none")
    cfg = AutoConfig.from_pretrained(where, gguf_file=gguf_file)
    for field in ("num_attention_heads", "num_key_value_heads"):
        if getattr(cfg, field) % n:
            raise UsageError(
                f"--tp {n}: the model has {field}={getattr(cfg, field)}, which {n} processes "
                f"cannot share evenly; use a divisor of it"
            )


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
    return subprocess.call(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "autolm.cli",
            *rest,
        ]
    )


def distributed() -> bool:
    """One of several ranks under torchrun (launched by --tp / --nproc, or by the user)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def stream_reply(
    model,
    tok,
    ids: list[int],
    kwargs: dict[str, Any],
    out=None,
    seed: int | None = None,
    stats: bool = True,
) -> str:
    """Print the reply as it is generated (to `out`, else the current sys.stdout); then, on stderr, the time to
    the first token and the decode speed over the tokens after it. Ctrl-C stops the reply (KeyboardInterrupt
    propagates after the partial text is kept)."""
    import torch

    out = sys.stdout if out is None else out

    from ..generation import stream_generate

    if seed is not None:
        kwargs = dict(kwargs, generator=torch.Generator().manual_seed(seed))
    text, last = [], None
    try:
        for chunk in stream_generate(model, tok, ids, **kwargs):
            out.write(chunk.text)
            out.flush()
            text.append(chunk.text)
            last = chunk
    finally:
        out.write("\n")
        if stats and last is not None and out is sys.stdout:
            decode = (
                f", then {last.generation_tokens - 1} at {last.generation_tps:.1f} tok/s"
                if last.generation_tokens > 1
                else ""
            )
            print(
                f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, first token after "
                f"{last.time_to_first_token:.2f} s{decode}]",
                file=sys.stderr,
            )
    return "".join(text)


__all__ = [
    "ConfigError",
    "UsageError",
    "check_draft",
    "check_heads",
    "check_model_arg",
    "distributed",
    "launch",
    "load",
    "locate",
    "parse_adapters",
    "sampling_kwargs",
    "stream_reply",
    "use_chat_template",
]
