"""Reports: the end-of-run text summary, the JSON file and the PNG plot."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .common import HIST_BASE, fmt_ms

LAT_KEYS = ("p50", "p90", "p99", "p99.9", "max")


def _lat_line(lat: dict) -> str:
    if not lat or not lat.get("count"):
        return "-"
    return "  ".join(f"{k} {fmt_ms(lat.get(k))}" for k in LAT_KEYS)


def _codes(codes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in codes.items()) if codes else "none"


def format_summary(r: dict) -> str:
    mode = r.get("mode")
    cfg = r.get("config", {})
    lines = []
    if mode == "run":
        how = (
            f"open loop, {cfg.get('rate'):g} req/s"
            if r.get("loop") == "open"
            else f"closed loop, concurrency {cfg.get('concurrency')}"
        )
    elif mode == "stream":
        how = f"{cfg.get('streams')} streams, {cfg.get('rate'):g} events/s"
    else:
        how = f"{cfg.get('samples')} samples, concurrency {cfg.get('concurrency')}"
    if r.get("merged_from"):
        how += f", merged from {r['merged_from']} client processes"
    lines.append(
        f"== {mode} ({how}) against {r.get('target')}: {r.get('duration_s', 0):.2f} s"
        + (" [interrupted]" if r.get("interrupted") else "")
        + " =="
    )
    unit = {"run": "requests", "stream": "events sent", "freshness": "samples"}[mode]
    rate_unit = {"run": "req/s", "stream": "acked events/s", "freshness": "samples/s"}[mode]
    lines.append(
        f"{unit:<12} {r['requests']}  (ok {r['ok']}, errors {r['errors']})   "
        f"throughput {r['throughput_rps']:.1f} {rate_unit}"
    )
    lat_name = {"run": "latency", "stream": "ack latency", "freshness": "freshness"}[mode]
    lines.append(f"{lat_name:<12} {_lat_line(r.get('latency_ms', {}))}")
    lines.append(f"{'errors':<12} {_codes(r.get('errors_by_code', {}))}")
    if mode == "run":
        for name, b in r.get("by_call", {}).items():
            lines.append(
                f"  {name:<11} {b['requests']:>8} req {b['throughput_rps']:>9.1f} req/s  "
                f"p50 {fmt_ms(b['latency_ms']['p50'])}  p99 {fmt_ms(b['latency_ms']['p99'])}"
                f"  errors {_codes(b['errors_by_code'])}"
            )
        ol = r.get("open_loop")
        if ol:
            lines.append(
                f"{'open loop':<12} intended {ol['intended']}  sent {ol['sent']} "
                f"({ol['send_rate']:.1f}/s)  late {ol['late']} (>{ol['late_threshold_ms']:g} ms)  "
                f"waited_for_cap {ol['waited_for_cap']}  dropped {ol['dropped']}  "
                f"unsent_at_end {ol['unsent_at_end']}  (max outstanding {ol['max_outstanding']},"
                f" on cap: {ol['on_cap']})"
            )
            lines.append(f"{'send lag':<12} {_lat_line(ol['send_lag_ms'])}")
        if r.get("unfinished"):
            lines.append(f"{'unfinished':<12} {r['unfinished']} calls cancelled at the end")
    elif mode == "stream":
        ev = r["events"]
        lines.append(
            f"{'events':<12} sent {ev['sent']}  acked {ev['acked']} ({ev['acked_per_s']:.1f}/s)  "
            f"duplicates {ev['duplicates']} (unexpected {ev['unexpected_duplicates']}, "
            f"resent {ev['resent']})  rejected {ev['rejected']} "
            f"(malformed sent {ev['malformed_sent']})  late {ev['late']}"
        )
        st = r["streams"]
        lines.append(
            f"{'streams':<12} {st['n']}  opened {st['opened']}  reconnects {st['reconnects']}  "
            f"cancelled at drain {st['cancelled_at_drain']}"
        )
        if ev["unacked"]:
            lines.append(
                f"{'UNACKED':<12} {ev['unacked']} events sent but never acked, e.g. "
                + ", ".join(ev["unacked_sample"][:5])
            )
        else:
            lines.append(f"{'unacked':<12} 0 (every event sent was acked or rejected)")
    else:
        f = r["freshness"]
        lines.append(
            f"{'samples':<12} reflected {f['reflected']}  NOT reflected within "
            f"{f['timeout_s']:g} s: {f['not_reflected']}  failed {f['failed']}  "
            f"undetectable {f['undetectable']}  on first poll {f['reflected_on_first_poll']}  "
            f"by {f['reflected_by']}"
        )
        lines.append(f"{'feedback ack':<12} {_lat_line(f['feedback_ack_ms'])}")
        lines.append(f"{'recommend':<12} {_lat_line(f['recommend_ms'])}")
    cl = r.get("client", {})
    one = {"run": "request", "stream": "event", "freshness": "sample"}[mode]
    if cl:
        per = cl.get("cpu_us_per_request")
        lines.append(
            f"{'client':<12} cpu {cl.get('cpu_s')} s ({100 * cl.get('cpu_utilization', 0):.0f}% "
            f"of one core), {per if per is not None else '-'} us cpu per {one}, "
            f"{cl.get('channels')} channel(s)"
        )
    for name, msg in r.get("error_examples", {}).items():
        lines.append(f"{'e.g.':<12} {name}: {msg}")
    return "\n".join(lines)


def print_summary(r: dict, stream=None) -> None:
    print(format_summary(r), file=stream or sys.stdout, flush=True)


def write_json(r: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    # the bulky parts last, so the head of the file reads as a summary
    bulky = ("latency_histogram_ms", "timeline", "samples", "hdr")
    ordered = {k: v for k, v in r.items() if k not in bulky}
    ordered.update({k: r[k] for k in bulky if k in r})
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(ordered, f, indent=2)
        f.write("\n")
    os.replace(tmp, p)


def write_plot(r: dict, path: str | os.PathLike) -> None:
    """PNG: latency over time (per-second p50/p90/p99/max), throughput over time, and
    the latency histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = r.get("mode")
    lat_label = {"run": "latency", "stream": "ack latency", "freshness": "freshness"}[mode]
    fig, (ax_t, ax_r, ax_h) = plt.subplots(3, 1, figsize=(10, 10), constrained_layout=True)
    tl = r.get("timeline", [])
    ts = [e["t"] for e in tl]

    if mode == "freshness":
        pts = [(s["t"], s["freshness_ms"]) for s in r.get("samples", []) if "freshness_ms" in s]
        if pts:
            ax_t.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, label="sample")
        nr = [s["t"] for s in r.get("samples", []) if s.get("result") == "not_reflected"]
        if nr:
            y = r["freshness"]["timeout_s"] * 1000
            ax_t.scatter(nr, [y] * len(nr), marker="x", color="red", label="not reflected")
    else:
        for key, style in (("p50_ms", "-"), ("p90_ms", "--"), ("p99_ms", "-"), ("max_ms", ":")):
            pts = [(e["t"], e[key]) for e in tl if e.get(key) is not None]
            if pts:
                ax_t.plot(
                    [p[0] for p in pts], [p[1] for p in pts], style, marker=".", label=key[:-3]
                )
    ax_t.set_xlabel("time (s)")
    ax_t.set_ylabel(f"{lat_label} (ms)")
    ax_t.set_title(
        f"{mode} against {r.get('target')}: {lat_label} over time "
        f"(p50 {fmt_ms(r['latency_ms'].get('p50'))}, p99 {fmt_ms(r['latency_ms'].get('p99'))})"
    )
    if ax_t.has_data():
        ax_t.set_yscale("log")
        ax_t.legend(loc="upper right")
    ax_t.grid(True, which="both", alpha=0.3)

    ax_r.plot(
        ts,
        [e["rps"] for e in tl],
        marker=".",
        label={"run": "completed/s", "stream": "acked/s"}.get(mode, "samples/s"),
    )
    if any("sent" in e for e in tl):
        ax_r.plot(ts, [e.get("sent", 0) / max(e["dt"], 1e-9) for e in tl], "--", label="sent/s")
    errs = [e["errors"] / max(e["dt"], 1e-9) for e in tl]
    if any(errs):
        ax_r.plot(ts, errs, color="red", label="errors/s")
    ax_r.set_xlabel("time (s)")
    ax_r.set_ylabel("per second")
    top = max([e["rps"] for e in tl] + [e.get("sent", 0) / max(e["dt"], 1e-9) for e in tl] + [1])
    ax_r.set_ylim(0, top * 1.15)
    ax_r.legend(loc="lower right")
    ax_r.grid(True, alpha=0.3)

    buckets = r.get("latency_histogram_ms", [])
    if buckets:
        edges = [buckets[0][0] / HIST_BASE] + [b[0] for b in buckets]
        counts = [b[1] for b in buckets]
        ax_h.stairs(counts, edges, fill=True, alpha=0.6)
        ax_h.set_xscale("log")
        lat = r["latency_ms"]
        for key, color in (("p50", "green"), ("p99", "orange"), ("p99.9", "red")):
            if lat.get(key) is not None:
                ax_h.axvline(
                    lat[key], color=color, linestyle="--", label=f"{key} {fmt_ms(lat[key])}"
                )
        ax_h.legend(loc="upper right")
    ax_h.set_xlabel(f"{lat_label} (ms, log scale)")
    ax_h.set_ylabel("count")
    ax_h.set_title(f"{lat_label} histogram ({r['latency_ms'].get('count', 0)} values)")
    ax_h.grid(True, which="both", alpha=0.3)

    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=90)
    plt.close(fig)
