"""Format v1 -> v2: ``recsvc migrate`` moves a deployment's state to the v2 keys.

Format v1 (``recsvc:v1:``) kept per-user keys without hash tags and one
feedback stream. Migration moves every v1 user key to its v2 name (DUMP and
RESTORE, keeping its TTL, then DEL), and copies the feedback log entries the
``trainer`` group has not yet consumed (new and pending ones) into their
users' v2 shard streams before deleting the v1 stream; (#13) the impression
log moves whole. It is safe to run while servers of format v2 take traffic
and to run again after a crash:

* a user who already has a v2 key of that kind (they sent feedback to a v2
  server first) keeps it; their v1 key of that kind is dropped, not merged;
* a crash after copying stream entries and before deleting the v1 stream
  copies them again on the next run: the log is at-least-once, as exports
  are, and training counts a repeated ``event_id`` once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from recsvc.store.export import TRAINER_GROUP
from recsvc.store.layout import (
    IMPRESSION_STREAM,
    USER_KINDS,
    V1_FEEDBACK_STREAM,
    V1_IMPRESSION_STREAM,
    V1_PREFIX,
    feedback_stream,
    shard_of,
    user_keys,
)


@dataclass
class MigrationReport:
    keys_moved: int = 0
    keys_kept: int = 0  # v2 already had the key: the v1 copy was dropped
    entries_copied: int = 0
    entries_skipped: int = 0  # already consumed by the trainer group
    impressions_moved: bool = False  # (#13's log) renamed to its v2 key whole

    def as_dict(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


def _v1_user_keys(client: Any, batch: int) -> Iterator[bytes]:
    pattern = f"{V1_PREFIX}user:*"
    yield from client.scan_iter(match=pattern, count=batch)


def _v2_key(v1_key: bytes) -> str | None:
    """The v2 name of a v1 per-user key (None if it is not one)."""
    text = v1_key.decode()
    rest = text[len(V1_PREFIX + "user:") :]
    user_id, _, kind = rest.rpartition(":")
    if kind not in USER_KINDS or not user_id:
        return None
    return user_keys(user_id)[USER_KINDS.index(kind)]


def migrate_v1(client: redis.Redis | redis.RedisCluster, batch: int = 1000) -> MigrationReport:
    """Move format v1 data to format v2 (see the module docstring)."""
    report = MigrationReport()
    page: list[tuple[bytes, str]] = []
    for key in _v1_user_keys(client, batch):  # SCAN: keys moved meanwhile are not revisited
        target = _v2_key(key)
        if target is not None:
            page.append((key, target))
        if len(page) >= batch:
            _move_keys(client, page, report)
            page = []
    _move_keys(client, page, report)
    _migrate_log(client, batch, report)
    _migrate_impressions(client, report)
    return report


def _migrate_impressions(client: Any, report: MigrationReport) -> None:
    """The impression log moves whole (DUMP/RESTORE keeps its entry ids, which
    its readers select by time). If a v2 server has started a v2 log already,
    the v1 one is left in place: its older ids cannot go before the v2 log's."""
    dumped = client.dump(V1_IMPRESSION_STREAM)
    if dumped is None:
        return
    try:
        client.restore(IMPRESSION_STREAM, max(int(client.pttl(V1_IMPRESSION_STREAM)), 0), dumped)
    except redis.ResponseError as exc:
        if "BUSYKEY" not in str(exc):
            raise
        return
    client.delete(V1_IMPRESSION_STREAM)
    report.impressions_moved = True


def _move_keys(client: Any, page: list[tuple[bytes, str]], report: MigrationReport) -> None:
    """DUMP, PTTL, RESTORE and DEL a page of keys: two pipelined round trips."""
    if not page:
        return
    with client.pipeline(transaction=False) as pipe:
        for key, _ in page:
            pipe.dump(key)
            pipe.pttl(key)
        replies = pipe.execute()
    restores = []  # positions of the RESTOREs among the replies
    with client.pipeline(transaction=False) as pipe:
        for (key, target), dumped, ttl in zip(page, replies[0::2], replies[1::2], strict=True):
            if dumped is not None:  # gone meanwhile (expired): nothing to move
                restores.append(len(pipe))
                pipe.restore(target, max(int(ttl), 0), dumped)
            pipe.delete(key)
        results = pipe.execute(raise_on_error=False)
    for position in restores:
        result = results[position]
        if isinstance(result, redis.ResponseError):
            if "BUSYKEY" not in str(result):
                raise result
            report.keys_kept += 1  # the user has v2 state of this kind already
        elif isinstance(result, Exception):
            raise result
        else:
            report.keys_moved += 1


def _migrate_log(client: Any, batch: int, report: MigrationReport) -> None:
    if not client.exists(V1_FEEDBACK_STREAM):
        return
    consumed_up_to = (0, 0)
    pending: set[bytes] = set()
    for group in client.xinfo_groups(V1_FEEDBACK_STREAM):
        name = group.get("name", group.get(b"name"))
        if name in (TRAINER_GROUP, TRAINER_GROUP.encode()):
            last = group.get("last-delivered-id", group.get(b"last-delivered-id"))
            consumed_up_to = _order(last)
            for entry in client.xpending_range(
                V1_FEEDBACK_STREAM, TRAINER_GROUP, "-", "+", count=10**9
            ):
                pending.add(entry["message_id"])
    cursor = "-"
    while True:
        entries = client.xrange(V1_FEEDBACK_STREAM, min=cursor, count=batch)
        if cursor != "-":
            entries = entries[1:]  # the first is the previous page's last
        if not entries:
            break
        with client.pipeline(transaction=False) as pipe:
            for entry_id, fields in entries:
                if _order(entry_id) <= consumed_up_to and entry_id not in pending:
                    report.entries_skipped += 1
                    continue
                user_id = fields.get(b"user_id", b"").decode()
                pipe.xadd(feedback_stream(shard_of(user_id)), fields)
                report.entries_copied += 1
            pipe.execute()
        cursor = entries[-1][0]
    client.delete(V1_FEEDBACK_STREAM)


def _order(entry_id: Any) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
