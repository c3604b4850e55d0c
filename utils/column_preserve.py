"""Duo-SVD's column level: trade rank for exactly kept input columns at no more parameters.

For W (m x n) at rank r with input Gram H, keeping the input columns K exactly (a dense m x |K|
block C = W[:, K]) and decomposing only the rest W_s = W[:, S] (S the other columns) makes the
layer's output error on the calibration inputs

    ||(W - W') X^T||_F = ||(W_s - L) X_s^T||_F,

i.e. a whitened truncation of W_s under the Gram restricted to S, H_SS (utils.whitening): with
its whitening factor, the error of rank r' is the root of the sum of W_s S's discarded squared
singular values. Trading dr rank for dc columns at equal budget:

    (r - dr)(m + n - dc) + dc m <= r (m + n)   <=>   dc <= dr (m + n) / (m - r + dr),

so dc = floor(dr (m + n) / (m - r + dr)): rounded DOWN, the parameter count never exceeds the
plan's r (m + n). Columns are chosen by Duo-SVD's score, the squared residual column norm of the
rank-r whitened truncation times H_jj (the energy of the error that column carries on its own),
and the trade dr by golden-section search over [0, r - 1] as its seg_W_SVD does (integer points,
cached, with its early exit when two small trades are both no better), keeping the best point
evaluated. A trade is taken only when it lowers the error by more than `min_gain` (1%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from utils.decompose import Factors, low_rank_factors
from utils.whitening import whitening_factor

MIN_GAIN = 0.01  # Duo-SVD's threshold: a trade must lower the whitened error by more than 1%


def columns_for_trade(out_features: int, in_features: int, rank: int, rank_traded: int) -> int:
    """dc = floor(dr (m + n) / (m - r + dr)): the most columns dr rank buys without exceeding r (m + n)."""
    m, n = out_features, in_features
    if rank_traded <= 0:
        return 0
    return (rank_traded * (m + n)) // (m - rank + rank_traded)


def trade_params(out_features: int, in_features: int, rank: int, columns: int) -> int:
    """Parameters of the column-preserved layer (bias excluded): rank (m + n - k) + k m."""
    return rank * (out_features + in_features - columns) + columns * out_features


@dataclass
class ColumnTrade:
    """The result for one matrix: factors of W[:, svd_idx] and the kept dense columns."""

    u: torch.Tensor  # m x r'
    v: torch.Tensor  # r' x (n - k)
    columns: torch.Tensor  # m x k, W[:, col_idx]
    svd_idx: torch.Tensor  # (n - k,) int64, ascending
    col_idx: torch.Tensor  # (k,) int64, ascending
    rank: int  # r' = r - dr
    plan_rank: int  # r
    error_before: float  # whitened truncation error at rank r, no columns
    error_after: float  # the same with the trade (= error_before when none is taken)
    total_energy: float  # ||W S||_F^2 of the full matrix
    evaluations: int = 0  # error evaluations of the search (one SVD each)
    trace: dict = field(default_factory=dict)  # dr -> error, every point evaluated
    factors: Factors | None = None  # the final factorisation (of W_s)

    @property
    def kept_columns(self) -> int:
        return int(self.col_idx.numel())


def column_scores(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Duo-SVD's importance: ||(W - u v)[:, j]||^2 H_jj per input column (float64)."""
    residual = weight.to(torch.float64) - u.to(torch.float64) @ v.to(torch.float64)
    return residual.square().sum(0) * gram.diagonal().to(torch.float64)


class _TradeError:
    """error(dr): the whitened truncation error of W_s at rank r - dr (cached; one SVD per point)."""

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, order: torch.Tensor, rank: int, method: str,
                 svd_dtype: torch.dtype):
        self.weight, self.gram, self.order, self.rank = weight.to(torch.float64), gram.to(torch.float64), order, rank
        self.method, self.svd_dtype = method, svd_dtype
        self.cache: dict[int, float] = {}

    def split(self, rank_traded: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, n = self.weight.shape
        k = columns_for_trade(m, n, self.rank, rank_traded)
        col_idx = self.order[:k].sort().values
        keep = torch.ones(n, dtype=torch.bool, device=self.order.device)
        keep[col_idx] = False
        return torch.nonzero(keep).flatten(), col_idx

    def __call__(self, rank_traded: int) -> float:
        if rank_traded not in self.cache:
            svd_idx, _ = self.split(rank_traded)
            factor = whitening_factor(self.gram[svd_idx][:, svd_idx], self.method)
            target = factor.right_multiply(self.weight[:, svd_idx]).to(self.svd_dtype)
            sigma = torch.linalg.svdvals(target).to(torch.float64)
            self.cache[rank_traded] = float(sigma[self.rank - rank_traded:].square().sum().sqrt())
        return self.cache[rank_traded]


def largest_trade(out_features: int, in_features: int, rank: int) -> int:
    """The largest dr worth searching: r' >= 1 and W_s keeps at least r' columns."""
    best = 0
    for dr in range(1, rank):
        k = columns_for_trade(out_features, in_features, rank, dr)
        if in_features - k >= rank - dr:
            best = dr
    return best


def golden_section_trade(error, rank: int, high: int, baseline: float) -> int:
    """Duo-SVD's search for the best dr in [0, high] (error(0) = baseline): two probes at small
    trades first (round(0.382 r) and round(0.618 * 0.382^2 r)), giving up when neither beats the
    baseline; else golden-section on the integers. Returns the best dr evaluated (0 included)."""
    if high < 1:
        return 0
    inv_phi = (math.sqrt(5) - 1) / 2
    inv_phi_sq = inv_phi ** 2
    probes = {min(high, max(1, round(rank * inv_phi_sq))), min(high, max(1, round(rank * inv_phi * inv_phi_sq ** 2)))}
    if all(error(p) >= baseline for p in probes):
        return 0
    low = 0
    c, d = low + round(inv_phi_sq * (high - low)), low + round(inv_phi * (high - low))
    while high - low >= 3:
        if error(c) < error(d):
            high, d = d, c
            c = low + round(inv_phi_sq * (high - low))
        else:
            low, c = c, d
            d = low + round(inv_phi * (high - low))
    for point in range(low, high + 1):  # at most three points left: settle them exactly
        error(point)
    evaluated = {0: baseline, **error.cache}
    return min(evaluated, key=lambda dr: (evaluated[dr], dr))


def column_preserved_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int, method: str = "cholesky",
                             plain: Factors | None = None, min_gain: float = MIN_GAIN,
                             svd_dtype: torch.dtype = torch.float32, factor_kwargs: dict | None = None,
                             search: str = "golden") -> ColumnTrade:
    """Decide and build the column trade of one matrix (out x in) at plan rank `rank`.

    gram: the matrix's input Gram H (in x in); method: the whitening (cholesky / eigen); plain: the
    rank-r whitened factors of the whole matrix if already computed (they give the baseline error
    and the column scores); factor_kwargs: passed to low_rank_factors for the final factorisation
    (decomposition, sigma_fuse, ...). search: "golden" (Duo-SVD) or "exhaustive" (every dr: the
    reference point the tests compare the search with)."""
    if method == "none":
        raise ValueError("column preservation needs whitening (cholesky or eigen)")
    factor_kwargs = dict(factor_kwargs or {})
    factor_kwargs.setdefault("compute_dtype", svd_dtype)
    m, n = weight.shape
    if plain is None:
        plain = low_rank_factors(weight, rank, whitening_factor(gram, method), **factor_kwargs)
    baseline = plain.truncation_loss
    order = torch.argsort(column_scores(weight, plain.u, plain.v, gram), descending=True, stable=True)
    error = _TradeError(weight, gram, order, rank, method, svd_dtype)
    high = largest_trade(m, n, rank)
    if search == "exhaustive":
        for dr in range(1, high + 1):
            error(dr)
        evaluated = {0: baseline, **error.cache}
        best = min(evaluated, key=lambda dr: (evaluated[dr], dr))
    elif search == "golden":
        best = golden_section_trade(error, rank, high, baseline) if baseline > 0 else 0
    else:
        raise ValueError(f"unknown search {search!r}: golden or exhaustive")
    gain = (baseline - error.cache.get(best, baseline)) / baseline if baseline > 0 else 0.0
    if best == 0 or gain <= min_gain:
        idx = torch.arange(n, device=weight.device)
        return ColumnTrade(plain.u, plain.v, weight.new_zeros(m, 0, dtype=torch.float64), idx,
                           idx.new_zeros(0), rank, rank, baseline, baseline, plain.total_energy,
                           len(error.cache), dict(error.cache), plain)
    svd_idx, col_idx = error.split(best)
    sub_gram = gram.to(torch.float64)[svd_idx][:, svd_idx]
    factors = low_rank_factors(weight[:, svd_idx], rank - best, whitening_factor(sub_gram, method), **factor_kwargs)
    return ColumnTrade(factors.u, factors.v, weight.to(torch.float64)[:, col_idx], svd_idx, col_idx, rank - best,
                       rank, baseline, factors.truncation_loss, plain.total_energy, len(error.cache),
                       dict(error.cache), factors)
