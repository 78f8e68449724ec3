"""A per-process cache of users' generator latents, keyed by what they depend on.

A latent depends on the generator version and the user's history, and the history
changes only with an event: ``(user, generator version, event count)`` names it
exactly, so an entry is never stale, only unused. Keeping latents here rather than
writing them to Redis on a read matters with several workers: every Redis write
of a user's state invalidates that user in the other workers' state caches
(Redis client tracking), so a read path that wrote would keep them cold.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

Key = tuple[str, str, int]


class LatentCache:
    """Least-recently-used latents, at most ``capacity`` of them (0: off)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[Key, np.ndarray] = OrderedDict()

    def get(self, user_id: str, version: str, events: int) -> np.ndarray | None:
        latent = self._entries.get((user_id, version, events))
        if latent is not None:
            self._entries.move_to_end((user_id, version, events))
        return latent

    def put(self, user_id: str, version: str, events: int, latent: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        self._entries[(user_id, version, events)] = latent
        self._entries.move_to_end((user_id, version, events))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
