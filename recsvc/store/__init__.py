"""Redis, and only Redis: the key layout and scripts, the user store, the state
cache, the feedback log export and the embedded Redis server.

Nothing outside this package imports redis; what a failed call means is
decided in :mod:`recsvc.store.errors`.
"""

from recsvc.store.embedded import EmbeddedRedis, die_with_parent, free_port, redis_server_binary
from recsvc.store.errors import StoreError, StoreFull, StoreRequestError, StoreUnavailable
from recsvc.store.export import EXPORT_COLUMNS, TRAINER_GROUP, export_feedback
from recsvc.store.layout import FEEDBACK_STREAM, PREFIX, USER_PREFIX, user_keys
from recsvc.store.users import ApplyResult, CachedVector, StoredEvent, StoredState, UserStore

__all__ = [
    "EXPORT_COLUMNS", "FEEDBACK_STREAM", "PREFIX", "TRAINER_GROUP", "USER_PREFIX", "ApplyResult",
    "CachedVector", "EmbeddedRedis", "StoreError", "StoreFull", "StoreRequestError",
    "StoreUnavailable", "StoredEvent", "StoredState", "UserStore", "die_with_parent",
    "export_feedback", "free_port", "redis_server_binary", "user_keys",
]  # fmt: skip
