"""The sweep engine's planning rules, without a model: how rows are grouped into forwards
(``group_by_start``) and which writes can reach the readout (``reaches_readout``)."""
from __future__ import annotations

import random

import torch

from interpkit.engine.plan import ForwardCost, group_by_start, reaches_readout

T, L = 12, 8


def random_items(seed: int, n: int = 60) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(3, T), rng.randrange(0, L), rng.choice([1, 1, 4])) for _ in range(n)]


def plan_cost(groups, items, cost: ForwardCost) -> float:
    """What the cost model charges for a grouping (each group one forward from its own p0, l0)."""
    return sum(cost.of(sum(items[i][2] for i in idx), T - p0, L - l0) for p0, l0, idx in groups)


def test_every_item_once_within_max_rows_and_starting_where_its_rows_start():
    for seed in range(5):
        items = random_items(seed)
        groups = group_by_start(items, T, L, max_rows=10, cost=ForwardCost(40, 8))
        seen = sorted(i for _, _, idx in groups for i in idx)
        assert seen == list(range(len(items)))
        for p0, l0, idx in groups:
            assert sum(items[i][2] for i in idx) <= 10
            assert p0 == min(items[i][0] for i in idx) and l0 == min(items[i][1] for i in idx)


def test_fixed_costs_decide_between_exact_starts_and_few_forwards():
    items = random_items(7)
    exact = group_by_start(items, T, L, max_rows=1000, cost=ForwardCost(0, 0))
    assert len(exact) == len({(p, l) for p, l, _ in items})            # one forward per distinct start
    assert all(len({(items[i][0], items[i][1]) for i in idx}) == 1 for _, _, idx in exact)
    fewest = group_by_start(items, T, L, max_rows=1000, cost=ForwardCost(1e12, 0))
    assert len(fewest) == 1


def test_the_chosen_grouping_costs_no_more_than_the_simple_ones():
    cost = ForwardCost(150, 25)
    for seed in range(5):
        items = random_items(seed)
        best = plan_cost(group_by_start(items, T, L, 16, cost), items, cost)
        for other in (ForwardCost(0, 0), ForwardCost(1e12, 0), ForwardCost(20, 2), ForwardCost(1000, 200)):
            assert best <= plan_cost(group_by_start(items, T, L, 16, other), items, cost) + 1e-6


def test_an_oversized_start_is_split_evenly():
    items = [(0, 0, 1)] * 576
    groups = group_by_start(items, T, L, max_rows=512, cost=ForwardCost())
    assert sorted(len(idx) for _, _, idx in groups) == [288, 288]


def test_writes_reach_the_readout_only_from_the_first_difference_and_at_the_last_layer_where_logits_are_read():
    first = torch.tensor([2, 5])
    mid = reaches_readout(first, 3, "mlp_out", L, T)
    assert mid[0].tolist() == [p >= 2 for p in range(T)] and mid[1].tolist() == [p >= 5 for p in range(T)]
    last = reaches_readout(first, L - 1, "mlp_out", L, T, n_read=3)       # a two-token answer: 3 logits read
    assert last[0].tolist() == [p >= T - 3 for p in range(T)]
    assert reaches_readout(first, L - 1, "resid_pre", L, T)[0].tolist() == mid[0].tolist()   # feeds later tokens
    assert reaches_readout(first, L, "unembed_in", L, T)[0].tolist() == [p == T - 1 for p in range(T)]
    assert reaches_readout(first, 3, "mlp_out", L, T, substitution=False).all()             # deletion: anywhere
