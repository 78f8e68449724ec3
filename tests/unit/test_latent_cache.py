"""The per-process latent cache: exact keys, least-recently-used eviction."""

import numpy as np

from recsvc.state.latents import LatentCache


def test_keys_are_exact_and_the_least_recently_used_goes_first():
    cache = LatentCache(2)
    a, b, c = (np.full(3, v, np.float32) for v in (1, 2, 3))
    cache.put("u1", "gen-1", 0, a)
    cache.put("u2", "gen-1", 0, b)
    assert cache.get("u1", "gen-1", 1) is None  # a new event: another key
    assert cache.get("u1", "gen-2", 0) is None  # another generator: another key
    assert cache.get("u1", "gen-1", 0) is a  # u1 is now the most recently used
    cache.put("u3", "gen-1", 0, c)
    assert cache.get("u2", "gen-1", 0) is None and cache.get("u1", "gen-1", 0) is a
    assert len(cache) == 2


def test_capacity_zero_is_off():
    cache = LatentCache(0)
    cache.put("u1", "gen-1", 0, np.zeros(3, np.float32))
    assert cache.get("u1", "gen-1", 0) is None and len(cache) == 0
