"""The pairwise helper covers every pair, in fewer cases than the product, and its check can fail."""

import itertools

from tests.pairwise import covers_all_pairs, pairwise


def test_two_by_two_by_two_takes_four_cases():
    cases = pairwise([1, 2], ["a", "b"], [True, False])
    assert cases == [(1, "a", True), (1, "b", False), (2, "a", False), (2, "b", True)]


def test_larger_grids_are_covered_in_far_fewer_cases():
    factors = [["f32", "f16", "bf16"], [32, 64, 128, 256], [False, True], ["nf4", "fp4"]]
    cases = pairwise(*factors)
    assert covers_all_pairs(cases, factors)
    assert len(cases) <= 14 < len(list(itertools.product(*factors)))


def test_the_check_finds_a_missing_pair():
    factors = [[1, 2], ["a", "b"], [True, False]]
    assert not covers_all_pairs([(1, "a", True), (1, "b", False), (2, "a", False)], factors)
    assert covers_all_pairs(list(itertools.product(*factors)), factors)
