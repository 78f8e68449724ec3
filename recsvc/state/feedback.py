"""Accepting feedback events: validation, weights, and writing them durably.

An event is acknowledged only after :meth:`UserStore.apply_events` returned,
i.e. once it is in the Redis feedback stream and applied to the user's state
(both by one atomic script). Resending an event id changes nothing.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

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


# C0 and C1 control characters and lone surrogates (never valid in UTF-8): an id
# carrying one corrupts logs and CSV exports, and is never a real id.
_BAD_ID_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def id_problem(name: str, value: str, max_length: int, required: bool = True) -> str | None:
    """Why ``value`` is not an acceptable id (None when it is)."""
    if not value:
        return f"{name} is empty" if required else None
    if len(value) > max_length:
        return f"{name} is longer than {max_length} characters"
    bad = _BAD_ID_CHARACTERS.search(value)
    if bad:
        return (
            f"{name} contains the control character U+{ord(bad.group()):04X} at position "
            f"{bad.start()}; ids must be printable UTF-8 text"
        )
    return None


def event_problems(
    event: FeedbackEvent, settings: Settings, now_ms: int | None = None
) -> list[str]:
    """Why the event cannot be accepted; empty when it is valid.

    Every number an event brings is checked here, before anything reaches
    Redis: ``value`` finite and within ``max_event_value``, the weight it gets
    within ``max_event_weight``, the timestamp (when set) within
    ``max_event_age_s`` before and ``max_event_skew_s`` after ``now_ms``.
    """
    problems = []
    for name in ("event_id", "user_id", "item_id"):
        problem = id_problem(name, getattr(event, name), settings.max_id_length)
        if problem:
            problems.append(problem)
    problem = id_problem(
        "recommendation_id", event.recommendation_id, settings.max_id_length, required=False
    )
    if problem:
        problems.append(problem)
    if not math.isfinite(event.value):
        problems.append(f"value must be a finite number, got {event.value}")
    elif abs(event.value) > settings.max_event_value:
        problems.append(
            f"value {event.value:g} is outside +-{settings.max_event_value:g} (max_event_value)"
        )
    if event.type_code == 0 or event.event_type is None or (
        event.event_type not in settings.event_weights
    ):
        problems.append(_type_problem(event.type_code, settings))
    elif event.event_type == "rating" and event.value == 0:
        problems.append("RATING events need the rating in value")
    elif math.isfinite(event.value):
        weight = event_weight(
            event.event_type, event.value, settings.event_weights, settings.rating_midpoint
        )
        if not abs(weight) <= settings.max_event_weight:
            problems.append(
                f"the event's weight {weight:g} (from its type and value) is outside "
                f"+-{settings.max_event_weight:g} (max_event_weight)"
            )
    if event.timestamp_ms:  # 0: unset, the server's receive time is used
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        earliest = now_ms - settings.max_event_age_s * 1000
        latest = now_ms + settings.max_event_skew_s * 1000
        if not earliest <= event.timestamp_ms <= latest:
            problems.append(
                f"timestamp {_describe_ms(event.timestamp_ms)} is outside the accepted window "
                f"{_describe_ms(earliest)} .. {_describe_ms(latest)} (now - max_event_age_s .. "
                "now + max_event_skew_s); leave it unset to use the server's time"
            )
    return problems


def _type_problem(type_code: int, settings: Settings) -> str:
    """Why an event's type is refused, naming the number received and the valid names:
    a JSON or proto-loader client that misspells an enum name sends 0 without a word."""
    known = ", ".join(t.upper() for t in settings.event_weights)
    if type_code == 0:
        return (
            "type is unset: received 0 (EVENT_TYPE_UNSPECIFIED), which is also what a "
            f"misspelt or unknown enum name arrives as; valid values: {known}"
        )
    return f"unknown event type: received {type_code}; valid values: {known}"


def _describe_ms(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms since 1970"


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
    now_ms = int(time.time() * 1000)
    for index, event in enumerate(events):
        problems = event_problems(event, settings, now_ms)
        if problems:
            lines.append(f"event {index} (id {event.event_id!r}): {'; '.join(problems)}")
    return lines
