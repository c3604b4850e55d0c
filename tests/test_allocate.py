"""Rank allocation without a model: knapsack DP, the budget rule, SVD-LLM V2 ratios."""
import itertools
import math
import random

import numpy as np
import pytest

from utils.allocate import (BUDGET_TOLERANCE, budget_for_ratio, knapsack_allocation, matrix_params,
                            meet_budget, normalize_rank, params_after, params_before, ratios_to_ranks,
                            removed_fraction, type_groups, v2_ratios)
from utils.plan import largest_useful_rank, rank_for_ratio


# ---------------------------------------------------------------------------------- knapsack
def random_table(rng: random.Random, matrices: int, choices: int) -> dict:
    table = {}
    for i in range(matrices):
        costs = sorted(rng.sample(range(10, 400), choices))
        losses = sorted((rng.uniform(0, 10) for _ in range(choices)), reverse=True)
        table[f"m{i}"] = list(zip(costs, losses))
    return table


def brute_force(table: dict, budget: int) -> tuple[float, int] | None:
    """(least loss, its cost) over all choice sets within budget; None if none fits."""
    best = None
    names = list(table)
    for pick in itertools.product(*(range(len(table[n])) for n in names)):
        cost = sum(table[n][j][0] for n, j in zip(names, pick))
        if cost > budget:
            continue
        loss = sum(table[n][j][1] for n, j in zip(names, pick))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, cost)
    return best


def evaluate(table: dict, chosen: dict) -> tuple[float, int]:
    return (sum(table[n][j][1] for n, j in chosen.items()), sum(table[n][j][0] for n, j in chosen.items()))


@pytest.mark.parametrize("seed", range(8))
def test_knapsack_matches_brute_force_with_unit_one(seed):
    rng = random.Random(seed)
    table = random_table(rng, rng.randint(4, 6), rng.randint(3, 4))
    cheapest = sum(min(c for c, _ in opts) for opts in table.values())
    dearest = sum(max(c for c, _ in opts) for opts in table.values())
    for budget in (cheapest, rng.randint(cheapest, dearest), dearest):
        chosen = knapsack_allocation(table, budget, unit=1)
        loss, cost = evaluate(table, chosen)
        best_loss, _ = brute_force(table, budget)
        assert cost <= budget
        assert loss == pytest.approx(best_loss, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_rounding_never_exceeds_and_costs_at_most_n_units(seed):
    """Costs rounded up: never over budget, and at least as good as the optimum at budget - n*unit."""
    rng = random.Random(100 + seed)
    table = random_table(rng, 5, 4)
    cheapest = sum(min(c for c, _ in opts) for opts in table.values())
    dearest = sum(max(c for c, _ in opts) for opts in table.values())
    for unit in (7, 23, 61):
        budget = rng.randint(cheapest + 5 * unit, dearest)
        chosen = knapsack_allocation(table, budget, unit=unit)
        loss, cost = evaluate(table, chosen)
        assert cost <= budget
        assert loss >= brute_force(table, budget)[0] - 1e-9
        assert loss <= brute_force(table, budget - len(table) * unit)[0] + 1e-9


def test_knapsack_default_unit_is_close_to_optimal():
    rng = random.Random(7)
    table = random_table(rng, 6, 4)
    budget = (sum(min(c for c, _ in o) for o in table.values()) + sum(max(c for c, _ in o) for o in table.values())) // 2
    chosen = knapsack_allocation(table, budget)  # budget ~1.4k: unit 1, exact
    assert evaluate(table, chosen)[0] == pytest.approx(brute_force(table, budget)[0])


def test_knapsack_backtrack_uses_forward_units():
    """Costs that round differently (floor vs ceil) would break a backtrack in other units."""
    table = {"a": [(0, 5.0), (149, 1.0), (151, 0.0)], "b": [(0, 5.0), (99, 1.0), (101, 0.5)],
             "c": [(0, 4.0), (51, 0.0)]}
    chosen = knapsack_allocation(table, 300, unit=50)
    loss, cost = evaluate(table, chosen)
    assert cost <= 300
    assert loss <= brute_force(table, 300 - 3 * 50)[0] + 1e-12
    assert loss >= brute_force(table, 300)[0] - 1e-12


def test_knapsack_no_fit_raises():
    with pytest.raises(ValueError, match="no choice set fits"):
        knapsack_allocation({"a": [(10, 0.0), (5, 1.0)], "b": [(8, 0.0)]}, 12)


def test_knapsack_skips_infinite_losses():
    table = {"a": [(1, math.inf), (5, 1.0)], "b": [(1, 2.0), (4, 0.0)]}
    chosen = knapsack_allocation(table, 9, unit=1)
    assert chosen == {"a": 1, "b": 1}


def _greedy(table: dict, budget: int) -> dict:
    """From every matrix's cheapest option, take the upgrade with the most loss saved per parameter while it fits."""
    chosen = {n: 0 for n in table}
    cost = sum(opts[0][0] for opts in table.values())
    while True:
        upgrades = [((opts[chosen[n]][1] - opts[j][1]) / (opts[j][0] - opts[chosen[n]][0]), n, j)
                    for n, opts in table.items() for j in range(chosen[n] + 1, len(opts))
                    if cost + opts[j][0] - opts[chosen[n]][0] <= budget]
        if not upgrades:
            return chosen
        _, n, j = max(upgrades)
        cost += table[n][j][0] - table[n][chosen[n]][0]
        chosen[n] = j


def test_knapsack_scale_210_matrices_10_choices():
    """Llama-like size: 210 matrices x 10 choices at the default unit. Within the budget, and (as the
    docstring promises) no worse than any set costing budget - n * unit: here the same option index for
    every matrix, and a greedy by loss saved per parameter. (Its speed is not a test's business.)"""
    rng = np.random.default_rng(0)
    table = {}
    for i in range(210):
        m, n = (576, 576) if i % 7 < 4 else (1536, 576)
        ranks = np.linspace(16, largest_useful_rank(m, n), 9).astype(int)
        sig = np.sort(rng.random(min(m, n)))[::-1] ** 3
        tail = np.concatenate([np.cumsum((sig ** 2)[::-1])[::-1], [0.0]])
        table[f"l{i}"] = [(int(r) * (m + n), float(tail[r])) for r in ranks] + [(m * n, 0.0)]
    before = sum(opts[-1][0] for opts in table.values())
    budget = int(0.6 * before)
    chosen = knapsack_allocation(table, budget)
    assert set(chosen) == set(table)
    assert sum(table[n][j][0] for n, j in chosen.items()) <= budget
    loss = sum(table[n][j][1] for n, j in chosen.items())
    slack = budget - len(table) * max(1, int(0.001 * budget / len(table)))
    same = max(j for j in range(10) if sum(opts[j][0] for opts in table.values()) <= slack)
    greedy = _greedy(table, slack)
    for label, other in (("same index", {n: same for n in table}), ("greedy", greedy)):
        other_loss = sum(table[n][j][1] for n, j in other.items())
        assert loss <= other_loss * (1 + 1e-12), (label, loss, other_loss)
    assert loss < 0.99 * sum(table[n][same][1] for n in table)  # per-matrix choices pay off


# ---------------------------------------------------------------------------------- budget rule
def random_shapes(rng: random.Random, count: int) -> dict:
    shapes = {}
    for i in range(count):
        m, n = rng.choice([(64, 64), (64, 160), (160, 64), (48, 96), (32, 32)])
        shapes[f"layers.{i // 7}.{['q', 'k', 'v', 'o', 'gate', 'up', 'down'][i % 7]}"] = (m, n, rng.random() < 0.3)
    return shapes


def assert_budget_rule(shapes, ranks, ratio):
    before, after = params_before(shapes), params_after(shapes, ranks)
    assert after <= (1 - ratio) * before
    assert 1 - after / before <= ratio + BUDGET_TOLERANCE
    for name, rank in ranks.items():
        m, n = shapes[name][:2]
        if rank is not None:
            assert 1 <= rank and rank * (m + n) < m * n


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("seed", range(3))
def test_meet_budget_from_uniform_and_random_proposals(ratio, seed):
    rng = random.Random(seed)
    shapes = random_shapes(rng, 56)
    uniform = {name: rank_for_ratio(m, n, ratio) for name, (m, n, _) in shapes.items()}
    proposals = [uniform, {name: rng.randint(1, 80) for name in shapes},
                 {name: None for name in shapes}, {name: 1 for name in shapes}]
    for proposal in proposals:
        ranks = meet_budget(shapes, proposal, ratio)
        assert_budget_rule(shapes, ranks, ratio)
        assert set(ranks) == set(shapes)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_meet_budget_with_singular_values_prefers_cheap_losses(ratio):
    rng = np.random.default_rng(1)
    shapes = random_shapes(random.Random(3), 42)
    sigmas = {}
    for i, (name, (m, n, _)) in enumerate(shapes.items()):
        decay = 0.5 if i % 2 else 0.02  # odd matrices: fast-decaying spectra, cheap to cut
        sigmas[name] = np.exp(-decay * np.arange(min(m, n))) * (1 + 0.01 * rng.random())
    uniform = {name: rank_for_ratio(m, n, ratio) for name, (m, n, _) in shapes.items()}
    ranks = meet_budget(shapes, uniform, ratio, sigmas=sigmas)
    assert_budget_rule(shapes, ranks, ratio)

    def loss(assignment):
        total = 0.0
        for name, r in assignment.items():
            if r is not None:
                total += float(np.sum(np.asarray(sigmas[name])[r:] ** 2))
        return total
    assert loss(ranks) < loss(meet_budget(shapes, uniform, ratio))  # the proportional fix


def test_meet_budget_keeps_useless_ranks_dense():
    shapes = {"a": (64, 64), "b": (64, 64), "tiny": (1, 1), "thin": (2, 64)}
    # rank 40 does not shrink a 64 x 64 matrix (useful ranks stop at 31); a 2 x 64 matrix has only
    # rank 1 (66 < 128), so 5 means dense; a 1 x 1 matrix has no useful rank at all
    ranks = meet_budget(shapes, {"a": 40, "b": 10, "tiny": 1, "thin": 5}, 0.2, tolerance=0.02)
    assert ranks["tiny"] is None
    assert ranks["thin"] in (None, 1)
    for name, rank in ranks.items():
        m, n = shapes[name]
        assert rank is None or rank * (m + n) < m * n
    before, after = params_before(shapes), params_after(shapes, ranks)
    assert (1 - 0.2 - 0.02) * before <= after <= (1 - 0.2) * before


def test_normalize_rank_clamps_and_makes_useless_ranks_dense():
    assert normalize_rank((64, 64), 31) == 31 and largest_useful_rank(64, 64) == 31
    assert normalize_rank((64, 64), 32) is None  # 32 * 128 = 64 * 64: not smaller
    assert normalize_rank((64, 64), 0) == 1
    assert normalize_rank((64, 64), None) is None
    assert normalize_rank((1, 1), 1) is None
    assert ratios_to_ranks({"a": (1, 3), "b": (64, 64)}, {"a": 0.5, "b": 0.0}) == {"a": None, "b": None}


def test_meet_budget_raises_when_impossible():
    shapes = {"a": (64, 64)}
    with pytest.raises(ValueError, match="cannot remove"):
        meet_budget(shapes, {"a": 10}, 0.99)
    with pytest.raises(ValueError, match="too coarse"):
        meet_budget({"a": (8, 8)}, {"a": 2}, 0.33, tolerance=0.001)


def test_budget_helpers_count_bias():
    shapes = {"a": (10, 20, True), "b": (5, 5)}
    assert params_before(shapes) == 200 + 10 + 25
    assert params_after(shapes, {"a": 2, "b": None}) == 2 * 30 + 10 + 25
    assert matrix_params((10, 20, False), 3) == 90
    assert budget_for_ratio(shapes, 0.5) == math.floor(0.5 * 235)
    assert removed_fraction(shapes, {"a": None, "b": None}) == 0.0


# ---------------------------------------------------------------------------------- SVD-LLM V2
def v2_setup(seed=0, layers=12):
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{i}.self_attn.{t}" for i in range(layers) for t in ("q_proj", "o_proj")]
    # o_proj losses span orders of magnitude and dip below e: the case that broke a plain formula
    losses = {n: float(rng.uniform(5, 50) if n.endswith("q_proj") else 10 ** rng.uniform(-2, 3)) for n in names}
    return names, losses


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("max_shift", [0.15, 0.05, None])
def test_v2_ratios_average_bounded(ratio, max_shift):
    names, losses = v2_setup()
    groups = type_groups(names)
    assert set(groups) == {"q_proj", "o_proj"}
    ratios = v2_ratios(groups, losses, ratio, max_shift)
    assert set(ratios) == set(names)
    for members in groups.values():
        values = np.array([ratios[n] for n in members])
        assert values.mean() == pytest.approx(ratio, abs=1e-9)
        assert (values >= 0).all() and (values < 1).all()
        if max_shift is not None:
            assert (np.abs(values - ratio) <= max_shift + 1e-12).all()


def test_v2_ratios_larger_loss_is_compressed_less():
    names, losses = v2_setup(1)
    ratios = v2_ratios(type_groups(names), losses, 0.4, None)
    for group in type_groups(names).values():
        order = sorted(group, key=lambda n: losses[n])
        values = [ratios[n] for n in order]
        assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))
        assert values[0] > values[-1]


def test_v2_ratios_paper_formula_in_paper_regime():
    """Losses ~1e7 (the paper's scale): the formula is applied as written, no clamp binds."""
    losses = {"a": 1e7, "b": 3e7, "c": 7e7}
    ratios = v2_ratios({"q": ["a", "b", "c"]}, losses, 0.5)
    w = {k: 1 / math.log(v) for k, v in losses.items()}
    for k in losses:
        assert ratios[k] == pytest.approx(3 * 0.5 * w[k] / sum(w.values()), rel=1e-12)
    assert max(abs(r - 0.5) for r in ratios.values()) < 0.05


def test_v2_ratios_units_do_not_matter_below_the_floor():
    losses = {"a": 0.5, "b": 2.0, "c": 40.0}
    scaled = {k: v * 1000 for k, v in losses.items()}
    one = v2_ratios({"g": list(losses)}, losses, 0.4, None)
    two = v2_ratios({"g": list(losses)}, scaled, 0.4, None)
    for k in losses:
        assert one[k] == pytest.approx(two[k], abs=1e-12)
        assert 0 < one[k] < 1


def test_v2_ratios_degenerate_groups():
    ratios = v2_ratios({"a": ["x"], "b": ["y", "z"], "c": ["u", "w"]},
                       {"x": 3.0, "y": 0.0, "z": 0.0, "u": 0.0, "w": 5.0}, 0.3)
    assert ratios["x"] == ratios["y"] == ratios["z"] == 0.3
    assert ratios["u"] + ratios["w"] == pytest.approx(0.6)
    with pytest.raises(ValueError):
        v2_ratios({"a": ["x", "y"]}, {"x": -1.0, "y": 2.0}, 0.3)


def test_ratios_to_ranks_then_budget():
    shapes = {f"l{i}.{t}": (64, 64) if t == "o" else (160, 64) for i in range(8) for t in ("o", "up")}
    rng = np.random.default_rng(2)
    losses = {n: float(10 ** rng.uniform(-1, 4)) for n in shapes}
    ratios = v2_ratios(type_groups(shapes), losses, 0.4)
    ratios[next(iter(shapes))] = 0.0  # ratio 0: dense
    ranks = ratios_to_ranks(shapes, ratios)
    assert ranks[next(iter(shapes))] is None
    for name, rank in ranks.items():
        if ratios[name] > 0:
            assert rank == rank_for_ratio(*shapes[name], ratios[name])
    assert_budget_rule(shapes, meet_budget(shapes, ranks, 0.4), 0.4)
