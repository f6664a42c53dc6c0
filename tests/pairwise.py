"""Pairwise covering sets for parametrized test grids: every value of every factor meets every value of every
other factor in at least one case, in far fewer cases than the full product (2x2x2: 4 of 8).

Used where each case costs a compilation and the code paths depend on the factors one or two at a time.
"""

import itertools
from typing import Sequence


def _pairs(case: tuple) -> set:
    return {((i, case[i]), (j, case[j])) for i, j in itertools.combinations(range(len(case)), 2)}


def covers_all_pairs(cases: Sequence[tuple], factors: Sequence[Sequence]) -> bool:
    """Whether ``cases`` hold every pair of values of every two of ``factors``."""
    seen = set().union(*(_pairs(tuple(c)) for c in cases)) if cases else set()
    return all(
        ((i, a), (j, b)) in seen
        for i, j in itertools.combinations(range(len(factors)), 2)
        for a in factors[i]
        for b in factors[j]
    )


def pairwise(*factors: Sequence) -> list[tuple]:
    """A deterministic greedy pairwise covering set of the product of ``factors``.

    Each new case starts from the first pair not yet covered and fills the other factors with the value
    that covers the most new pairs (the first such value on ties).

    Example:
      >>> pairwise([1, 2], ["a", "b"], [True, False])
      [(1, 'a', True), (1, 'b', False), (2, 'a', False), (2, 'b', True)]
    """
    factors = [list(f) for f in factors]
    uncovered = {
        ((i, a), (j, b))
        for i, j in itertools.combinations(range(len(factors)), 2)
        for a in factors[i]
        for b in factors[j]
    }
    order = {v: k for k, v in enumerate(sorted(uncovered, key=repr))}
    cases = []
    while uncovered:
        (i, a), (j, b) = min(uncovered, key=order.__getitem__)
        case: list = [None] * len(factors)
        case[i], case[j] = a, b
        for k in range(len(factors)):
            if case[k] is None:

                def gain(value, k=k):
                    trial = {((k, value), (m, case[m])) if k < m else ((m, case[m]), (k, value))
                             for m in range(len(factors)) if m != k and case[m] is not None}
                    return len(trial & uncovered)

                case[k] = max(factors[k], key=gain)
        case = tuple(case)
        uncovered -= _pairs(case)
        cases.append(case)
    assert covers_all_pairs(cases, factors)
    return cases
