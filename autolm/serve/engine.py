"""The serving engine: one thread owns the model and runs continuous batching. New requests are prefilled
together as a left-padded batch, `prefill_chunk` tokens per forward with a decode step of the running batch
between two (long prompts do not stall the streams), and join the running batch between decode steps (their
caches right-aligned under a padding mask); finished, failed or abandoned requests leave it at the next step.
A request running alone may decode speculatively (speculation.py).

Per request, one list of logits processors (logit bias, presence/frequency penalties, min_tokens, a
grammar mask, the sampling settings). Log-probabilities come from the model's own distribution, before
any of those, as OpenAI and vLLM define them. Each request hears from the engine through typed events
(events.py); the model is called in two small methods, one for prefill and one for a decode step.
"""

from __future__ import annotations

import queue
import threading

import torch
from torch.nn.utils.rnn import pad_sequence

from ..generation import Detokenizer, choose
from ..generation.restart import recompute, switch_length
from ..models import KVCache
from .events import Delta, Entry, Failed, Finished
from .prefix import PrefixCache
from .rows import decoder, gather, prefill_groups, servable
from .sequence import Sequence, Work, adapters_of, emit_prompt_logprobs, entry
from .speculation import Speculation, eligible, speculative_step


class Engine:
    """Runs the model on a background thread, or on the caller's with thread=False and `run()`; `submit`
    hands it a Sequence. The thread that loaded the model is the fast one to run it on: PyTorch's OpenMP
    pool belongs to the thread that first used it, and a second thread's pool ran the one-token step ~3x
    slower on 2 cores (autolm.serve.http runs the engine on the caller's thread, uvicorn on another)."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        prefix_cache: int = 0,
        thread: bool = True,
        speculation: Speculation | None = None,
        prefill_chunk: int = 512,
    ):
        self.model, self.tokenizer, self.max_batch = servable(model), tokenizer, max_batch
        self.prefill_chunk = prefill_chunk  # prompt tokens per forward between two decode steps
        # prompts attending both ways (PaliGemma 1's unpadded ones, CPM-Ant's): each read alone, whole, afresh
        both = getattr(model, "bidirectional_forward", False)
        self.whole_prompts = both or getattr(model.config, "bidirectional_prompt", False)
        if self.whole_prompts:
            self.prefill_chunk, prefix_cache = 1 << 62, 0
        # speculative decoding while one request runs alone; prompt keys and values (recurrent states from prompts'
        # snapshots) reused across requests
        self.speculation = speculation
        recurrent = getattr(model, "recurrent", False)
        self.prefix = PrefixCache(prefix_cache, recurrent=recurrent) if prefix_cache > 0 else None
        self.pending: queue.Queue[Sequence] = queue.Queue()
        self.active: list[Sequence] = []
        self.cache: KVCache | None = None
        self.decode = None  # the decode step for the current batch (see _rebuild)
        self.mask: torch.Tensor | None = None  # (B, L) 1 where the cache slot holds a real token
        self.steps = 0
        self.error: BaseException | None = None
        self.stopping = False
        self.aborting = False
        if thread:
            threading.Thread(target=self.run, name="autolm-engine", daemon=True).start()

    def submit(self, seq: Sequence) -> None:
        self.pending.put(seq)

    def call(self, fn) -> Work:
        """fn() on the model's thread between two steps (the model changes only there): a future of its result."""
        work = Work(fn)
        self.pending.put(work)
        return work

    def drop_adapter(self, name: str) -> None:
        """On the model's thread, before an adapter goes: the requests running with it end ('abort')."""
        for seq in self.active:
            if seq.adapter == name and not seq.cancelled:
                self._finish(seq, "abort")

    def abort(self) -> None:
        """End every request in flight and waiting at the next step, each with a final 'abort' event, and
        keep running (SIGTERM: streams end cleanly before the server closes their connections)."""
        self.aborting = True
        self.pending.put(None)  # wakes an idle engine

    def stop(self) -> None:
        """End every request in flight (server shutdown): each gets a final 'abort' event."""
        self.stopping = True
        self.pending.put(None)

    def run(self) -> None:
        """Serve until stop(): admit waiting requests, step the batch."""
        while not self.stopping:
            try:
                if self.aborting:
                    self._abort_all()
                self._admit(block=not self.active)
                self._step()
            except Exception as e:  # keep serving; fail the requests in flight
                self._fail_active(e)
        self._abort_all()

    def _fail_active(self, e: Exception) -> None:
        self.error = e
        for seq in self.active:
            seq.emit(Failed(f"generation failed: {e}"))
        self.active, self.cache, self.mask = [], None, None

    def _abort_all(self) -> None:
        self.aborting = False
        waiting = []
        while not self.pending.empty():
            seq = self.pending.get_nowait()
            if seq is not None and not seq.cancelled:
                waiting.append(seq)
        for seq in self.active + waiting:
            if not seq.cancelled:
                self._finish(seq, "abort")
        self.active, self.cache, self.mask = [], None, None

    @torch.inference_mode()
    def _admit(self, block: bool) -> None:
        """Take waiting requests (up to max_batch in all), prefill them together, add them to the batch."""
        joined: list[Sequence] = []
        while len(self.active) + len(joined) < self.max_batch:
            try:
                seq = self.pending.get(block=block and not joined)
            except queue.Empty:
                break
            if seq is None:  # stop() or abort(): those already taken are still prefilled, then ended
                break
            if isinstance(seq, Work):  # for the model's thread between steps (loading an adapter, ...)
                seq()
            elif seq.adapter is not None and seq.adapter not in (
                getattr(self.model, "peft_config", None) or {}
            ):
                self._finish(seq, "abort")  # its adapter was unloaded meanwhile
            elif not seq.cancelled:
                joined.append(seq)
        if not joined:
            return
        try:
            rows = self._prefill_cached(joined)
            fresh = [s for s in joined if not any(s is r[0] for r in rows)]
            for group in prefill_groups(self.model, fresh, self.whole_prompts):  # (rows.py)
                cache = self._prefill(group)
                rows += [(seq, cache, j) for j, seq in enumerate(group)]
        except Exception as e:  # these requests fail; the running batch goes on
            for seq in joined:
                seq.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            return
        self._rebuild(rows)

    def _prefill_cached(self, seqs: list[Sequence]) -> list[tuple[Sequence, KVCache, int]]:
        """The requests whose prompts start with cached blocks (autolm.serve.prefix), each prefilled on its own
        from there; the others are left to _prefill (and so are those asking for the prompt's logprobs)."""
        rows = []
        for s in seqs if self.prefix is not None else ():
            blocks = self.prefix.lookup(s.prompt, s.adapter) if s.prompt_logprobs is None else []
            if not blocks:
                continue
            cache = self.model.make_cache(1, len(s.prompt))
            s.reused = cache.length = self.prefix.fill(cache, 0, blocks)
            ids = torch.tensor([s.prompt[s.reused :]], device=self.model.device)
            positions = torch.arange(s.reused, len(s.prompt), device=ids.device)[None]
            logits = self._chunked([s], ids, None, positions, cache, every=False)
            self.prefix.store(s.prompt, cache, 0, 0, s.adapter)
            self._first_token(s, logits[0, -1])
            rows.append((s, cache, 0))
        return rows

    def _first_token(self, s: Sequence, logits: torch.Tensor) -> None:
        s.cached = len(s.prompt)
        if s.config.max_new_tokens == 0:
            self._finish(s, "length")
        else:
            self.take(s, logits)

    def _prefill(self, seqs: list[Sequence]) -> KVCache:
        """Run the new prompts as one left-padded batch and sample each one's first token."""
        dev, prompts = self.model.device, [torch.tensor(s.prompt) for s in seqs]
        ids = pad_sequence(prompts, batch_first=True, padding_side="left").to(dev)
        ones = [torch.ones(len(s.prompt), dtype=torch.long) for s in seqs]
        mask = pad_sequence(ones, batch_first=True, padding_side="left").to(dev)
        cache = self.model.make_cache(len(seqs), ids.shape[1])
        every = any(s.prompt_logprobs is not None for s in seqs)
        logits = self._prefill_logits(seqs, ids, mask, cache, every)
        for j, s in enumerate(seqs):
            if self.prefix is not None:
                self.prefix.store(s.prompt, cache, j, ids.shape[1] - len(s.prompt), s.adapter)
            if s.prompt_logprobs is not None:
                emit_prompt_logprobs(s, logits[j, ids.shape[1] - len(s.prompt) :])
            self._first_token(s, logits[j, -1])
        return cache

    def _prefill_logits(
        self, seqs: list[Sequence], ids: torch.Tensor, mask: torch.Tensor, cache: KVCache, every: bool
    ) -> torch.Tensor:
        """The model over left-padded prompts ids (B, T): logits (B, T, V) with every, else (B, 1, V)."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._chunked(seqs, ids, mask if not bool(mask.all()) else None, positions, cache, every)

    def _chunked(self, seqs, ids, mask, positions, cache: KVCache, every: bool) -> torch.Tensor:
        """The model over ids (B, T) after what `cache` holds, prefill_chunk tokens per forward with a decode
        step of the running batch between two (its streams keep flowing while a long prompt is read): the
        logits of every position with `every`, else of the last (B, 1, V). mask covers the cache and ids."""
        start, T, out, chunk = cache.length, ids.shape[1], [], self.prefill_chunk
        ends = [*range(chunk - start % chunk, T, chunk), T]  # where the cache holds whole chunks
        for a, b in zip([0, *ends], ends):
            if a and self.active:
                self._interleave()
            with adapters_of(self.model, seqs):
                logits = self.model(
                    ids[:, a:b],
                    attention_mask=None if mask is None else mask[:, : start + b],
                    position_ids=positions[:, a:b],
                    past_key_values=cache,
                    logits_to_keep=0 if every else 1,
                ).logits
            out.append(logits)
            for j, s in enumerate(seqs if self.prefix is not None and b < T else ()):  # states at a boundary
                self.prefix.boundary(s.prompt, cache, j, len(s.prompt) - (T - b), s.adapter)
        return torch.cat(out, 1) if every else out[-1]

    def _interleave(self) -> None:
        """A decode step for the running batch in the middle of a prefill; its failure fails its requests."""
        try:
            self._step()
        except Exception as e:
            self._fail_active(e)

    def _rebuild(
        self, joined: list[tuple[Sequence, KVCache, int]] = (), replaced: dict[int, KVCache] | None = None
    ) -> None:
        """Drop finished rows and add new ones (`replaced`: active row i's keys and values are now row 0 of
        that cache): the batch cache re-made with every row right-aligned."""
        replaced = replaced or {}
        keep = [
            (s, *((replaced[i], 0) if i in replaced else (self.cache, i))) for i, s in enumerate(self.active)
        ]
        keep = [(s, c, i) for s, c, i in keep if not s.cancelled]
        new = [(s, c, j) for s, c, j in joined if not s.cancelled]
        rows = [(c, i, s.cached) for s, c, i in keep] + [(c, j, s.cached) for s, c, j in new]
        self.active = [s for s, _, _ in keep] + [s for s, _, _ in new]
        if not self.active:
            self.cache, self.mask = None, None
            return
        longest = max(s.cached for s in self.active)
        self.cache = gather(self.model, rows, longest)
        self.mask = torch.zeros(len(self.active), longest, dtype=torch.long, device=self.model.device)
        for i, s in enumerate(self.active):
            self.mask[i, longest - s.cached :] = 1
        # the decode step for this batch (autolm.step: right-aligned rows take the one-token step, compiled
        # where the model's graphs are cached), until rows join or leave
        with adapters_of(self.model, self.active):  # the step's kind is chosen under the rows' adapters
            self.decode = decoder(self.model, self.cache, self.mask, self.active)

    @torch.inference_mode()
    def _step(self) -> None:
        """One decode step for every active row."""
        if any(s.cancelled for s in self.active):
            self._rebuild()
        if not self.active or self._restart_crossing():
            return
        alone = eligible(self, self.speculation)
        if alone is not None:
            with adapters_of(self.model, [alone]):
                if speculative_step(self, alone, self.speculation):
                    return
        dev = self.model.device
        tokens = torch.tensor([[s.last] for s in self.active], device=dev)
        positions = torch.tensor([[s.cached] for s in self.active], device=dev)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
        with adapters_of(self.model, self.active):
            logits = self._decode_logits(tokens, positions)
        greedy = logits.argmax(-1).tolist()
        self.steps += 1
        for i, seq in enumerate(self.active):
            seq.cached += 1
            self.take(seq, logits[i], greedy[i])

    def _restart_crossing(self) -> bool:
        """LongRoPE's switch (autolm.generation.restart): a row whose next step reaches the switch length with
        keys cached before it runs its whole sequence again and takes its token, as generate() does (the other
        rows wait this step). Such a model's rows run apart (serve.rows): each row's tables follow its own length."""
        switch = switch_length(self.model)
        crossing = [
            i for i, s in enumerate(self.active) if switch is not None and s.cached < switch <= s.cached + 1
        ]
        if not crossing:
            return False
        replaced = {}
        for i in crossing:
            s = self.active[i]
            ids = torch.tensor([s.prompt + s.tokens], device=self.model.device)
            replaced[i] = self.model.make_cache(1, ids.shape[1])
            with adapters_of(self.model, [s]):
                logits = recompute(self.model, ids, torch.ones_like(ids), replaced[i])
            s.cached += 1
            self.take(s, logits[0])
        self._rebuild(replaced=replaced)
        return True

    def _decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for the batch: tokens and positions (B, 1) -> logits (B, V)."""
        return self.decode(tokens, self.mask, positions, self.cache)

    def take(
        self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None, forced: int | None = None
    ) -> None:
        """Choose the next token of a row (`forced`: a token speculative decoding chose), emit its text, and
        decide whether the row is finished. A failure here (a broken sampling setting, a grammar error) ends
        this request alone."""
        try:
            self._choose(seq, logits, greedy, forced)
        except Exception as e:
            seq.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            seq.cancelled = True

    def _choose(self, seq: Sequence, logits: torch.Tensor, greedy: int | None, forced: int | None) -> None:
        cfg = seq.config
        if forced is not None:
            token, raw = forced, logits.float()
        elif greedy is not None and not cfg.do_sample and not seq.processors:
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
        seq.pending_ids.append(token)
        if is_eos:
            return self._finish(seq, "stop", stop_reason=token if token in seq.stop_token_ids else None)
        seq.tokens.append(token)
        if seq.detok is None:
            seq.detok = Detokenizer(self.tokenizer, skip_special_tokens=seq.skip_special)
        seq.text += seq.detok.add(token)
        text = seq.text
        hits = [(text.find(s), s) for s in seq.stops if s in text]
        if hits:
            cut, stop = min(hits)
            return self._finish(seq, "stop", text[: cut + (len(stop) if seq.include_stop else 0)], stop)
        if seq.constraint is not None and seq.constraint.finished:
            return self._finish(seq, "stop", text)
        if len(seq.tokens) >= cfg.max_new_tokens:
            return self._finish(seq, "length", text)
        # Hold back an incomplete character, and any tail that could still become a stop string.
        safe = len(text) - (max(map(len, seq.stops)) - 1 if seq.stops else 0)
        if safe > seq.sent or seq.pending:
            seq.emit(Delta(text[seq.sent : max(safe, seq.sent)], *self._flush(seq)))
            seq.sent = max(safe, seq.sent)

    @staticmethod
    def _flush(seq: Sequence) -> tuple[list[int], list[Entry]]:
        """The tokens and logprob entries not yet emitted."""
        out = seq.pending_ids, seq.pending
        seq.pending_ids, seq.pending = [], []
        return out

    def _finish(
        self, seq: Sequence, reason: str, text: str | None = None, stop_reason: str | int | None = None
    ) -> None:
        if text is None:
            text = seq.text
        eos = reason == "stop" and seq.last in seq.config.eos_ids and not seq.ignore_eos
        ids, entries = self._flush(seq)
        seq.emit(
            Finished(
                text[seq.sent :],
                ids,
                entries,
                reason=reason,
                stop_reason=stop_reason,
                prompt_tokens=len(seq.prompt),
                cached_tokens=seq.reused,
                completion_tokens=len(seq.tokens) + eos,
                cumulative_logprob=seq.cumulative,
                full_text=text,
                all_token_ids=seq.tokens + ([seq.last] if eos else []),
            )
        )
        seq.sent = len(text)
        seq.cancelled = True  # marks it done: the next step drops the row
