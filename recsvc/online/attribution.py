"""Attribution of feedback to impressions by recommendation id (#13).

A pure function of the two logs: each feedback event carrying a
recommendation id is joined to the impression with that id. It counts, per
variant, strategy, model version, position and time bucket, the impressions,
those with a click and those with a conversion. An event that cannot be
attributed is counted by why: no impression with its id (never logged, not
sampled, or trimmed), too late (after the attribution window), another user's
list, an item the list did not show, or a repeat of an event id already seen.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from recsvc.online.impressions import Impression

CLICK_TYPES = frozenset({"click"})
CONVERSION_TYPES = frozenset({"purchase"})


@dataclass
class Cell:
    """Counts for one group of impressions."""

    impressions: int = 0
    clicked: int = 0  # impressions with at least one click
    converted: int = 0  # impressions with at least one conversion
    events: Counter[str] = field(default_factory=Counter)  # attributed events by type

    def add(self, clicked: bool, converted: bool, types: Iterable[str]) -> None:
        self.impressions += 1
        self.clicked += clicked
        self.converted += converted
        self.events.update(types)

    def as_dict(self) -> dict[str, Any]:
        return {
            "impressions": self.impressions,
            "clicked": self.clicked,
            "converted": self.converted,
            "events": dict(sorted(self.events.items())),
        }


@dataclass
class Attribution:
    """The joined counts; every dict is keyed by variant first."""

    by_variant: dict[str, Cell] = field(default_factory=lambda: defaultdict(Cell))
    by_strategy: dict[str, dict[str, Cell]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Cell))
    )
    by_model: dict[str, dict[str, Cell]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Cell))
    )
    # position -> [shown, clicked] (a position counts once per impression)
    by_position: dict[str, dict[int, list[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: [0, 0]))
    )
    by_time: dict[str, dict[int, Cell]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Cell))
    )
    # interleaved variants: team -> lists it won, plus "tie" (lists with a click, even)
    interleaving: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    unattributed: Counter[str] = field(default_factory=Counter)
    events_total: int = 0
    events_without_id: int = 0
    attributed_events: int = 0


def _position_index(items: list[Any]) -> dict[str, int]:
    """item id -> first position showing it (an entry may be a list: Generate's
    nearest items of one generated item share its position)."""
    index: dict[str, int] = {}
    for position, entry in enumerate(items):
        for item in entry if isinstance(entry, list) else (entry,):
            index.setdefault(item, position)
    return index


def _count(
    out: Attribution, imp: Impression, at: dict[int, set[str]], types: Counter[str],
    bucket_ms: int, click_types: frozenset[str], conversion_types: frozenset[str],
) -> None:  # fmt: skip
    """Add one impression, with the event types attributed at each position."""
    clicked = any(kinds & click_types for kinds in at.values())
    converted = any(kinds & conversion_types for kinds in at.values())
    v = imp.variant
    for cell in (out.by_variant[v], out.by_strategy[v][imp.strategy],
                 out.by_model[v][imp.model_version],
                 out.by_time[v][imp.ts_ms // bucket_ms * bucket_ms]):  # fmt: skip
        cell.add(clicked, converted, types)
    pos = out.by_position[v]
    for p in range(len(imp.items)):
        pos[p][0] += 1
        if p in at and at[p] & click_types:
            pos[p][1] += 1
    if imp.teams:
        wins: Counter[str] = Counter()
        for p, kinds in at.items():
            if kinds & click_types and p < len(imp.teams):
                wins[imp.teams[p]] += 1
        if wins:
            ranked = wins.most_common()
            if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
                out.interleaving[v]["tie"] += 1
            else:
                out.interleaving[v][ranked[0][0]] += 1


def attribute(
    impressions: Iterable[Impression],
    events: Iterable[dict[str, str]],
    window_ms: int,
    bucket_ms: int = 3_600_000,
    click_types: frozenset[str] = CLICK_TYPES,
    conversion_types: frozenset[str] = CONVERSION_TYPES,
) -> Attribution:
    """Join ``events`` (feedback log entries: event_id, user_id, item_id, type,
    ts_ms, recommendation_id) to ``impressions``; times are bucketed by the
    impression's time, ``bucket_ms`` wide. The events are held in memory, the
    impressions are streamed (there are many more of them)."""
    out = Attribution()
    # the events first (fewer than impressions): by recommendation id, once each
    pending: dict[str, list[dict[str, str]]] = defaultdict(list)
    seen_events: set[tuple[str, str]] = set()
    for event in events:
        out.events_total += 1
        key = (event.get("user_id", ""), event.get("event_id", ""))
        if key in seen_events:
            out.unattributed["duplicate"] += 1
            continue
        seen_events.add(key)
        rid = event.get("recommendation_id", "")
        if rid:
            pending[rid].append(event)
        else:
            out.events_without_id += 1
    del seen_events
    # then the impressions, streamed: each is counted and dropped
    seen_lists: set[str] = set()
    for imp in impressions:
        if imp.recommendation_id in seen_lists:
            continue  # written twice (a write retried after a timeout): count it once
        seen_lists.add(imp.recommendation_id)
        at: dict[int, set[str]] = defaultdict(set)  # position -> types attributed there
        types: Counter[str] = Counter()
        evs = pending.pop(imp.recommendation_id, ())
        index = _position_index(list(imp.items)) if evs else {}
        for event in evs:
            if event.get("user_id") != imp.user_id:
                out.unattributed["other_user"] += 1
            elif int(event.get("ts_ms") or 0) - imp.ts_ms > window_ms:
                out.unattributed["late"] += 1
            elif (position := index.get(event.get("item_id", ""), -1)) < 0:
                out.unattributed["not_shown"] += 1
            else:
                at[position].add(event.get("type", ""))
                types[event.get("type", "")] += 1
                out.attributed_events += 1
        _count(out, imp, at, types, bucket_ms, click_types, conversion_types)
    out.unattributed["no_impression"] += sum(len(evs) for evs in pending.values())
    out.unattributed = +out.unattributed  # drop zero counts
    return out
