"""The cache's recurrent states (autolm/nn/cache.py), which hybrid families' linear-attention, state-space and
short-convolution layers keep beside the attention layers' keys and values: they follow beam search's rows and
the server's batches, and the cache refuses to go back to an earlier token."""

from __future__ import annotations

import pytest
import torch

from autolm.errors import GenerationError
from autolm.nn import KVCache


def _cache(rows: int, length: int, seed: int) -> KVCache:
    """Two layers: attention (2 KV heads of 4) and a recurrent one (zero-wide buffers, a state of two tensors)."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(capacity=16)
    for n_kv, hd in ((2, 4), (1, 0)):
        cache.keys.append(torch.randn(rows, n_kv, 16, hd, generator=g))
        cache.values.append(torch.randn(rows, n_kv, 16, hd, generator=g))
    cache.set_state(1, (torch.randn(rows, 3, generator=g), torch.randn(rows, 2, 2, generator=g)))
    cache.length = length
    return cache


def test_a_state_cannot_go_back_but_can_start_over():
    cache = _cache(2, 10, 0)
    cache.length = 12  # forward: allowed
    with pytest.raises(GenerationError, match="recurrent layers' states after 12 tokens"):
        cache.length = 11
    with pytest.raises(GenerationError, match="recurrent"):
        cache.crop(-1)
    assert cache.length == 12 and cache.state(1) is not None
    cache.length = 0  # a restart from the first token: every state dropped
    assert cache.state(1) is None and cache.states == {}


def test_a_cache_without_states_still_goes_back():
    cache = _cache(1, 10, 0)
    cache.states = {}
    cache.crop(4)
    assert cache.length == 4


def test_beam_reorder_moves_the_states_with_their_rows():
    cache = _cache(3, 5, 1)
    conv, ssm = (t.clone() for t in cache.state(1))
    keys = cache.keys[0].clone()
    index = torch.tensor([2, 2, 0])
    cache.reorder(index)
    assert torch.equal(cache.keys[0], keys[index])
    assert torch.equal(cache.state(1)[0], conv[index]) and torch.equal(cache.state(1)[1], ssm[index])


def test_gathered_rows_keep_their_states_and_a_row_without_one_starts_from_zeros():
    a, b = _cache(2, 6, 2), _cache(1, 3, 3)
    fresh = KVCache(capacity=16)  # a row whose cache has no state yet
    fresh.keys, fresh.values = [k[:1].clone() for k in a.keys], [v[:1].clone() for v in a.values]
    fresh.length = 2
    new = KVCache.gather([(a, 1, 6), (b, 0, 3), (fresh, 0, 2)], capacity=8)
    assert new.length == 6 and new.keys[1].shape == (3, 1, 8, 0)
    assert torch.equal(new.keys[0][1, :, 3:6], b.keys[0][0, :, :3])  # right-aligned to the longest row
    assert torch.equal(new.state(1)[0][0], a.state(1)[0][1])
    assert torch.equal(new.state(1)[1][1], b.state(1)[1][0])
    assert not new.state(1)[0][2].any() and not new.state(1)[1][2].any()
