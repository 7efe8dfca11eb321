"""GGUF out: a model and its tokenizer written as llama.cpp's converter (convert_hf_to_gguf.py) writes them, so
llama.cpp and ollama run what autolm loaded, fine-tuned or merged.

Every family with a `GGUFLayout` (the same declaration the reader uses) goes out: Llama, Mistral, Qwen 2 / 3,
Gemma 2 / 3, Phi-3, OLMo 2, Granite, SmolLM3, GPT-2 and the mixtures of experts Mixtral (as "llama"), Qwen 2
MoE, Qwen 3 MoE and gpt-oss (experts in float). autolm.gguf_plan makes the metadata and the tensors of the
converter's file from the layout (names, q/k permutation, Gemma's 1 + w norms, Phi-3's rotary dimensions and
LongRoPE factor tensors, stacked experts) and refuses, with a ConfigError naming the fields, a model whose file
would load as another one (what llama.cpp's format for the family cannot say). Weights go out as F32, F16,
BF16, one of ggml's 32-weight block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, quantized by the gguf package) or a
K-quant (Q6_K; Q4_K and Q5_K with the head in Q6_K; llama.cpp's Q4_K_M and Q5_K_M mixes, which give attn_v and
ffn_down Q6_K in some layers; quantized here, plainer than llama.cpp's scale search), in llama.cpp's exact block
layouts; 1-D tensors (norms), biases and the tensors the converter keeps in F32
(routers, GPT-2's positions) stay F32, and a matrix whose rows are not whole blocks falls back as llama.cpp's
quantizer does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16). The tokenizer goes out with its special
tokens and chat template: byte-level BPE (Llama 3, Qwen, SmolLM, GPT-2) with its merges and llama.cpp's name for its
pre-tokenizer, SentencePiece-style BPE (Llama 2, Mistral, Phi-3, Gemma) with a score per token instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .gguf_plan import F32_TENSORS, check, metadata, tensors
from .kernels.ggml_quantize import quantize_blocks
from .sources.gguf import ROPE_FREQS
from .sources.gguf_pre import CHECK_TEXT, PRE

# --quantize name -> (ggml type, llama.cpp's LlamaFileType for general.file_type)
TYPES = {"f32": (0, 0), "f16": (1, 1), "bf16": (30, 32), "q8_0": (8, 7), "q4_0": (2, 2), "q4_1": (3, 3),
         "q5_0": (6, 8), "q5_1": (7, 9), "q6_k": (14, 18), "q4_k": (12, 14), "q5_k": (13, 16), "q4_k_m": (12, 15),
         "q5_k_m": (13, 17)}  # fmt: skip
_BLOCK = {2: 32, 3: 32, 6: 32, 7: 32, 8: 32, 12: 256, 13: 256, 14: 256}
# rows that are not whole 256-blocks, as llama.cpp's quantizer: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
_FALLBACK = {12: 6, 13: 7, 14: 8}
# K-quants: the LM head (or the tied embeddings) in Q6_K, as llama.cpp's mixes keep it
_HEAD = {12: 14, 13: 14}
_MIXED = {15, 17}  # file types whose attn_v / ffn_down take more bits in some layers (Q4_K_M, Q5_K_M)


def _mix(name: str, kind: int, file_type: int, layers: int, experts: int) -> int:
    """The type llama.cpp's quantizer gives tensor `name` in a Q4_K_M / Q5_K_M file (llama-quant.cpp): Q6_K for
    attn_v and ffn_down in the layers its use_more_bits picks (the first and last eighth, every third between),
    a fused qkv one step up, with 8 experts attn_k / attn_v in Q8_0 and attn_output in Q5_K; else `kind`."""
    parts = name.split(".")
    if file_type not in _MIXED or parts[0] != "blk":
        return kind
    layer, stem = int(parts[1]), parts[2]
    more = layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2
    if experts == 8 and stem in ("attn_k", "attn_v"):
        return 8
    if more and (stem == "attn_v" or stem.startswith("ffn_down")):
        return 14
    if stem == "attn_qkv":
        return 13 if file_type == 15 else 14
    return 13 if experts == 8 and stem == "attn_output" and file_type == 15 else kind


def _metadata(writer, model, file_type: int, meta: dict[str, Any]) -> None:
    c, arch = model.config, model.gguf.arch
    writer.add_string("general.name", os.path.basename(str(c.name_or_path or "")) or arch)
    writer.add_uint32("general.file_type", file_type)
    writer.add_uint32("general.quantization_version", 2)
    for key, value in meta.items():
        key = key if key in model.gguf.unprefixed else f"{arch}.{key}"  # GGUFLayout.unprefixed: bare keys
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):  # a flag llama.cpp reads as a bool (GPT-NeoX's use_parallel_residual)
            writer.add_bool(key, value)
        elif isinstance(value, list):  # per-layer values (EXAONE 4's sliding-layer flags)
            writer.add_array(key, value)
        else:
            put = writer.add_float32 if isinstance(value, float) else writer.add_uint32
            put(key, value)


def _tokens(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """The vocabulary in id order with llama.cpp's token types (1 normal, 3 control, 4 user-defined, 5 unused)."""
    spec = json.loads(tok.backend.to_str())
    tokens: list[str | None] = [None] * vocab_size
    types = [1] * vocab_size
    for piece, i in spec["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i] = piece
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = 3 if added.get("special") else 4
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", 5
    return tokens, types


def _tokenizer(writer, tok, vocab_size: int, layout) -> None:
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise ConfigError(
            "GGUF out writes BPE tokenizers, byte-level (Llama 3, Qwen, SmolLM, GPT-2) or SentencePiece-style with "
            f"byte fallback (Llama 2, Mistral, Phi-3, Gemma); this tokenizer is {model.get('type')} with "
            f"pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')}"
        )
    tokens, types = _tokens(tok, vocab_size)
    if byte_level:
        writer.add_string("tokenizer.ggml.model", "gpt2")
        ids = tok.encode(CHECK_TEXT)
        writer.add_string(
            "tokenizer.ggml.pre", PRE.get(hashlib.sha256(str(ids).encode()).hexdigest(), "default")
        )
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    elif layout.write_vocab is not None:
        layout.write_vocab(writer, spec, tokens, types)
    else:
        _sentencepiece(writer, spec, tokens, types, tok.unk_token_id)
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = getattr(tok, f"{key}_token_id", None)
        if i is not None:
            writer.add_uint32(f"tokenizer.ggml.{name}_token_id", i)
    first = tok.encode("a")
    writer.add_bool("tokenizer.ggml.add_bos_token", bool(first) and first[0] == tok.bos_token_id)
    writer.add_bool("tokenizer.ggml.add_eos_token", len(first) > 1 and first[-1] == tok.eos_token_id)
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, str):
        writer.add_string("tokenizer.chat_template", template)


def _sentencepiece(writer, spec: dict, tokens: list[str], types: list[int], unk: int | None) -> None:
    """A SentencePiece-style vocabulary as llama.cpp's "llama" tokenizer model holds it: no merges, a score per
    token, and llama.cpp merges the adjacent pair whose joined text is the best-scored token. Each token scores the
    negated rank of the first merge making it, so that order is the merges' order (for a vocabulary converted from
    SentencePiece, whose merges are every split of each token, the same tokens); byte tokens typed BYTE, the
    unknown token UNKNOWN, and the prefix space the normalizer or Metaspace adds as add_space_prefix."""
    merges = spec["model"].get("merges") or []
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), r)
    scores = [0.0] * len(tokens)
    for i, t in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", t) and types[i] in (1, 3):
            types[i] = 6
        elif i == unk:
            types[i] = 2
        elif types[i] == 1:
            scores[i] = -float(rank.get(t, len(merges)) + 1)
    shape = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    prefix = '"Prepend"' in shape or (
        '"Metaspace"' in shape and '"never"' not in shape and '"add_prefix_space": false' not in shape
    )
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bool("tokenizer.ggml.add_space_prefix", prefix)


def _tensor(w: torch.Tensor, ggml_type: int, name: str, tied: bool) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None) for the tensor llama.cpp calls `name` in the requested type (F32 for 1-D
    ones, biases, norms (StableLM's stacked per-head ones are 2-D) and the converter's F32_TENSORS; a smaller
    block type, then F16, where the rows are not whole blocks; the head, or the embeddings it is tied to, as
    _HEAD says); integer tables (DeepSeek-V4's tid2eid) as I32, as the converters write them."""
    import gguf

    if w.dtype in (torch.int32, torch.int64):
        return np.ascontiguousarray(w.detach().cpu().numpy().astype(np.int32)), None
    a = np.ascontiguousarray(w.detach().float().cpu().numpy())
    stem, kind = name.split(".")[-2:]
    if a.ndim < 2 or ggml_type == 0 or kind != "weight" or stem in F32_TENSORS or stem.endswith("_norm"):
        return a, None
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    kind = _HEAD.get(ggml_type, ggml_type) if head else ggml_type
    if a.shape[-1] % _BLOCK.get(kind, 1):
        kind = _FALLBACK.get(kind, 1)
    if kind == 1 or a.shape[-1] % _BLOCK.get(kind, 1):
        return a.astype(np.float16), None
    return quantize_blocks(a, kind), gguf.GGMLQuantizationType(kind)


def save_gguf(model, tokenizer, path: str, quantize: str = "f16") -> str:
    """Write `model` (float weights, any family with a GGUF layout) and `tokenizer` as one GGUF file at `path`,
    through a temporary file and a rename; quantize is one of TYPES."""
    import gguf

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.gguf is None:
        raise ConfigError(
            f"model type {base.config.model_type!r} has no llama.cpp architecture (GGUF layout)"
        )
    if quantize not in TYPES:
        raise ConfigError(
            f"GGUF quantization {quantize!r} is not supported (expected one of {sorted(TYPES)})"
        )
    if any(hasattr(m, "ggml_type") or hasattr(m, "scales") for m in base.modules()):
        raise ConfigError("GGUF out needs float weights: load the model without quantization first")
    ggml_type, file_type = TYPES[quantize]
    meta, planned = metadata(base), list(tensors(base))
    rope = {n: t.numpy() for n, t in planned if n in dict(base.gguf.rope_tensors) or n == ROPE_FREQS}
    check(base, meta, [n for n, _ in planned], rope, {n: tuple(reversed(t.shape)) for n, t in planned})
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, base.gguf.arch)
    _metadata(writer, base, file_type, meta)
    _tokenizer(writer, tokenizer, base.config.vocab_size, base.gguf)
    names = {n for n, _ in planned}
    layers, experts = base.config.num_hidden_layers, meta.get("expert_count", 0)
    for name, t in planned:
        kind = _mix(name, ggml_type, file_type, layers, experts)
        array, raw = _tensor(t, kind, name, "output.weight" not in names)
        writer.add_tensor(name, array, raw_dtype=raw)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
