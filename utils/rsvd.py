"""Randomized SVD (Halko, Martinsson & Tropp 2011) for the top singular triplets.

Subspace iteration (HMT Algorithm 4.4) tuned for the CPU and for the wide sketches that
compression needs (the kept rank is often 30-60% of the smaller dimension):

  * float32 throughout for the products with the matrix (they are most of the work);
  * between power iterations the sketch is only re-conditioned, not orthonormalised: the
    L factor of a partially pivoted LU (P L spans the same columns and is well conditioned)
    costs about a quarter of a Householder QR plus forming Q (the "LU" normaliser of
    fbpca / scikit-learn);
  * one Householder QR at the end gives the orthonormal range basis Q;
  * the small factor B = Q^T A (k x n) is decomposed through its k x k Gram matrix in
    float64 (eigh), which is several times faster on the CPU than a gesdd of the k x n
    float32 matrix and, in float64, loses nothing that float32 could resolve. The right
    singular vectors are formed in float64 as B^T W Sigma^-1.

Directions whose singular value is below float32's resolution (sigma_i < 1e-7 sigma_1, i.e.
the matrix has numerical rank below `rank`) get zero right singular vectors instead of
round-off noise; U S Vh is unaffected (their sigma is ~0).
"""
from __future__ import annotations

import torch


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


def randomized_svd(matrix: torch.Tensor, rank: int, oversamples: int = 10, n_iter: int = 2,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of `matrix` (m x n) by randomized subspace iteration. Returns U_r, S_r, Vh_r.

    Gaussian sketch of width k = rank + oversamples, `n_iter` power iterations (each one
    product with A^T and one with A, LU-normalised in between), a final QR, then the exact
    SVD of the k x n projection through its float64 Gram matrix. If k reaches min(m, n) the
    sketch would be the whole matrix, so the exact SVD (torch.linalg.svd) is returned instead.
    Outputs have the matrix's dtype; U_r has orthonormal columns, Vh_r orthonormal rows
    (to the working precision), S_r is non-increasing.
    """
    if matrix.dim() != 2:
        raise ValueError(f"randomized_svd needs a matrix, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} must be in [1, {min(m, n)}] for a {m} x {n} matrix")
    if oversamples < 0 or n_iter < 0:
        raise ValueError(f"oversamples ({oversamples}) and n_iter ({n_iter}) must be >= 0")
    width = min(rank + oversamples, m, n)
    if width >= min(m, n):
        return _exact(matrix, rank)
    dtype = matrix.dtype
    omega = torch.randn(n, width, generator=generator, dtype=dtype,
                        device="cpu" if generator is None else generator.device).to(matrix.device)
    sketch = matrix @ omega
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
    vh = ((projected_t @ eigvecs) * scale).T  # Sigma^-1 W^T B, rank x n
    u = basis @ eigvecs.to(dtype)
    return u, sigma.to(dtype), vh.to(dtype)
