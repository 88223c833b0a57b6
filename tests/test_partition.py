"""The balanced partition is the exact optimum, checked against brute force."""

import itertools
import random

import pytest

from lfnnify.surgery.splitting import balanced_partition


def _max_cost(atoms, cut_costs, cuts):
    edges = [0] + [c + 1 for c in cuts] + [len(atoms)]
    worst = 0.0
    for a, b in zip(edges, edges[1:]):
        extra = cut_costs[b - 1] if b < len(atoms) else 0.0
        worst = max(worst, sum(atoms[a:b]) + extra)
    return worst


@pytest.mark.parametrize("seed", range(20))
def test_partition_is_optimal(seed):
    rng = random.Random(seed)
    m = rng.randint(2, 9)
    atoms = [rng.uniform(0, 10) for _ in range(m)]
    cut_costs = [rng.uniform(0, 3) for _ in range(m - 1)]
    for k in range(1, m + 1):
        cuts = balanced_partition(atoms, cut_costs, k)
        assert len(cuts) == k - 1 and cuts == sorted(set(cuts))
        best = min(_max_cost(atoms, cut_costs, c) for c in itertools.combinations(range(m - 1), k - 1))
        assert _max_cost(atoms, cut_costs, cuts) == pytest.approx(best)


def test_partition_rejects_impossible_k():
    with pytest.raises(ValueError, match="between 1 and 3"):
        balanced_partition([1, 2, 3], [0, 0], 4)
