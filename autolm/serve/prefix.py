"""Prefix caching: the keys and values of prompts already computed, reused by requests that start with the same
tokens (a shared system prompt, the earlier turns of a conversation, several completions of one prompt).

Prompts are cut into blocks of `block` tokens; a block is found by its tokens and the block before it (a hash
chain, as vLLM's automatic prefix caching does), so a new prompt reuses the longest chain of whole blocks it
starts with and the engine computes only the rest. Blocks are kept within a byte budget and the least recently
used go first (a block is used whenever a longer chain through it is, so chains lose their ends first).
Outputs are unchanged: a token's keys and values depend only on the tokens before it.

A model with recurrent layers (linear attention, state-space layers) needs their state where the reuse ends, and
a state holds only the tokens before it: each prompt also leaves a snapshot, its recurrent states after its last
token and its keys and values after its last whole block, and one at the end of each of its prefill chunks (the
engine ends them on block boundaries: `boundary`), as vLLM keeps hybrids' states at block boundaries. A later
prompt starts from the snapshot furthest into it: the whole of an earlier prompt it continues (the next turn of a
conversation), or the last chunk boundary within the blocks it shares with one (a long system prompt).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Block:
    tokens: tuple[int, ...]
    parent: int  # the key of the block before it (the chain's root for the first block)
    keys: tuple[torch.Tensor, ...]  # per layer (n_kv, tokens, hd)
    values: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class _Snapshot(_Block):
    """A prompt's end: the tokens after its whole blocks with their keys and values, and the recurrent layers'
    states after its last token."""

    states: dict[int, tuple[torch.Tensor, ...]] | None = None

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(t.numel() * t.element_size() for s in self.states.values() for t in s)


class PrefixCache:
    """Blocks of prompt keys and values by (the block before, their tokens), and with `recurrent` the prompts'
    snapshots, least recently used evicted past `budget` bytes."""

    def __init__(self, budget: int, block: int = 32, recurrent: bool = False):
        self.budget, self.block, self.recurrent = budget, block, recurrent
        self.blocks: OrderedDict[int, _Block] = OrderedDict()  # oldest use first (snapshots too)
        self.bytes = 0
        self.hits = self.misses = 0  # prompt tokens reused / computed, for the logs and tests

    @staticmethod
    def _root(salt: str | None) -> int:
        """The chain's start; `salt` (a LoRA adapter's name) starts a chain of its own, as the same tokens give
        other keys and values under an adapter."""
        return 0 if salt is None else hash(("adapter", salt))

    def _chain(self, tokens: list[int], limit: int, salt: str | None):
        """(key, parent key, block tokens) of each whole block of tokens[:limit]."""
        parent = self._root(salt)
        for start in range(0, limit - limit % self.block, self.block):
            part = tuple(tokens[start : start + self.block])
            key = hash((parent, part))
            yield key, parent, part
            parent = key

    def lookup(self, tokens: list[int], salt: str | None = None) -> list[_Block]:
        """The cached blocks the prompt starts with, longest chain first to last (with `recurrent`, up to the
        longest earlier prompt it continues, then that prompt's snapshot; none without one); at least its last
        token is left to compute (its logits choose the first new token)."""
        found = []
        for key, parent, part in self._chain(tokens, len(tokens) - 1, salt):
            b = self.blocks.get(key)
            if b is None or b.parent != parent or b.tokens != part:
                break
            found.append(b)
        if self.recurrent:
            found = self._continued(tokens, found, salt)
        for b in found:
            self.blocks.move_to_end(hash((b.parent, b.tokens)) if type(b) is _Block else _key(b))
        return found

    def _continued(self, tokens: list[int], found: list[_Block], salt: str | None) -> list[_Block]:
        """found's first blocks and the snapshot of the longest earlier prompt that `tokens` continues."""
        parents = [self._root(salt)] + [hash((b.parent, b.tokens)) for b in found]
        best = None
        for snap in (b for b in self.blocks.values() if type(b) is _Snapshot):
            k = parents.index(snap.parent) if snap.parent in parents else -1
            end = k * self.block + len(snap.tokens)
            fits = k >= 0 and end < len(tokens) and tuple(tokens[k * self.block : end]) == snap.tokens
            if fits and (best is None or end > best[0]):
                best = (end, k, snap)
        return [] if best is None else [*found[: best[1]], best[2]]

    def fill(self, cache, row: int, blocks: list[_Block]) -> int:
        """Copy the blocks (and a snapshot's states) into the first slots of a cache row; returns the number of
        tokens."""
        n = 0
        for b in blocks:
            width = len(b.tokens)
            for layer in range(len(cache.keys)):
                cache.keys[layer][row, :, n : n + width] = b.keys[layer]
                cache.values[layer][row, :, n : n + width] = b.values[layer]
            n += width
            for layer, state in (b.states or {}).items() if type(b) is _Snapshot else ():
                if layer not in cache.states:
                    cache.states[layer] = tuple(t.new_zeros(cache.batch_size, *t.shape) for t in state)
                for into, t in zip(cache.states[layer], state):
                    into[row] = t
        return n

    def store(self, tokens: list[int], cache, row: int, first: int, salt: str | None = None) -> None:
        """Keep the whole blocks of a prompt whose keys and values sit in a cache row from slot `first` on (with
        `recurrent`, its snapshot too: the cache holds the states after its last token)."""
        if self.budget <= 0:
            return
        last = self._root(salt)  # the key of the prompt's last whole block
        for i, (key, parent, part) in enumerate(self._chain(tokens, len(tokens), salt)):
            last = key
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            self._add(key, _Block(part, parent, *_slots(cache, row, first + i * self.block, self.block)))
        if self.recurrent and cache.states:
            whole = len(tokens) - len(tokens) % self.block
            states = {layer: tuple(t[row].clone() for t in s) for layer, s in cache.states.items()}
            tail = _slots(cache, row, first + whole, len(tokens) - whole)
            snap = _Snapshot(tuple(tokens[whole:]), last, *tail, states=states)
            self._add(_key(snap), snap)
        while self.bytes > self.budget and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.nbytes

    def boundary(self, tokens: list[int], cache, row: int, n: int, salt: str | None = None) -> None:
        """With `recurrent`: a snapshot of a cache row's states after the first n tokens of a prompt being
        prefilled, where n ends a whole block before its last token (a chunk's end); its blocks are kept by
        `store` once the prompt is whole."""
        if not (
            self.recurrent
            and cache.states
            and self.budget > 0
            and 0 < n < len(tokens)
            and n % self.block == 0
        ):
            return
        *_, (last, _, _) = self._chain(tokens, n, salt)
        states = {layer: tuple(t[row].clone() for t in s) for layer, s in cache.states.items()}
        snap = _Snapshot((), last, *_slots(cache, row, 0, 0), states=states)
        self._add(_key(snap), snap)

    def _add(self, key: int, b: _Block) -> None:
        old = self.blocks.pop(key, None)
        self.bytes += b.nbytes - (old.nbytes if old is not None else 0)
        self.blocks[key] = b


def _key(snap: _Snapshot) -> int:
    return hash(("state", snap.parent, snap.tokens))


def _slots(cache, row: int, at: int, width: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Each layer's keys and values of a cache row's slots at..at+width (copies)."""
    span = slice(at, at + width)
    return tuple(k[row, :, span].clone() for k in cache.keys), tuple(
        v[row, :, span].clone() for v in cache.values
    )
