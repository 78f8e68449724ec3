"""Redis, and only Redis: the key layout and scripts, the user store, the state
cache, the feedback log export and the embedded Redis server.

Nothing outside this package imports redis; what a failed call means is
decided in :mod:`recsvc.store.errors`.
"""

from recsvc.store.connect import connect_sync, tool_client
from recsvc.store.embedded import EmbeddedRedis, die_with_parent, free_port, redis_server_binary
from recsvc.store.errors import StoreError, StoreFull, StoreRequestError, StoreUnavailable
from recsvc.store.export import EXPORT_COLUMNS, TRAINER_GROUP, export_feedback
from recsvc.store.layout import (
    PREFIX,
    SHARDS,
    feedback_stream,
    feedback_streams,
    shard_of,
    user_keys,
)
from recsvc.store.migrate import migrate_v1
from recsvc.store.users import ApplyResult, CachedVector, StoredEvent, StoredState, UserStore

__all__ = [
    "EXPORT_COLUMNS", "PREFIX", "SHARDS", "TRAINER_GROUP", "ApplyResult",
    "CachedVector", "EmbeddedRedis", "StoreError", "StoreFull", "StoreRequestError",
    "StoreUnavailable", "StoredEvent", "StoredState", "UserStore", "die_with_parent",
    "connect_sync", "export_feedback", "feedback_stream", "feedback_streams", "free_port",
    "migrate_v1", "redis_server_binary", "shard_of", "tool_client", "user_keys",
]  # fmt: skip
