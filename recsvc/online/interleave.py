"""Team-draft interleaving (Radlinski, Kurup & Joachims, CIKM 2008) of two ranked lists.

Each round the team with fewer picks so far (a coin flip on a tie) adds its
best item not yet in the list; a click on an item credits the team that put
it there. Comparing two rankers this way needs far fewer lists than an A/B
split, since both are judged by the same user on the same list.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def team_draft(
    first: Sequence[str], second: Sequence[str], k: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """Interleave two rankings into at most ``k`` distinct items.

    Returns, per position, the team (0: ``first``, 1: ``second``) and the index
    of the item in that team's list."""
    lists = (first, second)
    cursors = [0, 0]
    picks = [0, 0]
    taken: set[str] = set()
    teams: list[int] = []
    indices: list[int] = []
    while len(teams) < k:
        for t in (0, 1):  # skip what the other team already placed
            while cursors[t] < len(lists[t]) and lists[t][cursors[t]] in taken:
                cursors[t] += 1
        left = [cursors[t] < len(lists[t]) for t in (0, 1)]
        if not any(left):
            break
        if picks[0] != picks[1]:
            team = 0 if picks[0] < picks[1] else 1
        else:
            team = rng.randrange(2)
        if not left[team]:
            team = 1 - team
        index = cursors[team]
        taken.add(lists[team][index])
        teams.append(team)
        indices.append(index)
        picks[team] += 1
        cursors[team] += 1
    return teams, indices
