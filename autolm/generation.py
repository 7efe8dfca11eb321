"""Generation in three layers: a token iterator, a text stream with statistics, a plain string.

`model.generate` (transformers' arguments and return value) is built on the token iterator; beam
search is its own loop. Logits are processed in fp32 in transformers' order, so greedy and beam
outputs match transformers token for token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import GenerationError


@dataclass
class GenerationConfig:
    """Decoding settings with transformers' names; unset values take transformers' defaults."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    use_cache: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_model_dir(cls, directory: str, config=None) -> "GenerationConfig":
        """generation_config.json when present, else the model config's special tokens."""
        path = os.path.join(directory, "generation_config.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return cls.from_dict(json.load(f))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
                from .errors import ConfigError

                raise ConfigError(f"{path}: not a valid generation config ({e})") from None
        return cls.from_model_config(config)

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        if config is None:
            return cls()
        return cls(eos_token_id=config.eos_token_id, bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra" and getattr(self, f.name) != f.default:
                d[f.name] = getattr(self, f.name)
        return d

    def updated(self, **kwargs: Any) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise GenerationError(f"generate() got unknown arguments: {', '.join(unknown)}")
        new = dataclasses.replace(self, **{k: v for k, v in kwargs.items()})
        new.validate()
        return new

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise GenerationError(msg)

        check(self.max_new_tokens is None or self.max_new_tokens > 0, f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        check(self.top_k is None or self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        check(self.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        check(self.num_beams == 1 or self.num_return_sequences <= self.num_beams,
              f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        check(self.early_stopping in (True, False, "never"), f"early_stopping must be a bool or 'never', got {self.early_stopping!r}")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)


# ---- logits processors (fp32 scores (B, V) -> scores) ------------------------------------------------


def apply_repetition_penalty(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of every token already in the sequence by `penalty`."""
    seen = torch.gather(scores, 1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, input_ids, seen)


def apply_top_k(scores: torch.Tensor, k: int, keep: int = 1) -> torch.Tensor:
    k = min(max(k, keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -float("inf"))


def apply_top_p(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - p)
    remove[..., -keep:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))


def apply_min_p(scores: torch.Tensor, min_p: float, keep: int = 1) -> torch.Tensor:
    probs = scores.softmax(-1)
    remove = probs < min_p * probs.amax(-1, keepdim=True)
    sorted_idx = torch.argsort(scores, descending=True)
    sorted_remove = torch.gather(remove, 1, sorted_idx)
    sorted_remove[..., :keep] = False
    return scores.masked_fill(sorted_remove.scatter(1, sorted_idx, sorted_remove), -float("inf"))


def process_logits(scores: torch.Tensor, input_ids: torch.Tensor, cfg: GenerationConfig, new_tokens: int,
                   keep: int = 1) -> torch.Tensor:
    """transformers' order: repetition penalty, min_new_tokens, then (sampling) temperature, top-k, top-p, min-p."""
    if cfg.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, input_ids, cfg.repetition_penalty)
    if cfg.min_new_tokens and new_tokens < cfg.min_new_tokens and cfg.eos_ids:
        scores = scores.clone()
        scores[:, cfg.eos_ids] = -float("inf")
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k:
            scores = apply_top_k(scores, cfg.top_k, keep)
        if cfg.top_p < 1.0:
            scores = apply_top_p(scores, cfg.top_p, keep)
        if cfg.min_p is not None:
            scores = apply_min_p(scores, cfg.min_p, keep)
    return scores


# ---- stop strings --------------------------------------------------------------------------------------


class StopStrings:
    """Stops a row once its newly generated text contains any stop string."""

    def __init__(self, stops: str | list[str], tokenizer):
        if tokenizer is None:
            raise GenerationError("stop_strings needs a tokenizer: pass generate(..., tokenizer=tok)")
        self.stops = [stops] if isinstance(stops, str) else list(stops)
        self.tokenizer = tokenizer
        self.window = max(len(s) for s in self.stops) + 8  # tokens to decode: each is at least one char

    def hit(self, new_ids: torch.Tensor) -> torch.Tensor:
        """new_ids (B, n) -> (B,) bool."""
        tail = new_ids[:, -self.window:].tolist()
        texts = [self.tokenizer.decode(row) for row in tail]
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool)


# ---- layer 1: the token iterator ----------------------------------------------------------------------


def _prepare(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cfg: GenerationConfig):
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask.to(input_ids.device)


def max_new_tokens(cfg: GenerationConfig, prompt_len: int) -> int:
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    return max((cfg.max_length or 20) - prompt_len, 0)


@torch.inference_mode()
def generate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    config: GenerationConfig | None = None, generator: torch.Generator | None = None,
                    tokenizer=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next tokens (B,), finished (B,)) per step; finished rows get the pad token."""
    cfg = config or GenerationConfig()
    input_ids, attention_mask = _prepare(model, input_ids, attention_mask, cfg)
    B, P = input_ids.shape
    steps = max_new_tokens(cfg, P)
    if steps == 0:
        return
    from .cache import KVCache

    cache = KVCache.for_model(model, B, cache_capacity(model, P + steps))
    eos = torch.tensor(cfg.eos_ids, device=input_ids.device, dtype=torch.long)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids[0] if cfg.eos_ids else 0)
    stop = StopStrings(cfg.stop_strings, tokenizer) if cfg.stop_strings else None
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    seqs = input_ids
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                   logits_to_keep=1).logits[:, -1, :]
    next_pos = positions[:, -1:] + 1
    for step in range(steps):
        scores = process_logits(logits.float(), seqs, cfg, step)
        if cfg.do_sample:
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            token = scores.argmax(-1)
        if len(eos) or stop is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad))
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        if len(eos):
            unfinished &= ~torch.isin(token, eos)
        if stop is not None:
            unfinished &= ~stop.hit(seqs[:, P:]).to(unfinished.device)
        yield token, ~unfinished
        if step == steps - 1 or not bool(unfinished.any()):
            return
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        logits = next_token_logits(model, token[:, None], attention_mask, next_pos, cache)
        next_pos = next_pos + 1


def cache_capacity(model, needed: int) -> int:
    """A cache length for `needed` tokens; rounded up for a compiled decode step, which is specialised
    on the cache's shape, so that most requests share one compiled graph."""
    return -(-needed // 256) * 256 if getattr(model, "compiled_decode", False) else needed


def next_token_logits(model, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                      cache) -> torch.Tensor:
    """Logits (B, vocab) after one new token per row: the static-shape decode_step when the model was
    compiled for it (compile_decode), else a plain forward with the cache."""
    if getattr(model, "compiled_decode", False):
        return model.decode_step(tokens, attention_mask, position_ids, cache)
    return model(tokens, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache).logits[:, -1]


def compile_decode(model, **compile_kwargs):
    """Opt in to a torch.compile'd decode step; returns the model.

    Generation then runs each new token through `model.decode_step`, whose inner `_decode` (the
    whole decoder and head, for one token per row over a fixed-size cache) is compiled by
    inductor: matrix-vector products become fused kernels that read the weights at close to the
    memory bandwidth, and the norms, RoPE and attention fuse around them. The first generation
    pays the compile (tens of seconds; inductor caches it on disk for later processes), and so
    does the first one with a new batch size or a cache longer than any before. Prefill stays
    eager. compile_kwargs go to torch.compile. The model must sit on one device, unsharded; a
    PeftModel's base model is compiled (LoRA layers included).
    """
    base = getattr(model, "base_model", model)
    devices = sorted({str(d) for d in (getattr(base, "hf_device_map", None) or {}).values()})
    if len(devices) > 1 or any(hasattr(p, "to_local") for p in base.parameters()):
        raise GenerationError("compile_decode needs the whole model on one device, not spread by a device_map "
                              f"({', '.join(devices)}) or sharded across ranks")
    base._decode = torch.compile(base._decode, **compile_kwargs)
    base.compiled_decode = True
    return model


class GenerationMixin:
    """`generate()` for LlamaForCausalLM with transformers' arguments and return value."""

    def _generation_config(self, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
        base = generation_config or getattr(self, "generation_config", None) or GenerationConfig.from_model_config(self.config)
        return base.updated(**kwargs)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config: GenerationConfig | None = None, streamer=None, tokenizer=None,
                 generator: torch.Generator | None = None, seed: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Prompt + new tokens (B * num_return_sequences, P + n), as transformers returns them."""
        if input_ids is None:
            raise GenerationError("generate() needs input_ids")
        cfg = self._generation_config(generation_config, kwargs)
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        input_ids, attention_mask = _prepare(self, input_ids, attention_mask, cfg)
        if cfg.num_beams > 1:
            return beam_search(self, input_ids, attention_mask, cfg)
        if cfg.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(cfg.num_return_sequences, 0)
            attention_mask = attention_mask.repeat_interleave(cfg.num_return_sequences, 0)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new = []
        for token, _ in generate_tokens(self, input_ids, attention_mask, cfg, generator, tokenizer):
            new.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids] + [t[:, None] for t in new], dim=1)


# ---- beam search ---------------------------------------------------------------------------------------


@torch.inference_mode()
def beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Vectorised beam search with transformers' semantics (length penalty, early stopping, EOS)."""
    from .cache import KVCache

    nb, B, P = cfg.num_beams, input_ids.shape[0], input_ids.shape[1]
    steps = max_new_tokens(cfg, P)
    max_len = P + steps
    dev = input_ids.device
    eos = torch.tensor(cfg.eos_ids, device=dev, dtype=torch.long)
    keep_k = max(2, 1 + len(eos)) * nb
    top_nb = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep_k - nb, dtype=torch.bool)]).to(dev)
    fill = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids[0] if cfg.eos_ids else -1)

    def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # t (B, k, ...) by idx (B, k')
        return torch.gather(t, 1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))

    running = torch.full((B, nb, max_len), fill, dtype=torch.long, device=dev)
    running[:, :, :P] = input_ids[:, None]
    sequences = running.clone()
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = -1e9
    scores = torch.full((B, nb), -1e9, device=dev)
    finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    gen_len = torch.zeros(B, nb, dtype=torch.long, device=dev)  # generated length of each finished beam

    mask = attention_mask.repeat_interleave(nb, 0)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.for_model(model, B * nb, cache_capacity(model, max_len))
    logits = model(input_ids.repeat_interleave(nb, 0), attention_mask=mask, position_ids=positions,
                   past_key_values=cache, logits_to_keep=1).logits[:, -1]
    next_pos = positions[:, -1:] + 1
    cur = P
    while True:
        flat = running[:, :, :cur].reshape(B * nb, cur)
        logp = F.log_softmax(logits.float(), dim=-1)
        logp = process_logits(logp, flat, cfg, cur - P, keep=len(eos) + 1)
        V = logp.shape[-1]
        logp = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        if cfg.do_sample:
            idx = torch.multinomial(logp.softmax(-1), keep_k)
            top_logp = torch.gather(logp, 1, idx)
        else:
            top_logp, idx = torch.topk(logp, keep_k)
        beam_idx, tok = idx // V, idx % V
        top_seqs = gather(running, beam_idx)
        top_seqs[:, :, cur] = tok
        hits = torch.isin(tok, eos) if len(eos) else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= max_len:
            hits = torch.ones_like(hits)
        # Running beams for the next step: the best continuations that did not stop.
        run_logp = top_logp + hits.float() * -1e9
        nxt = torch.topk(run_logp, nb)[1]
        running, running_scores = gather(top_seqs, nxt), gather(run_logp, nxt)
        parent = gather(beam_idx, nxt)  # which old beam each new running beam continues
        # Finished beams: merge the new finished candidates (top nb only) with the kept ones.
        just_done = hits & top_nb[None]
        cand = top_logp / ((cur + 1 - P) ** cfg.length_penalty)
        full = finished.all(-1, keepdim=True) & (cfg.early_stopping is True)
        cand = cand + full.float() * -1e9 + (~improvable).float() * -1e9 + (~just_done).float() * -1e9
        m_seqs = torch.cat([sequences, top_seqs], 1)
        m_scores = torch.cat([scores, cand], 1)
        m_fin = torch.cat([finished, just_done], 1)
        m_len = torch.cat([gen_len, torch.full_like(tok, cur + 1 - P)], 1)
        best = torch.topk(m_scores, nb)[1]
        sequences, scores, finished, gen_len = gather(m_seqs, best), gather(m_scores, best), gather(m_fin, best), gather(m_len, best)
        cur += 1
        # Can a running beam still beat the worst finished one?
        if cfg.early_stopping == "never" and cfg.length_penalty > 0:
            best_len = max_len - P
        else:
            best_len = cur - P
        best_running = running_scores[:, :1] / (best_len ** cfg.length_penalty)
        worst_done = torch.where(finished, scores.min(1, keepdim=True)[0], torch.tensor(-1e9, device=dev))
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        go_on = bool(improvable.any()) and not (bool(finished.all()) and cfg.early_stopping is True) and not bool(hits.all())
        if not go_on:
            break
        flat_parent = (parent + torch.arange(B, device=dev)[:, None] * nb).view(-1)
        cache.reorder(flat_parent)
        mask = torch.cat([mask.index_select(0, flat_parent), mask.new_ones(B * nb, 1)], dim=1)
        next_pos = next_pos.index_select(0, flat_parent)
        logits = next_token_logits(model, running[:, :, cur - 1].reshape(B * nb, 1), mask, next_pos, cache)
        next_pos = next_pos + 1
    n = cfg.num_return_sequences
    out_len = P + int(gen_len[:, :n].max())
    return sequences[:, :n, :out_len].reshape(B * n, out_len)


# ---- layer 2 and 3: text stream with statistics, and a plain string -----------------------------------


@dataclass
class GenerationChunk:
    """One step of a text stream: the new text, the token, and running statistics."""

    text: str
    token: int
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: str | None = None


def stream_generate(model, tokenizer, prompt: str | list[int], max_new_tokens: int = 256,
                    generator: torch.Generator | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
    """Yield text pieces as tokens arrive (batch of one), with tokens/s statistics."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    input_ids = torch.tensor([ids], dtype=torch.long)
    cfg = model._generation_config(None, dict(max_new_tokens=max_new_tokens, **kwargs))
    detok = IncrementalDetokenizer(tokenizer)
    eos = set(cfg.eos_ids)
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for token, done in generate_tokens(model, input_ids, None, cfg, generator, tokenizer):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        n += 1
        tok = int(token[0])
        finished = bool(done[0])
        text = "" if tok in eos else detok.add(tok)
        reason = ("stop" if finished else "length" if n >= cfg.max_new_tokens else None)
        if reason is not None:
            text += detok.flush()
        prompt_tps = len(ids) / max(t_first - t0, 1e-9)
        gen_tps = (n - 1) / max(now - t_first, 1e-9) if n > 1 else 0.0
        yield GenerationChunk(text, tok, len(ids), n, prompt_tps, gen_tps, reason)
        if reason is not None:
            return


def generate_text(model, tokenizer, prompt: str | list[int], **kwargs: Any) -> str:
    """The generated text as one string."""
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **kwargs))


class IncrementalDetokenizer:
    """Turns a token stream into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


class TextStreamer:
    """transformers-style streamer: prints text as it is generated (batch of one)."""

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer, self.skip_prompt, self.decode_kwargs = tokenizer, skip_prompt, decode_kwargs
        self._prompt_seen = False
        self._detok = IncrementalDetokenizer(tokenizer)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise GenerationError("TextStreamer only supports a batch of one")
        ids = value.reshape(-1).tolist()
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
        for t in ids:
            self.on_text(self._detok.add(t), False)

    def end(self) -> None:
        self.on_text(self._detok.flush(), True)

    def on_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """A streamer to iterate over from another thread: `for text in streamer: ...`."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        import queue

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
