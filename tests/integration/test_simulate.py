"""#13: the simulator of users who respond, against a real server with two variants."""

import asyncio
import json

import pytest

from loadtest.simulate import SimulateConfig, format_simulation, plot_simulation, simulate
from recsvc.cli import main as recsvc_main

pytestmark = pytest.mark.integration


def held_out_split(train_csv, path):
    """Each clustered user's unseen items of their own cluster (the 'test split')."""
    seen = {}
    for line in train_csv.read_text().splitlines()[1:]:
        user, item, kind, _ = line.split(",")
        if kind != "dislike":
            seen.setdefault(user, set()).add(item)
    lines = []
    for user, items in sorted(seen.items()):
        cluster = "a" if int(user[1:]) < 20 else "b"
        lines.append(" ".join([user, *sorted({f"{cluster}{i}" for i in range(8)} - items)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_learning_variant_keeps_finding_what_the_frozen_one_shows_once(
    make_server, redis_url, clustered_csv, tmp_path, capsys
):
    variants = tmp_path / "v.json"
    variants.write_text(json.dumps({"variants": [
        {"name": "live", "share": 0.5, "strategy": "cf"},
        {"name": "frozen", "share": 0.5, "strategy": "cf", "frozen_state": True},
    ]}))  # fmt: skip
    server = make_server(variants=variants)
    cfg = SimulateConfig(target=f"127.0.0.1:{server.port}", test=held_out_split(
        clustered_csv, tmp_path / "test.txt"), users=40, rounds=4, k=2, bias=0.0,
        variants=["live", "frozen"], concurrency=4)  # fmt: skip
    report = asyncio.run(simulate(cfg))
    assert report["errors"] == {}
    live, frozen = report["variants"]["live"], report["variants"]["frozen"]
    assert live["total"]["lists"] == frozen["total"]["lists"] == 80
    # bias 0: every shown held-out item is clicked, once; a frozen list never changes
    assert frozen["rounds"][0]["ctr"] > 0.5 and frozen["rounds"][1]["clicks"] == 0
    assert live["rounds"][1]["clicks"] > 0 and live["total"]["clicks"] > frozen["total"]["clicks"]
    assert "live" in format_simulation(report)
    plot_simulation(report, tmp_path / "sim.png")
    assert (tmp_path / "sim.png").stat().st_size > 1000

    # the server's own attribution agrees with what the simulated users did
    log = server.server.impressions
    assert asyncio.run(asyncio.sleep(0.3)) is None and log.pending == 0
    capsys.readouterr()
    assert recsvc_main(["report", "--redis-url", redis_url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for name, sim in (("live", live), ("frozen", frozen)):
        row = out["variants"][name]
        assert row["impressions"] == sim["total"]["lists"]
        assert row["clicked"] == sim["total"]["clicked_lists"]
        assert row["events"].get("click", 0) == sim["total"]["clicks"]
