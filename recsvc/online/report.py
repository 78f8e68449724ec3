"""``recsvc report``: per-variant online metrics from the impression and feedback logs (#13).

CTR is the share of impressions (lists shown) with at least one click, with a
95% Wilson score interval; each variant is compared with the control by a
two-sided two-proportion z-test. Interleaved variants get a sign test on the
lists each team won.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from recsvc.online.attribution import Attribution, Cell

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (0, 0 when n is 0)."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """(z, two-sided p) of H0: equal proportions, pooled; (0, 1) when undefined."""
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def sign_test(wins_a: int, wins_b: int) -> float:
    """Exact two-sided binomial p-value of ``wins_a`` vs ``wins_b`` at p = 1/2."""
    n = wins_a + wins_b
    if n == 0:
        return 1.0
    low = min(wins_a, wins_b)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return min(1.0, 2 * tail)


def choose_control(variants: Iterable[str], control: str | None) -> str | None:
    names = sorted(variants)
    if control:
        return control
    for name in ("control", "default"):
        if name in names:
            return name
    return names[0] if names else None


def _rates(cell: Cell) -> dict[str, Any]:
    low, high = wilson(cell.clicked, cell.impressions)
    clow, chigh = wilson(cell.converted, cell.impressions)
    n = cell.impressions or 1
    return {
        **cell.as_dict(),
        "ctr": cell.clicked / n if cell.impressions else 0.0,
        "ctr_ci95": [low, high],
        "conversion_rate": cell.converted / n if cell.impressions else 0.0,
        "conversion_ci95": [clow, chigh],
    }


def summarise(result: Attribution, control: str | None = None) -> dict[str, Any]:
    """The report as plain data (what ``--json`` prints)."""
    control = choose_control(result.by_variant, control)
    base = result.by_variant.get(control) if control else None
    variants: dict[str, Any] = {}
    for name in sorted(result.by_variant):
        cell = result.by_variant[name]
        row = _rates(cell)
        if base is not None and name != control:
            z, p = two_proportion_test(cell.clicked, cell.impressions, base.clicked,
                                       base.impressions)  # fmt: skip
            cz, cp = two_proportion_test(cell.converted, cell.impressions, base.converted,
                                         base.impressions)  # fmt: skip
            row["vs_control"] = {"ctr_z": z, "ctr_p": p, "conversion_z": cz, "conversion_p": cp}
        row["by_strategy"] = {k: _rates(c) for k, c in sorted(result.by_strategy[name].items())}
        row["by_model"] = {k: _rates(c) for k, c in sorted(result.by_model[name].items())}
        row["by_position"] = {
            str(p): {"shown": s, "clicked": c, "ctr": c / s if s else 0.0}
            for p, (s, c) in sorted(result.by_position[name].items())
        }
        row["by_time"] = {str(t): _rates(c) for t, c in sorted(result.by_time[name].items())}
        if name in result.interleaving:
            wins = result.interleaving[name]
            teams = sorted(t for t in wins if t != "tie")
            row["interleaving"] = {"wins": dict(wins)}
            if len(teams) <= 2:
                a, b = [*teams, "", ""][:2]
                row["interleaving"]["sign_test_p"] = sign_test(wins.get(a, 0), wins.get(b, 0))
        variants[name] = row
    return {
        "control": control,
        "variants": variants,
        "events": {
            "total": result.events_total,
            "attributed": result.attributed_events,
            "without_recommendation_id": result.events_without_id,
            "unattributed": dict(sorted(result.unattributed.items())),
        },
    }


def table(summary: dict[str, Any]) -> str:
    """A fixed-width text table, one row per variant."""
    head = (f"{'variant':<16} {'impr':>8} {'clicked':>8} {'CTR':>7} {'95% CI':>17} "
            f"{'conv':>6} {'conv%':>7} {'p(CTR)':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for name, row in summary["variants"].items():
        low, high = row["ctr_ci95"]
        p = row.get("vs_control", {}).get("ctr_p")
        lines.append(
            f"{name[:16]:<16} {row['impressions']:>8} {row['clicked']:>8} "
            f"{row['ctr']:>7.2%} {f'[{low:.2%}, {high:.2%}]':>17} {row['converted']:>6} "
            f"{row['conversion_rate']:>7.2%} {'control' if p is None else f'{p:.3g}':>8}"
        )
        if "interleaving" in row:
            lines.append(f"{'':<16} interleaving wins {row['interleaving']}")
    events = summary["events"]
    lines.append("")
    lines.append(
        f"feedback events: {events['total']} read, {events['attributed']} attributed, "
        f"{events['without_recommendation_id']} without a recommendation id; unattributed: "
        + (", ".join(f"{k} {v}" for k, v in events["unattributed"].items()) or "none")
    )
    return "\n".join(lines)


def plot(summary: dict[str, Any], out: Path) -> None:
    """CTR per time bucket per variant, with 95% intervals, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import UTC, datetime

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, row in summary["variants"].items():
        points = sorted((int(t), c) for t, c in row["by_time"].items())
        if not points:
            continue
        times = mdates.date2num([datetime.fromtimestamp(t / 1000, UTC) for t, _ in points])
        ctr = [c["ctr"] for _, c in points]
        ax.plot(times, ctr, marker="o", label=f"{name} ({row['ctr']:.1%})")
        ax.fill_between(times, [c["ctr_ci95"][0] for _, c in points],
                        [c["ctr_ci95"][1] for _, c in points], alpha=0.15)  # fmt: skip
    ax.xaxis_date()
    ax.set_ylabel("CTR (lists with a click)")
    ax.set_xlabel("impression time (UTC)")
    ax.set_title("CTR per variant over time (95% Wilson intervals)")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def read_feedback_csv(paths: Iterable[Path]) -> Iterator[dict[str, str]]:
    """Exported feedback (``recsvc export-feedback`` CSV) as feedback log entries."""
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                yield {
                    "event_id": row.get("event_id", ""), "user_id": row.get("user_id", ""),
                    "item_id": row.get("item_id", ""), "type": row.get("event_type", ""),
                    "ts_ms": row.get("timestamp", "0"),
                    "recommendation_id": row.get("recommendation_id", ""),
                }  # fmt: skip
