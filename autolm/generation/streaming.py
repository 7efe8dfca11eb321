"""Text as it is generated: an incremental detokenizer (O(1) work per token), a stream of text pieces with
statistics, a plain string, and transformers-style streamers."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GenerationError
from .config import GenerationConfig
from .decode import check_context, generate_tokens


class Detokenizer:
    """Turns a token stream into text pieces with `tokenizers.decoders.DecodeStream`: each token costs the
    decoding of a few tokens, never of the whole sequence; incomplete UTF-8 characters are held back."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self.backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise GenerationError(
                f"{type(tokenizer).__name__} has no `tokenizers` backend to stream text with"
            )
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add(self, token: int) -> str:
        return self.stream.step(self.backend, int(token)) or ""


def generation_config_of(model, kwargs: dict[str, Any]) -> GenerationConfig:
    """The model's generation config (a PeftModel's base model's) updated with generate()'s keyword arguments."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base._generation_config(None, kwargs)


@dataclass
class GenerationChunk:
    """One step of a text stream: the new text, the token, and running statistics. prompt_tps counts the
    prompt over the time to the first token; generation_tps counts the tokens after the first over the
    time after it (decoding alone)."""

    text: str
    token: int
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: str | None = None
    time_to_first_token: float = 0.0


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int],
    max_new_tokens: int = 256,
    generator: torch.Generator | None = None,
    assistant_model=None,
    **kwargs: Any,
) -> Iterator[GenerationChunk]:
    """Yield text pieces as tokens arrive (batch of one), with tokens/s statistics; assistant_model (a draft
    model) or prompt_lookup_num_tokens decode speculatively."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    input_ids = torch.tensor([ids], dtype=torch.long)
    cfg = generation_config_of(model, dict(max_new_tokens=max_new_tokens, **kwargs))
    check_context(model, len(ids), cfg.max_new_tokens or 0)
    detok = Detokenizer(tokenizer)
    eos = set(cfg.eos_ids)
    t0 = time.perf_counter()
    t_first = None
    steps = generate_tokens(
        model, input_ids, None, cfg, generator, tokenizer, assistant_model=assistant_model
    )
    for n, step in enumerate(steps, 1):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        tok = int(step.token[0])
        text = "" if tok in eos else detok.add(tok)
        reason = "stop" if bool(step.finished[0]) else "length" if n >= cfg.max_new_tokens else None
        prompt_tps = len(ids) / max(t_first - t0, 1e-9)
        gen_tps = (n - 1) / max(now - t_first, 1e-9) if n > 1 else 0.0
        yield GenerationChunk(text, tok, len(ids), n, prompt_tps, gen_tps, reason, t_first - t0)
        if reason is not None:
            return


def generate_text(model, tokenizer, prompt: str | list[int], **kwargs: Any) -> str:
    """The generated text as one string."""
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **kwargs))


class TextStreamer:
    """transformers-style streamer: prints text as it is generated (batch of one)."""

    def __init__(
        self, tokenizer, skip_prompt: bool = False, skip_special_tokens: bool = True, **decode_kwargs: Any
    ):
        self.tokenizer, self.skip_prompt = tokenizer, skip_prompt
        self._prompt_seen = False
        self._detok = Detokenizer(tokenizer, skip_special_tokens)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise GenerationError("TextStreamer only supports a batch of one")
        ids = value.reshape(-1).tolist()
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
        self.on_text("".join(self._detok.add(t) for t in ids), False)

    def end(self) -> None:
        self.on_text("", True)

    def on_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """A streamer to iterate over from another thread: `for text in streamer: ...`."""

    def __init__(
        self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any
    ):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.queue.put(text)
        if stream_end:
            self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get(timeout=self.timeout)) is not None:
            yield item
