"""#13: attribution, statistics, variants and interleaving, without a server."""

import json
import random

import pytest

from recsvc.errors import InvalidArgument
from recsvc.online.attribution import attribute
from recsvc.online.impressions import Impression, sampled
from recsvc.online.interleave import team_draft
from recsvc.online.report import sign_test, summarise, two_proportion_test, wilson
from recsvc.online.variants import VariantSet


def imp(rid, user, variant, items, ts=1_000_000, teams=()):
    return Impression(rid, user, variant, "cf", "m1", "recommend", items, ts, teams)


def ev(eid, user, item, kind, rid, ts=1_000_500):
    return {"event_id": eid, "user_id": user, "item_id": item, "type": kind, "ts_ms": str(ts),
            "recommendation_id": rid}  # fmt: skip


def test_attribution_counts_every_event_once_by_kind():
    impressions = [imp("r1", "u1", "a", ["x", "y", "z"]), imp("r2", "u2", "a", ["y", "x"]),
                   imp("r3", "u3", "b", ["x"], ts=5_000_000)]  # fmt: skip
    events = [
        ev("1", "u1", "y", "click", "r1"),
        ev("2", "u1", "y", "click", "r1"),  # a second click on the same item: one clicked list
        ev("2", "u1", "y", "click", "r1"),  # the same event id again: a duplicate
        ev("3", "u1", "z", "purchase", "r1"),
        ev("4", "u2", "q", "click", "r2"),  # not shown
        ev("5", "u9", "x", "click", "r2"),  # someone else's list
        ev("6", "u3", "x", "click", "r3", ts=5_000_000 + 61_000),  # late
        ev("7", "u3", "x", "click", "gone"),  # no impression
        ev("8", "u3", "x", "view", ""),
    ]
    out = attribute(impressions, events, window_ms=60_000, bucket_ms=3_600_000)
    a, b = out.by_variant["a"], out.by_variant["b"]
    assert (a.impressions, a.clicked, a.converted) == (2, 1, 1)
    assert (b.impressions, b.clicked) == (1, 0)
    assert dict(out.unattributed) == {"duplicate": 1, "not_shown": 1, "other_user": 1,
                                      "late": 1, "no_impression": 1}  # fmt: skip
    assert (out.events_total, out.attributed_events, out.events_without_id) == (9, 3, 1)
    assert {p: v for p, v in out.by_position["a"].items()} == {0: [2, 0], 1: [2, 1], 2: [1, 0]}
    assert set(out.by_time["b"]) == {3_600_000} and set(out.by_time["a"]) == {0}


def test_an_impression_written_twice_counts_once_and_events_count_each():
    twice = [imp("r1", "u1", "a", ["x", "y"]), imp("r1", "u1", "a", ["x", "y"])]
    events = [ev("1", "u1", "x", "click", "r1"), ev("2", "u1", "x", "click", "r1")]
    out = attribute(twice, events, window_ms=60_000)
    cell = out.by_variant["a"]
    assert (cell.impressions, cell.clicked, cell.events["click"]) == (1, 1, 2)
    assert out.by_position["a"][0] == [1, 1] and not out.unattributed


def test_generate_impressions_attribute_any_nearest_item_to_its_position():
    shown = Impression("g", "u", "a", "generate", "m", "generate", [["p", "q"], ["r"]], 0)
    out = attribute([shown], [ev("1", "u", "q", "click", "g", ts=1)], window_ms=10)
    assert out.by_position["a"][0] == [1, 1] and out.by_variant["a"].clicked == 1


def test_wilson_and_z_test_match_known_values():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 0) == (0.0, 0.0) and wilson(0, 10)[0] == 0.0
    z, p = two_proportion_test(60, 100, 40, 100)  # pooled 0.5: z = 0.2 / sqrt(0.005)
    assert z == pytest.approx(2.8284, abs=1e-4) and p == pytest.approx(0.004678, abs=1e-5)
    assert two_proportion_test(0, 0, 1, 2) == (0.0, 1.0)
    assert sign_test(10, 0) == pytest.approx(2 / 1024) and sign_test(3, 3) == 1.0


def test_summary_compares_each_variant_with_the_control():
    impressions = [imp(f"c{i}", "u", "control", ["x"]) for i in range(100)]
    impressions += [imp(f"t{i}", "u", "treat", ["x"]) for i in range(100)]
    events = [ev(f"c{i}", "u", "x", "click", f"c{i}") for i in range(40)]
    events += [ev(f"t{i}", "u", "x", "click", f"t{i}") for i in range(60)]
    summary = summarise(attribute(impressions, events, window_ms=10_000))
    assert summary["control"] == "control" and "vs_control" not in summary["variants"]["control"]
    assert summary["variants"]["treat"]["vs_control"]["ctr_p"] == pytest.approx(0.004678, abs=1e-5)
    json.dumps(summary)  # plain data


def test_sampling_is_decided_by_the_id():
    ids = [f"{i:08x}" + "0" * 24 for i in range(0, 2**32, 2**24)]
    assert sum(sampled(r, 0.25) for r in ids) == 64
    assert all(sampled(r, 1.0) for r in ids) and not any(sampled(r, 0.0) for r in ids)


def test_variants_file_assignment_is_sticky_and_follows_shares(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text('salt = "s"\n[[variants]]\nname = "a"\nshare = 0.7\n'
                    '[[variants]]\nname = "b"\nshare = 0.3\nstrategy = "cf"\n'
                    '[[variants]]\nname = "only-by-override"\nshare = 0.0\n')  # fmt: skip
    variants = VariantSet.load(path)
    assigned = [variants.assign(f"user{i}").name for i in range(4000)]
    assert assigned == [VariantSet.load(path).assign(f"user{i}").name for i in range(4000)]
    share_a = assigned.count("a") / len(assigned)
    assert 0.67 < share_a < 0.73 and "only-by-override" not in assigned
    assert variants.choose("user1", "only-by-override").name == "only-by-override"
    with pytest.raises(InvalidArgument, match="unknown variant 'zzz'"):
        variants.choose("user1", "zzz")


@pytest.mark.parametrize(
    "variants, message",
    [
        ([{"name": "a", "share": 0.5}], "sum to 1"),
        ([{"name": "a", "share": 1.0, "strategy": "magic"}], "strategy"),
        ([{"name": "a", "share": 1.0, "colour": "red"}], "unknown keys"),
        ([{"name": "a", "share": 1}, {"name": "a", "share": 0}], "unique"),
        ([{"name": "a", "share": 1}, {"name": "i", "share": 0, "interleave": ["a", "b"]}],
         "not a plain variant"),
    ],
)  # fmt: skip
def test_bad_variants_files_are_refused_with_the_reason(tmp_path, variants, message):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"variants": variants}))
    with pytest.raises(ValueError, match=message):
        VariantSet.load(path)


def test_team_draft_takes_turns_and_never_repeats_an_item():
    a, b = list("abcdefghij"), list("bdfhjklmno")
    for seed in range(20):
        teams, indices = team_draft(a, b, 8, random.Random(seed))
        items = [(a, b)[t][i] for t, i in zip(teams, indices, strict=True)]
        assert len(items) == len(set(items)) == 8
        for n in range(2, 9, 2):  # after each pair of picks the teams are level
            assert teams[:n].count(0) == n // 2
        for t in (0, 1):  # each team picks in its own order
            mine = [i for team, i in zip(teams, indices, strict=True) if team == t]
            assert mine == sorted(mine)
    teams, _ = team_draft(["a"], ["a", "b", "c"], 5, random.Random(0))
    assert len(teams) == 3  # runs out of items
