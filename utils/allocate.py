"""Rank allocation across matrices: pure functions over shapes, losses and budgets (no models).

The budget rule every allocation obeys. `ratio` is the fraction of the target matrices'
parameters removed overall, counted with real costs: r (m + n) for a low-rank matrix, m n for a
dense one (plus m for a bias, when the shape says there is one). An allocation

  * never removes less than asked:  params_after <= floor((1 - ratio) * params_before),
  * removes at most `tolerance` (0.5%) of params_before more than that,
  * never gives a matrix a rank that does not make it smaller: r (m + n) >= m n means dense.

Shapes are dicts name -> (m, n) or (m, n, has_bias) (utils.plan's Shapes); ranks are dicts
name -> rank, None meaning dense (utils.plan.ModulePlan.rank's convention).

What is here:
  knapsack_allocation   exact multiple-choice knapsack (one (cost, loss) choice per matrix).
  meet_budget           move a proposed rank assignment onto the budget (greedy).
  v2_ratios             SVD-LLM V2's per-matrix ratios from truncation losses, made safe.
  ratios_to_ranks       per-matrix ratios -> ranks with utils.plan.rank_for_ratio.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from utils.plan import largest_useful_rank, rank_for_ratio

BUDGET_TOLERANCE = 0.005  # an allocation removes at most this fraction of params_before beyond `ratio`
KNAPSACK_ROUNDING = 0.001  # default unit: rounding costs up loses at most this fraction of the budget
MAX_DP_CELLS = 400_000_000  # back-pointer table entries (1 byte each for <= 256 choices)
MAX_RATIO = 1.0 - 1e-9  # ratios are clamped to [0, 1): 1 would mean rank 0
V2_MAX_SHIFT = 0.15  # default bound on |r_i - R| in v2_ratios (see there)
V2_LOG_FLOOR = 16.0  # default smallest log-loss of a group in v2_ratios (see there)


# ---------------------------------------------------------------------------------- costs
def _dims(shape: Sequence) -> tuple[int, int, int]:
    """(m, n, bias parameters) of a (m, n) or (m, n, has_bias) shape."""
    if len(shape) == 2:
        m, n = shape
        bias = False
    elif len(shape) == 3:
        m, n, bias = shape
    else:
        raise ValueError(f"a shape is (out, in) or (out, in, has_bias), got {tuple(shape)!r}")
    m, n = int(m), int(n)
    if m < 1 or n < 1:
        raise ValueError(f"a matrix shape needs positive sizes, got {m} x {n}")
    return m, n, (m if bias else 0)


def matrix_params(shape: Sequence, rank: int | None) -> int:
    """Parameters of one matrix kept at `rank` (None: dense), bias included when it has one."""
    m, n, extra = _dims(shape)
    if rank is None:
        return m * n + extra
    return int(rank) * (m + n) + extra


def params_before(shapes: Mapping[str, Sequence]) -> int:
    return sum(matrix_params(shape, None) for shape in shapes.values())


def params_after(shapes: Mapping[str, Sequence], ranks: Mapping[str, int | None]) -> int:
    return sum(matrix_params(shape, ranks.get(name)) for name, shape in shapes.items())


def removed_fraction(shapes: Mapping[str, Sequence], ranks: Mapping[str, int | None]) -> float:
    before = params_before(shapes)
    return 1.0 - params_after(shapes, ranks) / before if before else 0.0


def budget_for_ratio(shapes: Mapping[str, Sequence], ratio: float) -> int:
    """The most parameters the matrices may keep: floor((1 - ratio) * params_before)."""
    _check_ratio(ratio)
    return math.floor((1.0 - ratio) * params_before(shapes))


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")


def normalize_rank(shape: Sequence, rank: int | None) -> int | None:
    """Clamp a rank to [1, largest_useful_rank]; a rank that would not shrink the matrix
    (or None) is dense (None)."""
    m, n, _ = _dims(shape)
    if rank is None:
        return None
    top = largest_useful_rank(m, n)
    if top < 1 or int(rank) > top:
        return None
    return max(1, int(rank))


# ---------------------------------------------------------------------------------- knapsack
def knapsack_allocation(options: Mapping[str, Sequence[tuple[int, float]]], budget: int,
                        unit: int | None = None) -> dict[str, int]:
    """Choose one (cost, loss) option per matrix minimising the summed loss, summed cost <= budget.

    Returns name -> index of the chosen option in that matrix's list. Costs are parameters
    (ints >= 0), losses any finite floats (an infinite loss marks an option unavailable).

    Method: dynamic programming over the budget axis (numpy, one vectorised pass per option).
    Each matrix's cheapest option is taken as its base; the DP runs over the excess costs, in
    units of `unit` parameters, each excess rounded UP to whole units, and over
    floor((budget - base) / unit) units. So the chosen set's true cost never exceeds `budget`,
    and its loss is at most that of the best set costing budget - n * unit (n matrices): rounding
    costs at most n * unit of the budget. The default unit, floor(0.001 * budget / n) (at least
    1), makes that under 0.1% of the budget; the DP then has about 1000 n units (210 matrices:
    ~210,000 units, about a second). With unit=1 the answer is exactly optimal. The backtrack
    walks the same rounded units as the forward pass, so it ends at 0 units by construction.

    Raises ValueError if even the cheapest option of every matrix does not fit, or if the DP
    table would exceed MAX_DP_CELLS (pass a coarser unit).
    """
    names = list(options)
    if not names:
        return {}
    budget = int(budget)
    costs: list[np.ndarray] = []
    losses: list[np.ndarray] = []
    for name in names:
        choices = list(options[name])
        if not choices:
            raise ValueError(f"knapsack: {name} has no options")
        cost = np.array([int(c) for c, _ in choices], dtype=np.int64)
        loss = np.array([float(value) for _, value in choices], dtype=np.float64)
        if (cost < 0).any():
            raise ValueError(f"knapsack: {name} has a negative cost")
        if np.isnan(loss).any() or (loss == -np.inf).any():
            raise ValueError(f"knapsack: {name} has a NaN or -inf loss")
        loss = np.where(np.isposinf(loss), np.inf, loss)
        if not np.isfinite(loss).any():
            raise ValueError(f"knapsack: {name} has no option with a finite loss")
        cost = np.where(np.isfinite(loss), cost, np.iinfo(np.int64).max // 4)  # never chosen
        costs.append(cost)
        losses.append(loss)

    base_costs = [int(c.min()) for c in costs]
    base = sum(base_costs)
    if base > budget:
        raise ValueError(f"knapsack: no choice set fits: the cheapest option of every matrix costs "
                         f"{base} parameters together, above the budget of {budget}")
    n = len(names)
    if unit is None:
        unit = max(1, int(KNAPSACK_ROUNDING * budget // n))
    unit = int(unit)
    if unit < 1:
        raise ValueError(f"knapsack: unit must be at least 1, got {unit}")
    units = [-(-(c - b) // unit) for c, b in zip(costs, base_costs)]  # ceil: never under-count
    capacity = (budget - base) // unit
    finite_units = [int(u[np.isfinite(l)].max()) for u, l in zip(units, losses)]
    capacity = int(min(capacity, sum(finite_units)))
    if n * (capacity + 1) > MAX_DP_CELLS:
        raise ValueError(f"knapsack: {n} matrices x {capacity + 1} budget units is too large a table; "
                         f"pass a coarser unit (now {unit} parameters)")
    width = max(len(c) for c in costs)
    back = np.zeros((n, capacity + 1), dtype=np.uint8 if width <= 256 else np.int32)

    dp = np.full(capacity + 1, np.inf)
    dp[0] = 0.0
    for i in range(n):
        new = np.full(capacity + 1, np.inf)
        arg = back[i]
        for j in range(len(costs[i])):
            u = int(units[i][j])
            if u > capacity or not np.isfinite(losses[i][j]):
                continue
            candidate = dp[:capacity + 1 - u] + losses[i][j]
            target = new[u:]
            better = candidate < target
            target[better] = candidate[better]
            arg[u:][better] = j
        dp = new

    end = int(np.argmin(dp))  # least loss; among ties the fewest units
    if not np.isfinite(dp[end]):
        raise ValueError("knapsack: no choice set fits the budget")
    chosen: dict[str, int] = {}
    used = end
    for i in range(n - 1, -1, -1):
        j = int(back[i, used])
        chosen[names[i]] = j
        used -= int(units[i][j])
    if used != 0:  # the backtrack walks the forward pass's own units: cannot happen
        raise AssertionError(f"knapsack backtrack ended at {used} units, not 0")
    return {name: chosen[name] for name in names}


# ---------------------------------------------------------------------------------- budget helper
class _Chain:
    """One matrix's levels: 1..top are ranks, top + 1 is dense."""

    __slots__ = ("name", "m", "n", "extra", "top", "level", "proposed", "tail")

    def __init__(self, name: str, shape: Sequence, rank: int | None, sigmas: Sequence[float] | None):
        self.name = name
        self.m, self.n, self.extra = _dims(shape)
        self.top = max(0, largest_useful_rank(self.m, self.n))
        rank = normalize_rank(shape, rank)
        self.level = self.top + 1 if rank is None else rank
        self.proposed = self.level
        self.tail = None
        if sigmas is not None:
            s = np.asarray(sigmas, dtype=np.float64).reshape(-1)
            if not np.isfinite(s).all():
                raise ValueError(f"meet_budget: {name} has non-finite singular values")
            energy = np.sort(np.abs(s))[::-1] ** 2
            # tail[l] = sum_{k >= l} sigma_k^2 (0-based): the squared loss of keeping rank l
            self.tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])

    def cost(self, level: int) -> int:
        if level > self.top:
            return self.m * self.n + self.extra
        return level * (self.m + self.n) + self.extra

    def loss(self, level: int) -> float:
        if level > self.top:
            return 0.0
        return float(self.tail[min(level, len(self.tail) - 1)])

    def rank(self) -> int | None:
        return None if self.level > self.top else self.level

    def down_key(self) -> tuple:
        """Smaller = removed first: loss added per parameter saved by going one level down."""
        saved = self.cost(self.level) - self.cost(self.level - 1)
        if self.tail is not None:
            return (0, (self.loss(self.level - 1) - self.loss(self.level)) / saved, self.name)
        pinned = self.proposed > self.top  # without losses, a planned-dense matrix moves last
        return (int(pinned), -self.level / self.proposed, self.name)

    def up_key(self) -> tuple:
        """Smaller = added first: loss removed per parameter spent going one level up."""
        spent = self.cost(self.level + 1) - self.cost(self.level)
        if self.tail is not None:
            return (0, -(self.loss(self.level) - self.loss(self.level + 1)) / spent, self.name)
        pinned = self.proposed > self.top
        return (int(pinned), self.level / self.proposed, self.name)


def meet_budget(shapes: Mapping[str, Sequence], ranks: Mapping[str, int | None], ratio: float, *,
                sigmas: Mapping[str, Sequence[float]] | None = None,
                tolerance: float = BUDGET_TOLERANCE) -> dict[str, int | None]:
    """Adjust a proposed rank assignment so that it meets the budget rule exactly.

    shapes: name -> (m, n) or (m, n, has_bias); ranks: name -> proposed rank or None (dense);
    names missing from `ranks` are proposed dense. Proposed ranks are first clamped to
    [1, largest_useful_rank]; above that the matrix is dense. Then, one rank at a time:

      1. while the matrices keep more than floor((1 - ratio) * params_before) parameters, lower
         the matrix whose next rank costs the least loss per parameter saved;
      2. while a rank can be added without breaking that bound, add the one that removes the
         most loss per parameter spent (this fills the slack step 1 or the proposal left).

    A rank raised past largest_useful_rank makes the matrix dense, and a dense matrix lowered
    goes to largest_useful_rank. The loss is the squared truncation loss sum_{i>r} sigma_i^2 of
    `sigmas` (name -> whitened singular values) when given. Without sigmas the moves keep the
    proposal's proportions (the matrix furthest above its proposed rank, relatively, is lowered
    first, the one furthest below raised first), and a matrix proposed dense is only lowered once
    every other one is at rank 1.

    Returns name -> rank or None (dense) with params_after <= (1 - ratio) params_before and
    removed fraction <= ratio + tolerance. Raises ValueError when that cannot be met (every matrix
    at rank 1 still keeps too much, or the steps are too coarse for the tolerance).
    """
    _check_ratio(ratio)
    chains = [_Chain(name, shape, ranks.get(name),
                     None if sigmas is None else sigmas.get(name))
              for name, shape in shapes.items()]
    if sigmas is not None:
        missing = [c.name for c in chains if c.tail is None]
        if missing:
            raise ValueError(f"meet_budget: no singular values for {missing[0]!r}")
    before = params_before(shapes)
    target = math.floor((1.0 - ratio) * before)
    total = sum(c.cost(c.level) for c in chains)

    heap = [(c.down_key(), i, c.level) for i, c in enumerate(chains) if c.level > 1]
    heapq.heapify(heap)
    while total > target:
        if not heap:
            raise ValueError(f"meet_budget: cannot remove {ratio:.4f} of the parameters: at rank 1 "
                             f"everywhere the matrices still keep {total} of {before} (budget {target})")
        _, i, level = heapq.heappop(heap)
        c = chains[i]
        if c.level != level:
            continue
        total -= c.cost(level) - c.cost(level - 1)
        c.level = level - 1
        if c.level > 1:
            heapq.heappush(heap, (c.down_key(), i, c.level))

    heap = [(c.up_key(), i, c.level) for i, c in enumerate(chains) if c.level <= c.top]
    heapq.heapify(heap)
    while heap:
        _, i, level = heapq.heappop(heap)
        c = chains[i]
        if c.level != level:
            continue
        step = c.cost(level + 1) - c.cost(level)
        if total + step > target:  # never fits later either: total only grows
            continue
        total += step
        c.level = level + 1
        if c.level <= c.top:
            heapq.heappush(heap, (c.up_key(), i, c.level))

    floor_after = (1.0 - ratio - tolerance) * before
    if total < floor_after:
        raise ValueError(f"meet_budget: the nearest assignment found removes {1 - total / before:.4f}, "
                         f"more than ratio {ratio} + tolerance {tolerance}: the rank steps of these "
                         f"matrices are too coarse for that tolerance")
    return {c.name: c.rank() for c in chains}


fill_budget = meet_budget  # the same helper under the name the allocation plans use


# ---------------------------------------------------------------------------------- SVD-LLM V2
def type_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Group module names by their last dotted component (q_proj, k_proj, ..., down_proj)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return groups


def v2_ratios(groups: Mapping[str, Sequence[str]], losses: Mapping[str, float], ratio: float,
              max_shift: float | None = V2_MAX_SHIFT, *,
              log_floor: float = V2_LOG_FLOOR) -> dict[str, float]:
    """SVD-LLM V2's heterogeneous compression ratios, per matrix, from truncation losses.

    groups: type -> names of same-type matrices (q, k, v, o, gate, up, down; see type_groups);
    losses: name -> L_i, the theoretical truncation loss ||W X - W' X||_F of the matrix at the
    uniform ratio (sqrt of the summed squared whitened singular values past the uniform rank);
    ratio: R. Within each group of n_G matrices (paper: Algorithm 1 and Section 3.1):

        w_i = 1 / log L_i,    r_i = n_G * R * w_i / sum_j w_j,

    so a matrix with a larger loss is compressed less, and the group averages to R.

    Guard (the formula is not unit-free). log L depends on the units of L (calibration token
    count, activation scale): the paper's losses are about 1e7 (LLaMA-3 8B, Fig. 3), log L about
    16-18, where 1/log L varies by a few percent and the ratios move gently. Losses near or below
    e make log L tiny, zero or negative: r_i blows up or flips sign (this cut one o_proj to rank
    2). So when a group's smallest loss is below e^log_floor, the whole group is rescaled (a
    change of units, the same factor for all) so that its smallest loss is e^log_floor: ordering
    and log-differences are kept, and the spread is that of the paper's regime. Losses already
    above e^log_floor are used as they are. A zero loss counts as the group's smallest positive
    one (a group of zeros gets R throughout).

    Then each r_i is clamped to [max(0, R - max_shift), min(R + max_shift, 1)) (None: [0, 1)) and
    the group is shifted by a common offset (found by bisection) so that it still averages to R.
    max_shift defaults to 0.15: in the paper's regime the shifts are a few hundredths and it never
    binds; it only stops an outlier loss from gutting a matrix (at R = 0.4 every matrix keeps
    between 45% and 75% of its parameters, i.e. a rank within about +-25% of the uniform one).

    Returns name -> ratio in [0, 1) for every name of every group.
    """
    _check_ratio(ratio)
    if not log_floor > 0:
        raise ValueError(f"v2_ratios: log_floor must be positive, got {log_floor}")
    if max_shift is not None and max_shift < 0:
        raise ValueError(f"max_shift must be >= 0 or None, got {max_shift}")
    low = 0.0 if max_shift is None else max(0.0, ratio - max_shift)
    high = MAX_RATIO if max_shift is None else min(ratio + max_shift, MAX_RATIO)
    out: dict[str, float] = {}
    for group, names in groups.items():
        names = list(names)
        if not names:
            continue
        values = np.array([float(losses[name]) for name in names], dtype=np.float64)
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"v2_ratios: group {group!r} has a negative or non-finite truncation loss")
        positive = values[values > 0]
        if len(names) == 1 or positive.size == 0 or np.ptp(values) == 0:
            out.update({name: float(ratio) for name in names})
            continue
        values = np.where(values > 0, values, positive.min())
        logs = np.log(values)
        logs = logs + max(0.0, log_floor - float(logs.min()))  # rescale units: min log = log_floor
        weights = 1.0 / logs
        raw = len(names) * ratio * weights / weights.sum()
        out.update(zip(names, (float(r) for r in _clip_to_mean(raw, low, high, ratio))))
    return out


def _clip_to_mean(raw: np.ndarray, low: float, high: float, mean: float) -> np.ndarray:
    """clip(raw + t, low, high) with the offset t that makes its mean `mean` (low <= mean <= high)."""
    clipped = np.clip(raw, low, high)
    if abs(clipped.mean() - mean) <= 1e-15:
        return clipped
    lo_t, hi_t = low - raw.max(), high - raw.min()  # all at low / all at high
    for _ in range(200):
        t = 0.5 * (lo_t + hi_t)
        if np.clip(raw + t, low, high).mean() < mean:
            lo_t = t
        else:
            hi_t = t
        if hi_t - lo_t <= 1e-15:
            break
    return np.clip(raw + 0.5 * (lo_t + hi_t), low, high)


def ratios_to_ranks(shapes: Mapping[str, Sequence], ratios: Mapping[str, float]) -> dict[str, int | None]:
    """Per-matrix ratios -> ranks by utils.plan.rank_for_ratio; a ratio <= 0, or a rank that would
    not shrink the matrix, is dense (None). Follow with meet_budget to land on the budget."""
    ranks: dict[str, int | None] = {}
    for name, shape in shapes.items():
        m, n, _ = _dims(shape)
        r = float(ratios[name])
        if not math.isfinite(r):
            raise ValueError(f"ratios_to_ranks: {name} has ratio {r}")
        ranks[name] = None if r <= 0.0 else rank_for_ratio(m, n, min(r, MAX_RATIO))
    return ranks


# ---------------------------------------------------------------------------------- ASVD's search
def sensitivity_order(values: Mapping[str, Mapping[float, float]]) -> list[tuple[str, float, float]]:
    """ASVD's sorted_sensitive_list: every (name, kept fraction p < 1, value), most sensitive first
    (largest value), ties broken by name then p so the order is reproducible. A non-finite value is
    an error naming the matrix (ASVD would silently sort a NaN somewhere and use it)."""
    entries = []
    for name, row in values.items():
        for p, value in row.items():
            if not math.isfinite(float(value)):
                raise ValueError(f"sensitivity of {name} at kept fraction {p:g} is {value}: not finite")
            if float(p) < 1.0:
                entries.append((name, float(p), float(value)))
    return sorted(entries, key=lambda e: (-e[2], e[0], e[1]))


def kept_at_threshold(order: Sequence[tuple[str, float, float]], names: Iterable[str],
                      threshold: int) -> dict[str, float]:
    """ASVD's layers_min_ratio for index `threshold`: the choices order[threshold:] (the less
    sensitive ones) are accepted and each matrix takes its smallest accepted kept fraction;
    one with none accepted stays dense (1.0). threshold = len(order): everything dense."""
    kept = {name: 1.0 for name in names}
    for name, p, _ in order[threshold:]:
        if p < kept[name]:
            kept[name] = p
    return kept


def kept_to_ranks(shapes: Mapping[str, Sequence], kept: Mapping[str, float]) -> dict[str, int | None]:
    """Kept fractions -> ranks (rank_for_ratio(1 - p)); 1.0, or a rank that would not shrink, is dense."""
    ranks = {}
    for name, shape in shapes.items():
        m, n, _ = _dims(shape)
        p = float(kept[name])
        ranks[name] = None if p >= 1.0 else rank_for_ratio(m, n, 1.0 - p)
    return ranks


def threshold_search(count: int, feasible) -> tuple[int, dict]:
    """The smallest index t in [0, count] with feasible(t) true, by bisection, assuming feasibility
    grows with t (more of the sorted choices refused = less compression); count must be feasible.
    Fixes ASVD's defect: its loop ends on the last midpoint it tried, which may be infeasible; here
    the answer is the lower end of the final bracket, whose feasibility was evaluated (each index is
    evaluated at most once; the values are returned for the record, index -> feasible)."""
    seen: dict[int, bool] = {}

    def check(t: int) -> bool:
        if t not in seen:
            seen[t] = bool(feasible(t))
        return seen[t]

    low, high = 0, count  # invariant: high is feasible
    if not check(high):
        raise ValueError("threshold_search: even refusing every choice is not feasible")
    while low < high:
        mid = (low + high) // 2
        if check(mid):
            high = mid
        else:
            low = mid + 1
    return high, seen


def asvd_ranks(shapes: Mapping[str, Sequence], values: Mapping[str, Mapping[float, float]], ratio: float, *,
               sigmas: Mapping[str, Sequence[float]] | None = None,
               tolerance: float = BUDGET_TOLERANCE) -> tuple[dict[str, int | None], dict]:
    """ASVD's binary search to a parameter budget, under the budget rule: the smallest threshold of
    the sensitivity order whose ranks (real costs r (m + n)) fit floor((1 - ratio) params_before),
    then meet_budget fills what the coarse kept-fraction grid left (it never goes over). Returns
    ranks and a record (threshold, choices, removed before the fill)."""
    order = sensitivity_order(values)
    budget = budget_for_ratio(shapes, ratio)
    names = list(shapes)

    def fits(t: int) -> bool:
        return params_after(shapes, kept_to_ranks(shapes, kept_at_threshold(order, names, t))) <= budget

    if not fits(0):
        raise ValueError(f"asvd search: even every matrix at its smallest candidate keeps more than "
                         f"{1 - ratio:.4f} of the parameters; add smaller --sensitivity_ratios")
    # feasibility shrinks with t here (fewer accepted = more kept), so search on the reversed axis
    count = len(order)
    best, seen = threshold_search(count, lambda s: fits(count - s))
    threshold = count - best
    ranks = kept_to_ranks(shapes, kept_at_threshold(order, names, threshold))
    searched = removed_fraction(shapes, ranks)
    filled = meet_budget(shapes, ranks, ratio, sigmas=sigmas, tolerance=tolerance)
    return filled, {"threshold": threshold, "choices": count, "evaluated": len(seen),
                    "removed_before_fill": round(searched, 6)}
