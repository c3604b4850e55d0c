"""Low-rank decomposition of one weight matrix: ranks, exact and randomized SVD, factors.

Pure tensor functions: nothing here knows about models.

Ratio convention (SVD-LLM's): `ratio` is the fraction of a matrix's parameters removed. An
m x n matrix kept as u (m x r) and v (r x n) has r (m + n) parameters, so
r = floor(m n (1 - ratio) / (m + n)), at least 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.rsvd import randomized_svd
from utils.whitening import WhiteningFactor

DECOMPOSITIONS = ("svd", "rsvd")


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int | None:
    """Rank that removes `ratio` of an out x in matrix's parameters; None if it would not shrink."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    m, n = out_features, in_features
    rank = max(1, int(m * n * (1.0 - ratio) // (m + n)))
    if rank * (m + n) >= m * n:
        return None
    return rank


def low_rank_params(out_features: int, in_features: int, rank: int, bias: bool) -> int:
    return rank * (out_features + in_features) + (out_features if bias else 0)


def exact_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` of torch.linalg.svd (full spectrum computed)."""
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], sigma[:rank], vh[:rank]


@dataclass
class Factors:
    """W ~ u @ v; u carries sqrt(sigma) on its columns, v on its rows (SVD-LLM's split)."""

    u: torch.Tensor  # out x r
    v: torch.Tensor  # r x in
    kept_energy: float  # sum of kept sigma^2 (of W S, or W when not whitened)
    total_energy: float  # ||W S||_F^2

    @property
    def truncation_loss(self) -> float:
        """sqrt(sum of discarded sigma^2): ||(W - u v) X^T||_F for whitened factors."""
        return max(self.total_energy - self.kept_energy, 0.0) ** 0.5


def low_rank_factors(weight: torch.Tensor, rank: int, whitening: WhiteningFactor | None = None,
                     decomposition: str = "svd", compute_dtype: torch.dtype = torch.float32,
                     oversamples: int = 10, n_iter: int = 2,
                     generator: torch.Generator | None = None) -> Factors:
    """Truncated (whitened) SVD of `weight` (out x in).

    With whitening S: A = W S = U Sigma V^T, keep r, u = U_r sqrt(Sigma_r),
    v = sqrt(Sigma_r) V_r^T S^-1. Without: the same with S = I (plain SVD).
    The SVD runs in `compute_dtype` (float32 for speed, float64 for exactness); whitening
    products and solves in float64.
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {decomposition!r}; choose one of {DECOMPOSITIONS}")
    target = whitening.right_multiply(weight) if whitening is not None else weight.to(torch.float64)
    total_energy = float(target.square().sum())
    target = target.to(compute_dtype)
    if decomposition == "svd":
        u, sigma, vh = exact_svd(target, rank)
    else:
        u, sigma, vh = randomized_svd(target, rank, oversamples, n_iter, generator)
    root = sigma.to(torch.float64).sqrt()
    u = u.to(torch.float64) * root
    v = root[:, None] * vh.to(torch.float64)
    if whitening is not None:
        v = whitening.right_solve(v)
    return Factors(u=u, v=v, kept_energy=float(sigma.to(torch.float64).square().sum()),
                   total_energy=total_energy)
