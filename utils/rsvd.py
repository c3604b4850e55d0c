"""Randomized SVD (Halko, Martinsson & Tropp 2011) for the top singular triplets."""
from __future__ import annotations

import torch


def randomized_svd(matrix: torch.Tensor, rank: int, oversamples: int = 10, n_iter: int = 2,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD by Halko, Martinsson & Tropp (2011), Algorithm 4.4.

    Gaussian sketch of width rank + oversamples, `n_iter` power iterations with QR
    re-orthonormalisation after every product (keeps the small singular directions from being
    lost to round-off), then an exact SVD of the small projected matrix. Returns U_r, S_r, Vh_r.
    """
    m, n = matrix.shape
    width = min(rank + oversamples, m, n)
    if width >= min(m, n):
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], sigma[:rank], vh[:rank]
    omega = torch.randn(n, width, generator=generator, dtype=matrix.dtype,
                        device="cpu" if generator is None else generator.device)
    omega = omega.to(matrix.device)
    basis, _ = torch.linalg.qr(matrix @ omega)
    for _ in range(n_iter):
        basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ basis)
    small_u, sigma, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ small_u)[:, :rank], sigma[:rank], vh[:rank]
