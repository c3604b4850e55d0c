"""Low-rank decomposition of one weight matrix: ranks, exact and randomized SVD, factors.

Pure tensor functions: nothing here knows about models.

Ratio convention (SVD-LLM's): `ratio` is the fraction of a matrix's parameters removed. An
m x n matrix kept as u (m x r) and v (r x n) has r (m + n) parameters, so
r = floor(m n (1 - ratio) / (m + n)), at least 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.plan import rank_for_ratio  # noqa: F401  (re-exported: the ratio convention)
from utils.rsvd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLES, randomized_svd, sketch_covers
from utils.whitening import ScalingFactor, WhiteningFactor

DECOMPOSITIONS = ("svd", "rsvd")
SIGMA_FUSE = ("UV", "U", "V")  # ASVD's --sigma_fuse: where Sigma goes (UV: its square root into both)


def low_rank_params(out_features: int, in_features: int, rank: int, bias: bool) -> int:
    return rank * (out_features + in_features) + (out_features if bias else 0)


SVD_DRIVERS = ("auto", "default", "gesvda")
# Largest accepted residual of a gesvda result (see svd_residual), by the SVD's dtype. A float32
# SVD of a 4096-wide matrix is accurate to about 1e-6; 1e-4 keeps the truncation error within
# about 1e-4 ||A||_F of what the singular values promise, far below the loss of any useful truncation.
GESVDA_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


@dataclass
class SVDInfo:
    """How an SVD was computed: the driver that produced the result and its checked residual."""

    driver: str = "default"  # "default" (LAPACK gesdd on CPU, torch's pick on CUDA) or "gesvda"
    residual: float | None = None  # svd_residual of the gesvda result (None: not checked; inf: it failed)
    fallback: bool = False  # gesvda was tried and rejected


def resolve_svd_driver(driver: str, device: torch.device | str) -> str | None:
    """'auto' -> 'gesvda' on CUDA, the default driver (None) elsewhere; torch's driver= is CUDA-only."""
    if driver not in SVD_DRIVERS:
        raise ValueError(f"unknown SVD driver {driver!r}; choose one of {SVD_DRIVERS}")
    cuda = torch.device(device).type == "cuda"
    if driver == "gesvda" and not cuda:
        raise ValueError("the gesvda SVD driver is CUDA-only")
    if driver == "default" or not cuda:
        return None
    return "gesvda"


def _linalg_svd(matrix: torch.Tensor, driver: str | None):
    """The one call into torch.linalg.svd (tests replace it to simulate drivers)."""
    if driver is None:
        return torch.linalg.svd(matrix, full_matrices=False)
    return torch.linalg.svd(matrix, full_matrices=False, driver=driver)


def svd_residual(matrix: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor,
                 rank: int | None = None) -> float:
    """How far an SVD is from exact where truncation at `rank` (default: all) can see it, in float64.
    The largest of, with r = rank and everything relative to ||A||_F (energies to ||A||_F^2):

        | ||A||_F^2 - sum_i s_i^2 |                 the singular values carry A's energy
        ||A V_r - U_r S_r||_F                        the kept triplets satisfy A v_i = s_i u_i
        ||V_r^T V_r - I||_F / sqrt(r)                the kept right vectors are orthonormal
        | ||A - U_r S_r Vh_r||_F - ||s_{r+1:}|| |    the truncation has the error its values promise

    and inf when the singular values are not finite, negative or out of order. With V_r
    orthonormal, the truncation's error is sqrt(||A||^2 - ||A V_r||^2), which is the Eckart-Young
    optimum exactly when ||A V_r||^2 = sum_{i<=r} s_i(A)^2 (Ky Fan); the check ties it to the
    reported s_i, so the kept error is within about rtol ||A||_F of optimal as far as the
    reported singular values are A's (gesvda takes them from the eigenvalues of A^T A: accurate to
    about eps s_1^2 in s_i^2). It is no certificate against a driver that returns wrong values
    consistently; the benchmarks compare with float64 SVDs for that. U_r's orthonormality is not
    required: a Gram-based driver (gesvda) builds U = A V / s, whose columns with small s lose it on
    an ill-conditioned matrix while the product U_r S_r Vh_r, which is what the factors keep, stays
    accurate.
    """
    sigma = sigma.to(torch.float64)
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()) or bool((sigma[1:] > sigma[:-1] * (1 + 1e-6)).any()):
        return float("inf")
    a = matrix.to(torch.float64)
    rank = sigma.numel() if rank is None else rank
    norm2 = float(a.square().sum()) or 1.0
    norm = norm2 ** 0.5
    u_r, v_r, s_r = u[:, :rank].to(torch.float64), vh[:rank].to(torch.float64).T, sigma[:rank]
    energy = abs(norm2 - float(sigma.square().sum())) / norm2
    pairs = float(torch.linalg.matrix_norm(a @ v_r - u_r * s_r)) / norm
    eye = torch.eye(rank, dtype=torch.float64, device=a.device)
    orthonormal = float(torch.linalg.matrix_norm(v_r.T @ v_r - eye)) / max(rank, 1) ** 0.5
    error = float(torch.linalg.matrix_norm(a - (u_r * s_r) @ v_r.T))
    promised = float(sigma[rank:].square().sum().sqrt())
    value = max(energy, pairs, orthonormal, abs(error - promised) / norm)
    return value if value == value else float("inf")  # NaN -> inf


def checked_svd(matrix: torch.Tensor, driver: str | None, rtol: float | None = None,
                info: SVDInfo | None = None, rank: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD with `driver`; a gesvda result is checked (svd_residual at `rank`, the rank that
    will be kept) and replaced by the default driver's when its residual exceeds rtol, is not
    finite, or gesvda raised. gesvda runs on the tall orientation."""
    info = info if info is not None else SVDInfo()
    if driver != "gesvda":
        info.driver = "default"
        return _linalg_svd(matrix, driver)
    wide = matrix.shape[0] < matrix.shape[1]
    try:
        u, sigma, vh = _linalg_svd(matrix.T if wide else matrix, "gesvda")
    except RuntimeError:  # torch reports a failed convergence as an error
        u = sigma = vh = None
    if wide and u is not None:  # A^T = U S Vh  =>  A = Vh^T S U^T
        u, vh = vh.T, u.T
    rtol = GESVDA_RTOL.get(matrix.dtype, 1e-4) if rtol is None else rtol
    info.residual = float("inf") if u is None else svd_residual(matrix, u, sigma, vh, rank)
    if info.residual <= rtol:
        info.driver, info.fallback = "gesvda", False
        return u, sigma, vh
    info.driver, info.fallback = "default", True
    return _linalg_svd(matrix, None)


def exact_svd(matrix: torch.Tensor, rank: int, driver: str = "auto",
              info: SVDInfo | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` of a full thin SVD. driver 'auto': LAPACK on CPU (unchanged), checked gesvda
    on CUDA with fallback to torch's default CUDA driver (see checked_svd)."""
    u, sigma, vh = checked_svd(matrix, resolve_svd_driver(driver, matrix.device), info=info, rank=rank)
    return u[:, :rank], sigma[:rank], vh[:rank]


@dataclass
class Factors:
    """W ~ u @ v; u carries sqrt(sigma) on its columns, v on its rows (SVD-LLM's split), unless
    sigma_fuse put all of Sigma on one side."""

    u: torch.Tensor  # out x r
    v: torch.Tensor  # r x in
    kept_energy: float  # sum of kept sigma^2 (of W S, or W when not whitened)
    total_energy: float  # ||W S||_F^2
    svd: SVDInfo | None = None  # exact SVD only: the driver used and its checked residual
    spectrum: torch.Tensor | None = None  # every singular value the SVD computed (float64, CPU): all of
    # them for the exact SVD, so a caller can truncate u[:, :k], v[:k] further and know what it drops

    @property
    def truncation_loss(self) -> float:
        """sqrt(sum of discarded sigma^2): ||(W - u v) X^T||_F for whitened factors."""
        return max(self.total_energy - self.kept_energy, 0.0) ** 0.5


def low_rank_factors(weight: torch.Tensor, rank: int, whitening: WhiteningFactor | ScalingFactor | None = None,
                     decomposition: str = "svd", compute_dtype: torch.dtype = torch.float32,
                     oversamples: int = DEFAULT_OVERSAMPLES, n_iter: int = DEFAULT_N_ITER,
                     generator: torch.Generator | None = None, svd_driver: str = "auto",
                     sigma_fuse: str = "UV") -> Factors:
    """Truncated (whitened or scaled) SVD of `weight` (out x in).

    With whitening S: A = W S = U Sigma V^T, keep r, u = U_r sqrt(Sigma_r),
    v = sqrt(Sigma_r) V_r^T S^-1. Without: the same with S = I (plain SVD). ASVD's scaling is
    S = diag(s). sigma_fuse "U" gives u = U_r Sigma_r, v = V_r^T S^-1; "V" u = U_r,
    v = Sigma_r V_r^T S^-1 (the product u v is the same).
    The SVD runs in `compute_dtype` (float32 for speed, float64 for exactness); whitening
    products and solves in float64. `svd_driver` picks the exact SVD's driver (see exact_svd).
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {decomposition!r}; choose one of {DECOMPOSITIONS}")
    if sigma_fuse not in SIGMA_FUSE:
        raise ValueError(f"unknown sigma_fuse {sigma_fuse!r}; choose one of {SIGMA_FUSE}")
    target = whitening.right_multiply(weight) if whitening is not None else weight.to(torch.float64)
    total_energy = float(target.square().sum())
    target = target.to(compute_dtype)
    info = None
    # a sketch as wide as the matrix is the exact SVD: take it here, with the driver choice and check
    if decomposition == "svd" or sketch_covers(*target.shape, rank, oversamples):
        info = SVDInfo()
        u, spectrum, vh = checked_svd(target, resolve_svd_driver(svd_driver, target.device), info=info, rank=rank)
        u, sigma, vh = u[:, :rank], spectrum[:rank], vh[:rank]  # exact_svd, keeping the whole spectrum
    else:
        u, sigma, vh = randomized_svd(target, rank, oversamples, n_iter, generator)
        spectrum = sigma
    del target  # W S is not beside the factors (the largest matrix's peak)
    sigma64 = sigma.to(torch.float64)
    left, right = {"UV": (sigma64.sqrt(), sigma64.sqrt()), "U": (sigma64, torch.ones_like(sigma64)),
                   "V": (torch.ones_like(sigma64), sigma64)}[sigma_fuse]
    u = u.to(torch.float64) * left
    v = right[:, None] * vh.to(torch.float64)
    del vh
    if whitening is not None:
        v = whitening.right_solve(v)
    return Factors(u=u, v=v, kept_energy=float(sigma.to(torch.float64).square().sum()),
                   total_energy=total_energy, svd=info, spectrum=spectrum.detach().to(torch.float64).cpu())
