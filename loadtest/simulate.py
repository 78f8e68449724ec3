"""Simulated users who respond (#13): ``python -m loadtest simulate``.

Each simulated user has true preferences the server never sees: their items in a
held-out test split (e.g. Gowalla's test.txt). In every round each user asks for
a list, looks down it, and clicks a shown item that is among their held-out
items with a probability that falls with its position (position bias
``1 / (1 + position) ** bias``); each held-out item is clicked at most once. The
clicks go back as CLICK feedback carrying the list's recommendation_id; then
the user comes back for the next round. The report is the online CTR (lists
with a click) and clicks per list, per variant and round: a variant that learns
from the feedback keeps finding held-out items, one that does not keeps showing
the same list.

Variants: the server's assignment (the response names the variant), or with
``--variants a,b,c`` an override per user (user i gets variant i mod n), so
every variant sees a same-sized, random share of the users.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsvc.v1 import recommender_pb2 as pb

from .common import close_channels, error_name, open_channels

RETRIES = 5  # a feedback batch refused as UNAVAILABLE is resent (event ids make it safe)


@dataclass
class SimulateConfig:
    target: str
    test: Path
    users: int = 2000
    rounds: int = 10
    k: int = 20
    bias: float = 1.0
    variants: list[str] = field(default_factory=list)
    concurrency: int = 16
    seed: int = 0


def read_held_out(path: Path, known: set[str] | None = None) -> dict[str, set[str]]:
    """user -> held-out items, from 'user item item ...' lines (or user,item CSV/TSV)."""
    held: dict[str, set[str]] = defaultdict(set)
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.replace(",", " ").replace("\t", " ").split()
            if len(parts) < 2 or parts[0] == "user_id":
                continue
            held[parts[0]].update(parts[1:])
    return {u: items for u, items in held.items() if known is None or u in known}


@dataclass
class Tally:
    lists: int = 0
    clicked_lists: int = 0
    clicks: int = 0
    degraded: int = 0  # lists served without the user's state (Redis unreachable)

    def as_dict(self) -> dict[str, float]:
        return {
            "lists": self.lists,
            "clicked_lists": self.clicked_lists,
            "clicks": self.clicks,
            "ctr": self.clicked_lists / self.lists if self.lists else 0.0,
            "clicks_per_list": self.clicks / self.lists if self.lists else 0.0,
            "degraded_lists": self.degraded,
        }


async def _round(
    cfg: SimulateConfig, r: int, run_id: str, users: list[str], hidden: dict[str, set[str]],
    variant_of: dict[str, str], stubs: list, would_click: np.ndarray, errors: dict[str, int],
) -> dict[str, Tally]:  # fmt: skip
    """Every user visits once (``cfg.concurrency`` at a time); ``would_click[n, p]``:
    user n clicks position p if the item there is one of their hidden items."""
    tallies: dict[str, Tally] = defaultdict(Tally)
    order = iter(enumerate(users))

    async def visit(n: int, user: str, stub) -> None:  # type: ignore[no-untyped-def]
        try:
            reply = await stub.Recommend(
                pb.RecommendRequest(user_id=user, k=cfg.k, variant=variant_of[user])
            )
        except Exception as exc:  # counted, the run goes on
            errors["Recommend " + error_name(exc)] += 1
            return
        clicks = [i.item_id for p, i in enumerate(reply.items)
                  if would_click[n, p] and i.item_id in hidden[user]]  # fmt: skip
        tally = tallies[reply.variant]
        tally.lists += 1
        tally.clicks += len(clicks)
        tally.clicked_lists += bool(clicks)
        tally.degraded += reply.degraded
        if not clicks:
            return
        hidden[user].difference_update(clicks)
        events = [pb.FeedbackEvent(event_id=f"sim-{run_id}-{r}-{user}-{item}", user_id=user,
                                   item_id=item, type=pb.CLICK,
                                   recommendation_id=reply.recommendation_id)
                  for item in clicks]  # fmt: skip
        for attempt in range(RETRIES):
            try:
                await stub.SendFeedback(pb.SendFeedbackRequest(events=events))
                return
            except Exception as exc:
                name = error_name(exc)
                if name != "UNAVAILABLE" or attempt == RETRIES - 1:
                    errors["SendFeedback " + name] += 1
                    return
                errors["SendFeedback retried"] += 1
                await asyncio.sleep(0.2 * (attempt + 1))

    async def worker(w: int) -> None:
        for n, user in order:  # the workers share one iterator
            await visit(n, user, stubs[w % len(stubs)])

    await asyncio.gather(*(worker(w) for w in range(cfg.concurrency)))
    return tallies


async def simulate(cfg: SimulateConfig, stop: asyncio.Event | None = None) -> dict:
    """Run the simulation against ``cfg.target``; returns the report."""
    rng = np.random.default_rng(cfg.seed)
    held = read_held_out(cfg.test)
    users = sorted(held)
    chosen = [users[i] for i in rng.permutation(len(users))[: cfg.users]]
    hidden = {u: set(held[u]) for u in chosen}
    variant_of = {u: cfg.variants[i % len(cfg.variants)] if cfg.variants else ""
                  for i, u in enumerate(chosen)}  # fmt: skip
    position_p = 1.0 / (1.0 + np.arange(cfg.k)) ** cfg.bias  # P(click | shown, liked)
    run_id = os.urandom(4).hex()
    channels, stubs = await open_channels(cfg.target, max(1, min(cfg.concurrency, 8)))
    rounds: list[dict[str, Tally]] = []
    errors: dict[str, int] = defaultdict(int)
    started = time.perf_counter()
    try:
        for r in range(cfg.rounds):
            if stop is not None and stop.is_set():
                break
            would_click = rng.random((len(chosen), cfg.k)) < position_p
            tallies = await _round(
                cfg, r, run_id, chosen, hidden, variant_of, stubs, would_click, errors
            )
            rounds.append(tallies)
    finally:
        await close_channels(channels)
    names = sorted({v for t in rounds for v in t})
    per_variant = {}
    for name in names:
        total = Tally()
        for t in rounds:
            cell = t.get(name, Tally())
            total.lists += cell.lists
            total.clicks += cell.clicks
            total.clicked_lists += cell.clicked_lists
            total.degraded += cell.degraded
        per_variant[name] = {
            "total": total.as_dict(),
            "rounds": [t.get(name, Tally()).as_dict() for t in rounds],
        }
    return {
        "kind": "simulate",
        "target": cfg.target,
        "test": str(cfg.test),
        "users": len(chosen),
        "rounds": len(rounds),
        "k": cfg.k,
        "position_bias": cfg.bias,
        "seed": cfg.seed,
        "variants_requested": cfg.variants,
        "seconds": round(time.perf_counter() - started, 1),
        "errors": dict(errors),
        "variants": per_variant,
    }


def format_simulation(report: dict) -> str:
    lines = [f"{report['users']} users x {report['rounds']} rounds, k={report['k']}, "
             f"position bias {report['position_bias']:g}, {report['seconds']} s"]  # fmt: skip
    for name, v in report["variants"].items():
        per_round = " ".join(f"{r['ctr']:.3f}" for r in v["rounds"])
        t = v["total"]
        lines.append(f"{name:<14} CTR {t['ctr']:.4f} ({t['clicked_lists']}/{t['lists']}), "
                     f"clicks/list {t['clicks_per_list']:.3f}; per round: {per_round}")  # fmt: skip
        if t["degraded_lists"]:
            lines.append(f"{'':<14} {t['degraded_lists']} lists degraded (no Redis)")
    if report["errors"]:
        lines.append(f"errors: {report['errors']}")
    return "\n".join(lines)


def plot_simulation(report: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, v in report["variants"].items():
        rounds = np.arange(1, len(v["rounds"]) + 1)
        axes[0].plot(rounds, [r["ctr"] for r in v["rounds"]], marker="o", label=name)
        axes[1].plot(rounds, [r["clicks_per_list"] for r in v["rounds"]], marker="o", label=name)
    axes[0].set_ylabel("CTR (lists with a click)")
    axes[1].set_ylabel("clicks per list")
    for ax in axes:
        ax.set_xlabel("round (every user asks once)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"simulated users ({report['users']}, held-out {Path(report['test']).name}), "
                 f"k={report['k']}, position bias {report['position_bias']:g}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
