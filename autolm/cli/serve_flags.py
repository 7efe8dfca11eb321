"""`autolm serve`'s flags (vLLM's spellings where it has one) and the checks of their values."""

from __future__ import annotations

import argparse
import json
import os


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 up, got {text!r}")
    return value


def _logprob_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < -1:
        raise argparse.ArgumentTypeError(
            f"expected a count from 0 up, or -1 for the whole vocabulary, got {text!r}"
        )
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def served_task(task: str | None, directory: str | None, overrides: dict | None) -> str:
    """--task, or vLLM's default from the architecture the config (with --hf-overrides) names: a sequence
    classifier classifies, a body alone (`LlamaModel`) embeds, anything else generates. vLLM's score task is
    classify (a cross-encoder)."""
    if task is None:
        arch = (overrides or {}).get("architectures")
        path = os.path.join(directory or "", "config.json")
        if arch is None and directory is not None and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    arch = json.load(f).get("architectures")
            except (OSError, ValueError, AttributeError):
                arch = None  # the load reports what is wrong with the file
        name = arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else ""
        task = "classify" if name.endswith("ForSequenceClassification") else "generate"
        if name.endswith("Model") and not name.endswith(("LMHeadModel", "ChatModel")):
            task = "embed"
    return "classify" if task == "score" else task


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME=PATH",
        default=None,
        help="vLLM's spelling of --adapter NAME=PATH: LoRA adapters each served by its name",
    )
    p.add_argument("--enable-lora", action="store_true", help="taken for vLLM's command lines (no effect)")
    p.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        default=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
        help="serve vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (also on with "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, as vLLM); for local use: anyone with the key loads files",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=os.environ.get("AUTOLM_API_KEY"), help="require 'Authorization: Bearer KEY'"
    )
    p.add_argument("--max-batch", type=positive, default=8, help="requests decoded together")
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=256,
        help="memory for the keys and values of prompts already seen, reused by requests that start with "
        "the same tokens (0: off; default 256)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=positive,
        default=512,
        help="prompt tokens read per forward, with a decode step of the running requests between two "
        "(default 512)",
    )
    p.add_argument(
        "--task",
        choices=("generate", "embed", "classify", "score"),
        default=None,
        help="generate: chat and completions; embed: the model's body serves /v1/embeddings "
        "(last-token pooling, or the checkpoint's sentence-transformers pooling; L2-normalised); classify: a "
        "sequence classifier or reward model serves /classify; both serve /score and /rerank; as vLLM's --task "
        "(its score: classify, a cross-encoder). Default, as vLLM: from the config's architectures (after "
        "--hf-overrides): ...ForSequenceClassification classify, a body alone (...Model) embed, else generate",
    )
    p.add_argument(
        "--hf-overrides",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="config keys set over the checkpoint's, as vLLM's: e.g. Qwen3-Reranker served as a classifier with "
        '\'{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"], '
        '"is_original_qwen3_reranker": true}\'',
    )
    p.add_argument(
        "--model-name",
        "--served-model-name",
        default=None,
        help="the model id clients use (default: the directory name, or a .gguf file's name without .gguf); "
        "--served-model-name is vLLM's spelling",
    )
    _add_limits(p)


def _add_limits(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits on one request")
    g.add_argument(
        "--max-body", type=positive, default=4 * 2**20, help="largest request body in bytes (default 4 MiB)"
    )
    g.add_argument("--max-prompts", type=positive, default=256, help="prompts in one completions request")
    g.add_argument(
        "--max-prompt-tokens",
        type=positive,
        default=1 << 17,
        help="prompt tokens in one request, all prompts",
    )
    g.add_argument("--max-n", type=positive, default=16, help="largest n and best_of")
    g.add_argument(
        "--max-logprobs",
        type=_logprob_limit,
        default=20,
        help="largest logprobs, top_logprobs and prompt_logprobs (-1: up to the whole vocabulary)",
    )
    g = p.add_argument_group("timeouts (seconds)")
    g.add_argument("--header-timeout", type=_seconds, default=10.0, help="to send a request's head")
    g.add_argument("--body-timeout", type=_seconds, default=30.0, help="to send a request's body")
    g.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=5.0,
        help="on SIGTERM, for requests in flight to finish before they end with finish_reason 'abort'",
    )
