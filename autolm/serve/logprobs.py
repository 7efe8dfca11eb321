"""Log-probabilities in the shapes clients read: chat's `logprobs.content` (with each token's real bytes),
completions' four parallel lists (the sampled token first in each `top_logprobs` map, as vLLM), and vLLM's
`prompt_logprobs`. Entries come from the engine (events.Entry)."""

from __future__ import annotations

import functools
import json

from .events import Entry
from .responses import (
    ChatLogprobContent,
    ChatLogprobs,
    CompletionLogprobs,
    LogprobToken,
    PromptLogprob,
    PromptLogprobsList,
)

FLOOR = -9999.0  # what OpenAI and vLLM send for -inf, which JSON cannot carry


def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE writes each byte as one printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Logprobs:
    """Formats entries for one tokenizer; `as_ids` writes tokens as "token_id:N" (vLLM's
    return_tokens_as_token_ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = json.dumps(decoder)
        self.kind = (
            "bytelevel" if '"ByteLevel"' in kinds else "bytefallback" if '"ByteFallback"' in kinds else ""
        )
        self.table = _unicode_to_byte()
        self.added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}

    @functools.lru_cache(maxsize=65536)  # noqa: B019  (one Logprobs per server)
    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def token_bytes(self, token: int) -> list[int]:
        """The token's own bytes, also when it holds only part of a character (where its text is "\ufffd")."""
        raw = self.tokenizer.backend.id_to_token(token)
        if raw is None or token in self.added:
            return list(self.piece(token).encode("utf-8"))
        if self.kind == "bytelevel" and all(c in self.table for c in raw):
            return [self.table[c] for c in raw]
        if self.kind == "bytefallback" and len(raw) == 6 and raw.startswith("<0x") and raw.endswith(">"):
            return [int(raw[3:5], 16)]
        if self.kind == "bytefallback":
            return list(raw.replace("\u2581", " ").encode("utf-8"))
        return list(self.piece(token).encode("utf-8"))

    def name(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.piece(token)

    def chat(self, entries: list[Entry], as_ids: bool = False) -> ChatLogprobs:
        def item(token: int, lp: float, cls=LogprobToken, **more):
            return cls(
                token=self.name(token, as_ids), logprob=max(lp, FLOOR), bytes=self.token_bytes(token), **more
            )

        content = [
            item(t, lp, ChatLogprobContent, top_logprobs=[item(a, alp) for a, alp in alts])
            for t, lp, _, alts in entries
        ]
        return ChatLogprobs(content=content)

    def completion(
        self, entries: list[Entry | None], tokens: list[int], offset: int = 0, as_ids: bool = False
    ):
        """OpenAI's completions format for `tokens` (entries None: a prompt token without a logprob)."""
        out = CompletionLogprobs()
        for token, e in zip(tokens, entries):
            text = self.name(token, as_ids)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            _, lp, _, alts = e
            out.token_logprobs.append(max(lp, FLOOR))
            top = {text: max(lp, FLOOR)}  # the sampled token first, then the alternatives
            for a, alp in alts:
                top.setdefault(self.name(a, as_ids), max(alp, FLOOR))
            out.top_logprobs.append(top)
        return out

    def prompt(self, entries: list[Entry | None]) -> PromptLogprobsList:
        """vLLM's prompt_logprobs: {token id: {logprob, rank, decoded_token}} per prompt token."""
        out: PromptLogprobsList = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            token, lp, rank, alts = e
            d = {
                str(token): PromptLogprob(logprob=max(lp, FLOOR), rank=rank, decoded_token=self.piece(token))
            }
            for r, (a, alp) in enumerate(alts, 1):
                d.setdefault(
                    str(a), PromptLogprob(logprob=max(alp, FLOOR), rank=r, decoded_token=self.piece(a))
                )
            out.append(d)
        return out
