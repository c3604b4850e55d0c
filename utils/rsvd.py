"""Randomized SVD (Halko, Martinsson & Tropp 2011) for the top singular triplets.

Two routes to the same subspace iteration (HMT Algorithm 4.4); `randomized_svd` picks the one
with fewer flops for the shape and rank (`route="auto"`):

  * "gram": iterate on the Gram matrix of the short side, G = A^T A (n x n for an m x n
    matrix with m >= n; A is transposed otherwise). G^(q+1) Omega spans the same right
    subspace as q power iterations on A, but each iteration is one n x n x k product instead
    of two m x n x k ones, so after paying m n^2 once for G the iterations are 2m/n times
    cheaper. This is what makes the compression ranks (30-60% of the short side) pay off:
    at those widths the direct route's 2q+2 products cost as much as an exact SVD. The
    Rayleigh-Ritz step uses G too: T = Z^T G Z (k x k), V_r = Z W_r. Then A V_r is formed
    once: sigma_i = ||A v_i|| and U_r = A V_r / sigma, so U_r S_r Vh_r = A V_r V_r^T exactly
    and the kept energy (hence the reported truncation loss) is exact for the subspace found.
    Squaring A squares its condition number: G's float32 round-off (about eps * sigma_1^2)
    drowns directions with sigma below ~sqrt(eps) sigma_1 = 3e-4 sigma_1, and they pollute the
    Rayleigh-Ritz step when the sketch reaches them. On SmolLM2's whitened matrices the route
    was as accurate as the direct one whenever the sketch's smallest Ritz value stayed above
    3e-3 sigma_1, and up to 1.5 points worse below 1.2e-3 (layer 0's attention). So the route
    checks that (9 sqrt(eps) in other precisions), from T's eigenvalues, and hands over to the
    direct route when it fails.
  * "direct": products with A and A^T, LU re-conditioning between them (the "LU" normaliser
    of fbpca / scikit-learn: P L of a partially pivoted LU spans the same columns and is well
    conditioned, at a quarter of a Householder QR), one QR at the end for the range basis Q,
    and the k x n projection B = Q^T A decomposed through its k x k Gram in float64.

Directions whose singular value is below float32's resolution (sigma_i < 1e-7 sigma_1, i.e.
the matrix has numerical rank below `rank`) get zero singular vectors instead of round-off
noise; U S Vh is unaffected (their sigma is ~0).
"""
from __future__ import annotations

import torch

from utils.gram import symmetric_gram


def _lu_basis(sketch: torch.Tensor) -> torch.Tensor:
    """P L of the partially pivoted LU of `sketch` (m x k, m >= k): same column space, well conditioned."""
    lu, pivots = torch.linalg.lu_factor(sketch)
    lower = torch.tril(lu, -1)
    lower.diagonal().fill_(1.0)
    # LAPACK pivots are sequential row swaps: row i of L U is row perm[i] of the sketch
    perm = list(range(sketch.shape[0]))
    for i, p in enumerate(pivots.tolist()):
        p -= 1
        perm[i], perm[p] = perm[p], perm[i]
    out = torch.empty_like(lower)
    out[torch.tensor(perm, device=sketch.device)] = lower
    return out


def _exact(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], sigma[:rank], vh[:rank]


ROUTES = ("auto", "gram", "direct")
# chosen so that randomized SVD is at least 2x faster than the exact SVD at under 1% extra truncation
# loss on 4096 x 4096 and 11008 x 4096 at 20-60% removed (scripts/results/bench_rsvd_cpu.json)
DEFAULT_OVERSAMPLES, DEFAULT_N_ITER = 100, 4
GRAM_RESOLUTION = 3e-3  # smallest sigma_k / sigma_1 of the sketch the float32 Gram route trusts


def gram_resolution(dtype: torch.dtype) -> float:
    """GRAM_RESOLUTION scaled to the working precision: 9 sqrt(eps), 3e-3 in float32, 1.3e-7 in float64."""
    return GRAM_RESOLUTION * (torch.finfo(dtype).eps / torch.finfo(torch.float32).eps) ** 0.5


def sketch_covers(m: int, n: int, rank: int, oversamples: int) -> bool:
    """Whether a sketch of width rank + oversamples would span all of an m x n matrix (then only
    the exact SVD makes sense)."""
    return rank + oversamples >= min(m, n)


def route_cost(m: int, n: int, rank: int, width: int, n_iter: int) -> dict[str, float]:
    """Dominant multiply-adds of each route for an m x n matrix (sketch width k = `width`)."""
    long, short = max(m, n), min(m, n)
    k, q = width, n_iter
    direct = (2 * q + 2) * m * n * k + q * (m + n) * k * k + 2 * long * k * k + long * k * rank
    gram = long * short * short // 2 + (q + 2) * short * short * k + (q + 3) * short * k * k + long * short * rank
    return {"direct": float(direct), "gram": float(gram)}


def _gaussian(rows: int, cols: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(rows, cols, generator=generator, dtype=like.dtype,
                       device="cpu" if generator is None else generator.device).to(like.device)


def _direct_route(matrix: torch.Tensor, rank: int, width: int, n_iter: int,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = matrix.dtype
    sketch = matrix @ _gaussian(matrix.shape[1], width, matrix, generator)
    for _ in range(n_iter):
        sketch = matrix @ _lu_basis(matrix.T @ _lu_basis(sketch))
    basis, _ = torch.linalg.qr(sketch)  # m x k, orthonormal
    projected_t = (matrix.T @ basis).to(torch.float64)  # B^T = A^T Q, n x k
    gram = projected_t.T @ projected_t  # B B^T, k x k
    eigvals, eigvecs = torch.linalg.eigh((gram + gram.T) / 2)
    eigvals, eigvecs = eigvals.flip(0)[:rank], eigvecs.flip(1)[:, :rank]
    sigma = eigvals.clamp_min(0.0).sqrt()
    resolved = sigma > sigma[0] * 1e-7 if sigma[0] > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    scale = torch.where(resolved, 1.0 / torch.where(resolved, sigma, torch.ones_like(sigma)),
                        torch.zeros_like(sigma))
    right = projected_t @ eigvecs
    del projected_t  # the n x k float64 products are the largest matrix's peak: one at a time
    right *= scale
    vh = right.T.to(dtype)  # Sigma^-1 W^T B, rank x n
    del right
    u = basis @ eigvecs.to(dtype)
    return u, sigma.to(dtype), vh


def _gram_route(matrix: torch.Tensor, rank: int, width: int, n_iter: int, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Subspace iteration on G = A^T A for a tall A (m >= n); None when the kept rank is unresolved."""
    gram = symmetric_gram(matrix)  # n x n
    sketch = gram @ _gaussian(matrix.shape[1], width, matrix, generator)  # = q = 0 of the direct route
    for _ in range(n_iter):
        sketch = gram @ _lu_basis(sketch)
    basis, _ = torch.linalg.qr(sketch)  # n x k, orthonormal: the right subspace
    small = basis.T @ (gram @ basis)  # Rayleigh-Ritz: T = Z^T G Z, k x k
    # float32 is enough here: A V V^T below depends only on span(V) and V's orthonormality
    eigvals, eigvecs = torch.linalg.eigh((small + small.T) / 2)
    if not bool(eigvals[0] >= gram_resolution(matrix.dtype) ** 2 * eigvals[-1] > 0):
        return None  # the sketch reaches below what G resolves
    right = basis @ eigvecs.flip(1)[:, :rank]  # V_r, n x r
    left = matrix @ right  # U_r Sigma_r
    sigma = torch.linalg.vector_norm(left, dim=0)
    if not bool(torch.isfinite(sigma).all() and sigma.min() > 0):
        return None
    order = torch.argsort(sigma, descending=True)
    sigma, left, right = sigma[order], left[:, order], right[:, order]
    return left / sigma, sigma, right.T


def randomized_svd(matrix: torch.Tensor, rank: int, oversamples: int = DEFAULT_OVERSAMPLES,
                   n_iter: int = DEFAULT_N_ITER,
                   generator: torch.Generator | None = None, route: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of `matrix` (m x n) by randomized subspace iteration. Returns U_r, S_r, Vh_r.

    Gaussian sketch of width k = rank + oversamples and `n_iter` power iterations, by the
    route (see the module docstring) with fewer multiply-adds unless `route` names one. If k
    reaches min(m, n) the sketch would be the whole matrix, so the exact SVD
    (torch.linalg.svd) is returned instead. Outputs have the matrix's dtype; Vh_r has
    orthonormal rows, U_r unit columns (orthonormal to the working precision), S_r is
    non-increasing.
    """
    if matrix.dim() != 2:
        raise ValueError(f"randomized_svd needs a matrix, got shape {tuple(matrix.shape)}")
    if route not in ROUTES:
        raise ValueError(f"unknown randomized SVD route {route!r}; choose one of {ROUTES}")
    m, n = matrix.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} must be in [1, {min(m, n)}] for a {m} x {n} matrix")
    if oversamples < 0 or n_iter < 0:
        raise ValueError(f"oversamples ({oversamples}) and n_iter ({n_iter}) must be >= 0")
    if sketch_covers(m, n, rank, oversamples):
        return _exact(matrix, rank)
    width = rank + oversamples
    if route == "auto":
        cost = route_cost(m, n, rank, width, n_iter)
        route = "gram" if cost["gram"] < cost["direct"] else "direct"
    if route == "gram":
        tall = matrix if m >= n else matrix.T
        result = _gram_route(tall, rank, width, n_iter, generator)
        if result is not None:
            u, sigma, vh = result
            return (u, sigma, vh) if m >= n else (vh.T, sigma, u.T)
    return _direct_route(matrix, rank, width, n_iter, generator)
