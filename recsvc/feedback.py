"""Accepting feedback events: validation, weights, and writing them durably.

An event is acknowledged only after :meth:`UserStore.apply_events` returned,
i.e. once it is in the Redis feedback stream and applied to the user's state
(both by one atomic script). Resending an event id changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from recsvc.config import Settings
from recsvc.data import event_weight
from recsvc.store import StoredEvent


@dataclass(frozen=True)
class FeedbackEvent:
    """One event as received (no gRPC types). ``event_type`` is the lower-case
    type name, or ``None`` when the client sent a type this server does not know."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str | None
    type_code: int = 0
    value: float = 0.0
    timestamp_ms: int = 0  # 0: unset
    recommendation_id: str = ""


def event_problems(event: FeedbackEvent, settings: Settings) -> list[str]:
    """Why the event cannot be accepted; empty when it is valid."""
    problems = []
    for name in ("event_id", "user_id", "item_id"):
        value = getattr(event, name)
        if not value:
            problems.append(f"{name} is empty")
        elif len(value) > settings.max_id_length:
            problems.append(f"{name} is longer than {settings.max_id_length} characters")
    if event.type_code == 0:
        problems.append("type is unset (EVENT_TYPE_UNSPECIFIED)")
    elif event.event_type is None or event.event_type not in settings.event_weights:
        known = ", ".join(t.upper() for t in settings.event_weights)
        problems.append(f"unknown event type {event.type_code}; known: {known}")
    elif event.event_type == "rating" and event.value == 0:
        problems.append("RATING events need the rating in value")
    if event.timestamp_ms < 0:
        problems.append("timestamp is before 1970")
    if len(event.recommendation_id) > settings.max_id_length:
        problems.append(f"recommendation_id is longer than {settings.max_id_length} characters")
    return problems


def to_stored(event: FeedbackEvent, settings: Settings, now_ms: int | None = None) -> StoredEvent:
    """The event with its weight and time resolved; call only on a valid event."""
    assert event.event_type is not None
    return StoredEvent(
        event_id=event.event_id,
        user_id=event.user_id,
        item_id=event.item_id,
        event_type=event.event_type,
        value=event.value,
        weight=event_weight(
            event.event_type, event.value, settings.event_weights, settings.rating_midpoint
        ),
        event_ms=event.timestamp_ms or (now_ms if now_ms is not None else int(time.time() * 1000)),
        recommendation_id=event.recommendation_id,
    )


def describe_problems(events: Sequence[FeedbackEvent], settings: Settings) -> list[str]:
    """One line per invalid event of a batch: ``event 3 (id 'x'): problem; problem``."""
    lines = []
    for index, event in enumerate(events):
        problems = event_problems(event, settings)
        if problems:
            lines.append(f"event {index} (id {event.event_id!r}): {'; '.join(problems)}")
    return lines
