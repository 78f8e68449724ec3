"""The impression log: what each Recommend/Generate response showed (#13).

Recording is a list append on the reply's path; a background task writes what
has gathered every ``impression_flush_s`` in one pipelined round trip (see
:class:`recsvc.store.impressions.ImpressionWriter`). A full queue drops new
impressions and counts them, so a slow or absent Redis never slows a reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from recsvc.store import StoreError
from recsvc.store.impressions import ImpressionWriter

log = logging.getLogger(__name__)

KIND_RECOMMEND = "recommend"
KIND_GENERATE = "generate"


@dataclass(frozen=True, slots=True)
class Impression:
    """One list shown to a user; ``items[p]`` was shown at position ``p`` (0-based)."""

    recommendation_id: str
    user_id: str
    variant: str
    strategy: str
    model_version: str
    kind: str
    items: Sequence[str]
    ts_ms: int
    teams: Sequence[str] = ()  # per position, for an interleaved list

    def to_json(self) -> str:
        """The stream entry (``recsvc.store.layout.IMPRESSION_FIELD``)."""
        return json.dumps(
            [self.recommendation_id, self.user_id, self.variant, self.strategy,
             self.model_version, self.kind, list(self.items), list(self.teams), self.ts_ms],
            separators=(",", ":"),
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Impression:
        rid, user, variant, strategy, model, kind, items, teams, ts_ms = json.loads(text)
        return cls(rid, user, variant, strategy, model, kind, items, int(ts_ms), teams)


def sampled(recommendation_id: str, rate: float) -> bool:
    """Is this list logged at sampling ``rate``? Decided by the id alone, so any
    reader knowing the rate can tell an unsampled list from a missing one."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    try:
        bucket = int(recommendation_id[:8], 16)
    except ValueError:  # not a server-made hex id
        bucket = zlib.crc32(recommendation_id.encode())
    return bucket < rate * 2**32


class ImpressionLog:
    """Gathers impressions in memory and writes them in the background."""

    def __init__(
        self,
        writer: ImpressionWriter,
        sample_rate: float = 1.0,
        queue_cap: int = 20_000,
        flush_s: float = 0.25,
        batch: int = 1000,
    ):
        self.writer = writer
        self.sample_rate = sample_rate
        self.queue_cap = queue_cap
        self.flush_s = flush_s
        self.batch = batch
        self._pending: list[Impression] = []
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        # counters, read by the metrics collector
        self.recorded: Counter[str] = Counter()  # by variant
        self.written = 0
        self.dropped = 0
        self.write_errors = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def record(self, impression: Impression) -> bool:
        """Queue ``impression`` if sampled and there is room; never waits."""
        if not sampled(impression.recommendation_id, self.sample_rate):
            return False
        if len(self._pending) >= self.queue_cap:
            self.dropped += 1
            return False
        self._pending.append(impression)
        self.recorded[impression.variant] += 1
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> bool:
        """Write everything queued; False (entries kept for the next try) if Redis failed."""
        while self._pending:
            batch = self._pending[: self.batch]
            try:
                await self.writer.append([i.to_json() for i in batch], int(time.time() * 1000))
            except StoreError as exc:
                self.write_errors += 1
                if not self._failing:
                    log.warning("impressions not written yet (%d queued): %s", self.pending, exc)
                self._failing = True
                return False
            del self._pending[: len(batch)]
            self.written += len(batch)
            if self._failing:
                log.info("impressions are written again")
                self._failing = False
        return True

    async def close(self) -> None:
        """Stop the background task and write what is left (one try)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if not await self.flush():
            log.warning("%d impressions lost at shutdown: Redis did not take them", self.pending)
