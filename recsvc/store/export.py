"""Reading the feedback log for training: ``recsvc export-feedback``."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import redis

from recsvc.store.layout import feedback_streams

TRAINER_GROUP = "trainer"
EXPORT_COLUMNS = [
    "user_id", "item_id", "event_type", "value", "timestamp", "event_id", "recommendation_id",
]  # fmt: skip


def _next_stream_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def export_feedback(
    client: redis.Redis | redis.RedisCluster,
    out: Path,
    consumer: str = "export",
    batch: int = 10_000,
    trim: bool = True,
) -> tuple[int, str | None]:
    """Write the feedback log not yet exported to ``out`` (CSV ``recsvc train`` reads).

    Reads every shard's stream (those that exist) through its consumer group
    ``trainer``: entries left pending by an export that crashed (ours or
    another consumer's, via XAUTOCLAIM) come first, then new ones. The file is
    fsynced and renamed into place before any entry is acknowledged, so an
    entry is never acknowledged without being on disk; a crash in between
    exports it again, and training counts a repeated ``event_id`` once. With
    ``trim``, each shard's acknowledged entries are then removed from its stream
    (its retention). Returns (rows written, the newest entry id written).
    """
    streams = feedback_streams()
    with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.exists(stream)
        streams = [s for s, exists in zip(streams, pipe.execute(), strict=True) if exists]
    for stream in streams:
        try:
            client.xgroup_create(stream, TRAINER_GROUP, id="0")
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    tmp = out.with_name(out.name + ".tmp")
    entry_ids: dict[str, list[bytes]] = {}
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(EXPORT_COLUMNS)
        for stream in streams:
            ids = entry_ids[stream] = []
            for entry_id, fields in _unexported_entries(client, stream, consumer, batch):
                ids.append(entry_id)
                writer.writerow(
                    [fields.get(k.encode(), b"").decode() for k in
                     ("user_id", "item_id", "type", "value", "ts_ms", "event_id",
                      "recommendation_id")]
                )  # fmt: skip
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    newest: str | None = None
    rows = 0
    for stream, ids in entry_ids.items():
        if not ids:
            continue
        rows += len(ids)
        for start in range(0, len(ids), batch):
            client.xack(stream, TRAINER_GROUP, *ids[start : start + batch])
        last = max(ids, key=_entry_order).decode()
        if newest is None or _entry_order(last.encode()) > _entry_order(newest.encode()):
            newest = last
        if trim and client.xpending(stream, TRAINER_GROUP)["pending"] == 0:
            client.xtrim(stream, minid=_next_stream_id(last), approximate=False)
    return rows, newest


def _entry_order(entry_id: bytes) -> tuple[int, ...]:
    return tuple(map(int, entry_id.split(b"-")))


def _unexported_entries(client, stream: str, consumer: str, batch: int):  # type: ignore[no-untyped-def]
    cursor: str | bytes = "0-0"
    while True:  # claim what other consumers left pending; read below as our own
        # (not JUSTID: redis-py then drops the cursor from the reply)
        cursor, *_ = client.xautoclaim(
            stream, TRAINER_GROUP, consumer, min_idle_time=0, start_id=cursor, count=batch
        )
        if cursor in (b"0-0", "0-0"):
            break
    for start in ("0", ">"):  # our own pending entries, then new ones
        cursor = start
        while True:
            reply = client.xreadgroup(
                TRAINER_GROUP, consumer, {stream: cursor}, count=batch
            )
            entries = [e for e in (reply[0][1] if reply else []) if e[1]]
            if not entries:
                break
            yield from entries
            if start == "0":
                cursor = entries[-1][0]
