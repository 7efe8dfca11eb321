"""Prefix caching: the keys and values of prompts already computed, reused by requests that start with the same
tokens (a shared system prompt, the earlier turns of a conversation, several completions of one prompt).

Prompts are cut into blocks of `block` tokens; a block is found by its tokens and the block before it (a hash
chain, as vLLM's automatic prefix caching does), so a new prompt reuses the longest chain of whole blocks it
starts with and the engine computes only the rest. Blocks are kept within a byte budget and the least recently
used go first (a block is used whenever a longer chain through it is, so chains lose their ends first).
Outputs are unchanged: a token's keys and values depend only on the tokens before it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Block:
    tokens: tuple[int, ...]
    parent: int  # the key of the block before it (0: the first block)
    keys: torch.Tensor  # (layers, n_kv, block, hd)
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class PrefixCache:
    """Blocks of prompt keys and values by (the block before, their tokens), least recently used evicted past
    `budget` bytes."""

    def __init__(self, budget: int, block: int = 32):
        self.budget, self.block = budget, block
        self.blocks: OrderedDict[int, _Block] = OrderedDict()  # oldest use first
        self.bytes = 0
        self.hits = self.misses = 0  # prompt tokens reused / computed, for the logs and tests

    def _chain(self, tokens: list[int], limit: int, salt: str | None):
        """(key, parent key, block tokens) of each whole block of tokens[:limit]; `salt` (a LoRA adapter's
        name) starts a chain of its own, as the same tokens give other keys and values under an adapter."""
        parent = 0 if salt is None else hash(("adapter", salt))
        for start in range(0, limit - limit % self.block, self.block):
            part = tuple(tokens[start : start + self.block])
            key = hash((parent, part))
            yield key, parent, part
            parent = key

    def lookup(self, tokens: list[int], salt: str | None = None) -> list[_Block]:
        """The cached blocks the prompt starts with, longest chain first to last; at least its last token is
        left to compute (its logits choose the first new token)."""
        found = []
        for key, parent, part in self._chain(tokens, len(tokens) - 1, salt):
            b = self.blocks.get(key)
            if b is None or b.parent != parent or b.tokens != part:
                break
            self.blocks.move_to_end(key)
            found.append(b)
        return found

    def fill(self, cache, row: int, blocks: list[_Block]) -> int:
        """Copy the blocks into the first slots of a cache row; returns the number of tokens."""
        n = 0
        for b in blocks:
            for layer in range(len(cache.keys)):
                cache.keys[layer][row, :, n : n + self.block] = b.keys[layer]
                cache.values[layer][row, :, n : n + self.block] = b.values[layer]
            n += self.block
        return n

    def store(self, tokens: list[int], cache, row: int, first: int, salt: str | None = None) -> None:
        """Keep the whole blocks of a prompt whose keys and values sit in a cache row from slot `first` on."""
        if self.budget <= 0 or len({k.device for k in cache.keys}) > 1:  # blocks are stacked over layers
            return
        for i, (key, parent, part) in enumerate(self._chain(tokens, len(tokens), salt)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            at = slice(first + i * self.block, first + (i + 1) * self.block)
            keys = torch.stack([k[row, :, at] for k in cache.keys])
            values = torch.stack([v[row, :, at] for v in cache.values])
            b = self.blocks[key] = _Block(part, parent, keys, values)
            self.bytes += b.nbytes
        while self.bytes > self.budget and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.nbytes
