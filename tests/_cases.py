"""Splitting a parameter table between the default run and the slow (CI) run without losing a kind of case."""
from __future__ import annotations

import pytest


def cover_each(cases: list[tuple], *columns: int) -> list:
    """The cases as pytest params, the first case that brings a new value in any of `columns` in the default run
    and the rest marked slow: every scheme, noise type, problem ... still runs by default at least once, and the
    whole cross product runs with -m slow."""
    seen: list[set] = [set() for _ in columns]
    params = []
    for case in cases:
        new = [case[c] not in s for c, s in zip(columns, seen)]
        for c, s in zip(columns, seen):
            s.add(case[c])
        params.append(pytest.param(*case) if any(new) else pytest.param(*case, marks=pytest.mark.slow))
    return params
