"""Reading the feedback log for training: ``recsvc export-feedback``."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import redis

from recsvc.store.layout import FEEDBACK_STREAM

TRAINER_GROUP = "trainer"
EXPORT_COLUMNS = [
    "user_id", "item_id", "event_type", "value", "timestamp", "event_id", "recommendation_id",
]  # fmt: skip


def _next_stream_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def export_feedback(
    client: redis.Redis,
    out: Path,
    consumer: str = "export",
    batch: int = 10_000,
    trim: bool = True,
) -> tuple[int, str | None]:
    """Write the feedback log not yet exported to ``out`` (CSV ``recsvc train`` reads).

    Reads through the consumer group ``trainer``: entries left pending by an
    export that crashed (ours or another consumer's, via XAUTOCLAIM) come
    first, then new ones. The file is fsynced and renamed into place before the
    entries are acknowledged, so an entry is never acknowledged without being on
    disk; a crash in between exports it again, and training counts a repeated
    ``event_id`` once. With ``trim``, acknowledged entries are then removed
    from the stream (its retention). Returns (rows written, last entry id).
    """
    try:
        client.xgroup_create(FEEDBACK_STREAM, TRAINER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    tmp = out.with_name(out.name + ".tmp")
    entry_ids: list[bytes] = []
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(EXPORT_COLUMNS)
        for entry_id, fields in _unexported_entries(client, consumer, batch):
            entry_ids.append(entry_id)
            writer.writerow(
                [fields.get(k.encode(), b"").decode() for k in
                 ("user_id", "item_id", "type", "value", "ts_ms", "event_id", "recommendation_id")]
            )  # fmt: skip
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    for start in range(0, len(entry_ids), batch):
        client.xack(FEEDBACK_STREAM, TRAINER_GROUP, *entry_ids[start : start + batch])
    last = (
        max(entry_ids, key=lambda e: tuple(map(int, e.split(b"-")))).decode() if entry_ids else None
    )
    if (
        trim
        and last is not None
        and client.xpending(FEEDBACK_STREAM, TRAINER_GROUP)["pending"] == 0
    ):
        client.xtrim(FEEDBACK_STREAM, minid=_next_stream_id(last), approximate=False)
    return len(entry_ids), last


def _unexported_entries(client: redis.Redis, consumer: str, batch: int):  # type: ignore[no-untyped-def]
    cursor: str | bytes = "0-0"
    while True:  # claim what other consumers left pending; read below as our own
        # (not JUSTID: redis-py then drops the cursor from the reply)
        cursor, *_ = client.xautoclaim(
            FEEDBACK_STREAM, TRAINER_GROUP, consumer, min_idle_time=0, start_id=cursor, count=batch
        )
        if cursor in (b"0-0", "0-0"):
            break
    for start in ("0", ">"):  # our own pending entries, then new ones
        cursor = start
        while True:
            reply = client.xreadgroup(
                TRAINER_GROUP, consumer, {FEEDBACK_STREAM: cursor}, count=batch
            )
            entries = [e for e in (reply[0][1] if reply else []) if e[1]]
            if not entries:
                break
            yield from entries
            if start == "0":
                cursor = entries[-1][0]
