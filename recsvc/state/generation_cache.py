"""A per-process cache of what Generate derives from a user's state alone.

:class:`recsvc.generate.UserState` (the decoder's item logits, the content
profile, its combinations) changes only when the user's state does, so it is
kept per (model version, user, event count): a new event makes the entry
stale, and the engine recomputes it after the feedback's ack, off the request
path, for users that have one. Bounded in bytes, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recsvc.generate import UserState

Key = tuple[str, str, int]  # model version, user id, the user's event count


class UserStateCache:
    """LRU of :class:`~recsvc.generate.UserState`, one entry per (model, user)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[int, UserState]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def has_user(self, model_version: str, user_id: str) -> bool:
        return (model_version, user_id) in self._entries

    def get(self, key: Key) -> UserState | None:
        """The state for exactly this event count, or None."""
        version, user, events = key
        entry = self._entries.get((version, user))
        if entry is None or entry[0] != events:
            return None
        self._entries.move_to_end((version, user))
        return entry[1]

    def put(self, key: Key, state: UserState) -> None:
        version, user, events = key
        size = state.nbytes
        if size > self.max_bytes:
            return
        old = self._entries.pop((version, user), None)
        if old is not None:
            self._bytes -= old[1].nbytes
        self._entries[(version, user)] = (events, state)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
