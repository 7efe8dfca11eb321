"""The serving engine: one thread owns the model and runs continuous batching. New requests are prefilled
together as a left-padded batch and join the running batch between decode steps (their caches
right-aligned under a padding mask); finished, failed or abandoned requests leave it at the next step.

Per request, one list of logits processors (logit bias, presence/frequency penalties, min_tokens, a
grammar mask, the sampling settings). Log-probabilities come from the model's own distribution, before
any of those, as OpenAI and vLLM define them.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ..generation import Detokenizer, GenerationConfig, LogitsProcessor, choose, logits_processors
from ..models import KVCache

# A logprob entry: (token id, its log-probability, [(id, logprob) of the top alternatives]).
Entry = tuple[int, float, list[tuple[int, float]]]


@dataclass
class Sequence:
    """One completion being generated: its settings, its progress, and where its events go."""

    prompt: list[int]
    config: GenerationConfig
    stops: list[str]
    emit: Any  # callable(event dict), called from the engine thread
    generator: torch.Generator | None = None
    logprobs: int | None = None  # alternatives per token (0: the chosen token only); None: no logprobs
    prompt_logprobs: bool = False  # echo: the prompt's tokens too
    rank: bool = False  # keep the cumulative logprob (best_of)
    bias: dict[int, float] = field(default_factory=dict)
    presence: float = 0.0
    frequency: float = 0.0
    ignore_eos: bool = False
    constraint: Any = None  # structured.Constraint
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    text: str = ""  # the text so far
    detok: Any = None
    pending: list[Entry] = field(default_factory=list)  # logprob entries not yet emitted
    cumulative: float = 0.0
    cancelled: bool = False
    cached: int = 0  # tokens of this sequence in the batch cache
    last: int = -1  # the latest sampled token, fed to the next decode step

    processors: Any = None  # the request's logits processors, built once from the fields above

    def __post_init__(self) -> None:
        if self.processors is None:
            c = self.config
            cfg = dataclasses.replace(
                c,
                logit_bias=self.bias or c.logit_bias,
                presence_penalty=self.presence or c.presence_penalty,
                frequency_penalty=self.frequency or c.frequency_penalty,
            )
            grammar = [GrammarMask(self.constraint)] if self.constraint is not None else []
            self.processors = logits_processors(cfg, len(self.prompt), grammar)


class GrammarMask(LogitsProcessor):
    """Structured output as a logits processor: the constraint's mask of the tokens it allows next."""

    def __init__(self, constraint):
        self.constraint = constraint

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.constraint.mask(scores)


def entry(logp: torch.Tensor, token: int, top: int) -> Entry:
    """logp: (V,) log-probabilities."""
    alts = []
    if top:
        values, ids = logp.topk(top)
        alts = list(zip(ids.tolist(), values.tolist()))
    return token, float(logp[token]), alts


class Engine:
    """Runs the model on a background thread; `submit` hands it a Sequence."""

    def __init__(self, model, tokenizer, max_batch: int = 8):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.pending: queue.Queue[Sequence] = queue.Queue()
        self.active: list[Sequence] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 where the cache slot holds a real token
        self.steps = 0
        self.error: BaseException | None = None
        self.stopping = False
        self._thread = threading.Thread(target=self._run, name="autolm-engine", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        self.pending.put(seq)

    def stop(self) -> None:
        """End every request in flight (server shutdown): each gets a final 'abort' event."""
        self.stopping = True
        self.pending.put(None)

    def _run(self) -> None:
        while not self.stopping:
            try:
                self._admit(block=not self.active)
                self._step()
            except Exception as e:  # keep serving; fail the requests in flight
                self.error = e
                for seq in self.active:
                    seq.emit({"error": f"generation failed: {e}"})
                self.active, self.cache, self.mask = [], None, None
        for seq in self.active:
            seq.emit(
                {
                    "text": "",
                    "finish_reason": "abort",
                    "prompt_tokens": len(seq.prompt),
                    "completion_tokens": len(seq.tokens),
                }
            )

    @torch.inference_mode()
    def _admit(self, block: bool) -> None:
        """Take waiting requests (up to max_batch in all), prefill them together, add them to the batch."""
        joined: list[Sequence] = []
        while len(self.active) + len(joined) < self.max_batch:
            try:
                seq = self.pending.get(block=block and not joined)
            except queue.Empty:
                break
            if seq is None:  # stop()
                return
            if not seq.cancelled:
                joined.append(seq)
        if not joined:
            return
        try:
            cache = self._prefill(joined)
        except Exception as e:  # these requests fail; the running batch goes on
            for seq in joined:
                seq.emit({"error": f"generation failed: {type(e).__name__}: {e}"})
            return
        self._rebuild([(seq, cache, j) for j, seq in enumerate(joined)])

    def _prefill(self, seqs: list[Sequence]) -> KVCache:
        """Run the new prompts as one left-padded batch and sample each one's first token."""
        dev = self.model.device
        ids = pad_sequence([torch.tensor(s.prompt) for s in seqs], batch_first=True, padding_side="left").to(
            dev
        )
        mask = pad_sequence(
            [torch.ones(len(s.prompt), dtype=torch.long) for s in seqs], batch_first=True, padding_side="left"
        ).to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self.model.make_cache(len(seqs), ids.shape[1])
        every = any(s.prompt_logprobs for s in seqs)
        out = self.model(
            ids,
            attention_mask=mask if not bool(mask.all()) else None,
            position_ids=positions,
            past_key_values=cache,
            logits_to_keep=0 if every else 1,
        )
        for j, s in enumerate(seqs):
            s.cached = len(s.prompt)
            if s.prompt_logprobs:
                self._emit_prompt_logprobs(s, out.logits[j, ids.shape[1] - len(s.prompt) :])
            if s.config.max_new_tokens == 0:
                self._finish(s, "length")
            else:
                self._take(s, out.logits[j, -1])
        return cache

    def _emit_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Each prompt token's logprob given the tokens before it (none for the first), as `echo` returns them."""
        top = seq.logprobs or 0
        entries: list[Entry | None] = [None]
        for t in range(1, len(seq.prompt)):
            entries.append(entry(torch.log_softmax(logits[t - 1].float(), -1), seq.prompt[t], top))
        seq.emit({"text": "", "prompt_logprobs": entries})

    def _rebuild(self, joined: list[tuple[Sequence, KVCache, int]] = ()) -> None:
        """Drop finished rows and add new ones: the batch cache re-made with every row right-aligned."""
        keep = [(s, i) for i, s in enumerate(self.active) if not s.cancelled]
        new = [(s, c, j) for s, c, j in joined if not s.cancelled]
        rows = [(self.cache, i, s.cached) for s, i in keep] + [(c, j, s.cached) for s, c, j in new]
        self.active = [s for s, _ in keep] + [s for s, _, _ in new]
        if not self.active:
            self.cache, self.mask = None, None
            return
        longest = max(s.cached for s in self.active)
        static = (
            self.model.decode_step is not None
        )  # a compiled step: static addresses, capacity in steps of 256
        capacity = -(-(longest + 64) // 256) * 256 if static else longest + 64
        self.cache = KVCache.gather(rows, capacity, static)
        self.mask = torch.zeros(len(self.active), longest, dtype=torch.long, device=self.model.device)
        for i, s in enumerate(self.active):
            self.mask[i, longest - s.cached :] = 1

    @torch.inference_mode()
    def _step(self) -> None:
        """One decode step for every active row."""
        if any(s.cancelled for s in self.active):
            self._rebuild()
        if not self.active:
            return
        dev = self.model.device
        tokens = torch.tensor([[s.last] for s in self.active], device=dev)
        positions = torch.tensor([[s.cached] for s in self.active], device=dev)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
        logits = self.model(
            tokens, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache
        ).logits[:, -1]
        greedy = logits.argmax(-1).tolist()
        self.steps += 1
        for i, seq in enumerate(self.active):
            seq.cached += 1
            self._take(seq, logits[i], greedy[i])

    def _take(self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Choose the next token of a row, emit its text, and decide whether the row is finished. A failure
        here (a broken sampling setting, a grammar error) ends this request alone."""
        try:
            self._choose(seq, logits, greedy)
        except Exception as e:
            seq.emit({"error": f"generation failed: {type(e).__name__}: {e}"})
            seq.cancelled = True

    def _choose(self, seq: Sequence, logits: torch.Tensor, greedy: int | None) -> None:
        cfg = seq.config
        if greedy is not None and not cfg.do_sample and not seq.processors:
            token = greedy  # plain greedy (no processors): the batch's argmax is this row's token
            raw = None
        else:
            raw = logits.float()
            history = torch.tensor([seq.prompt + seq.tokens], device=logits.device)
            token = int(choose(seq.processors(history, raw[None]), cfg, seq.generator))
        seq.last = token
        is_eos = token in cfg.eos_ids and not seq.ignore_eos
        if seq.logprobs is not None or seq.rank:
            e = entry(
                torch.log_softmax(raw if raw is not None else logits.float(), -1), token, seq.logprobs or 0
            )
            seq.cumulative += e[1]
            if seq.logprobs is not None and not is_eos:
                seq.pending.append(e)
        if seq.constraint is not None:
            seq.constraint.advance(token)
        if is_eos:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        if seq.detok is None:
            seq.detok = Detokenizer(self.tokenizer)
        seq.text += seq.detok.add(token)
        text = seq.text
        cut = min((text.find(s) for s in seq.stops if s in text), default=-1)
        if cut >= 0:
            return self._finish(seq, "stop", text[:cut])
        if seq.constraint is not None and seq.constraint.finished:
            return self._finish(seq, "stop", text)
        if len(seq.tokens) >= cfg.max_new_tokens:
            return self._finish(seq, "length", text)
        # Hold back an incomplete character, and any tail that could still become a stop string.
        safe = len(text) - (max(map(len, seq.stops)) - 1 if seq.stops else 0)
        if safe > seq.sent or seq.pending:
            seq.emit(self._event(seq, text[seq.sent : max(safe, seq.sent)]))
            seq.sent = max(safe, seq.sent)

    def _event(self, seq: Sequence, text: str, **more: Any) -> dict:
        ev = {"text": text, **more}
        if seq.pending:
            ev["logprobs"], seq.pending = seq.pending, []
        return ev

    def _finish(self, seq: Sequence, reason: str, text: str | None = None) -> None:
        if text is None:
            text = seq.text
        eos = reason == "stop" and seq.last in seq.config.eos_ids and not seq.ignore_eos
        seq.emit(
            self._event(
                seq,
                text[seq.sent :],
                finish_reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.tokens) + eos,
                cumulative_logprob=seq.cumulative,
                full_text=text,
            )
        )
        seq.sent = len(text)
        seq.cancelled = True  # marks it done: the next step drops the row
