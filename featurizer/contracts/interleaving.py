"""Team-draft interleaving: one list merged from two rankings, each item credited to the ranking that put it there.

Radlinski, Kurup & Joachims, "How does clickthrough data reflect retrieval quality?" (CIKM 2008). In
each round the two teams each pick once; a coin decides which picks first; a team picks its
highest-ranked item not yet in the list. A click on an item is a vote for its team. Shared by the
service (which would build the list for an interleaved arm) and `semrank ab`'s analysis and
simulations, so that both draft the same list for the same request: the coins are a hash of
(salt, request_id, round), never a random generator's state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

TEAM_A, TEAM_B = "A", "B"


def coin(salt: str, request_id: str, round_: int) -> bool:
    """True: team A picks first in this round. Deterministic, about even over requests."""
    h = hashlib.blake2b(f"{salt}\x1f{request_id}\x1f{round_}".encode(), digest_size=8).digest()
    return h[0] & 1 == 0


def team_draft(a: Sequence[str], b: Sequence[str], salt: str, request_id: str,
               k: int | None = None) -> tuple[list[str], list[str]]:
    """The interleaved list of `a` and `b` (each best first, ids unique within each) and each item's
    team, at most `k` items (None: until both are used up). An item both rank goes to the team that
    picks it first; the other team then picks its next one."""
    limit = len(set(a) | set(b)) if k is None else min(k, len(set(a) | set(b)))
    out: list[str] = []
    teams: list[str] = []
    taken: set[str] = set()
    ia = ib = 0
    round_ = 0
    while len(out) < limit:
        order = (TEAM_A, TEAM_B) if coin(salt, request_id, round_) else (TEAM_B, TEAM_A)
        for team in order:
            if len(out) >= limit:
                break
            ranking, i = (a, ia) if team == TEAM_A else (b, ib)
            while i < len(ranking) and ranking[i] in taken:
                i += 1
            if i < len(ranking):
                out.append(ranking[i])
                teams.append(team)
                taken.add(ranking[i])
                i += 1
            if team == TEAM_A:
                ia = i
            else:
                ib = i
        round_ += 1
    return out, teams
