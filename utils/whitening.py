"""Truncation-aware data whitening (SVD-LLM).

Let X (tokens x in) be a linear layer's calibration inputs and H = X^T X (in x in) their Gram
matrix. Any S with S S^T = H makes S^-1 X^T have orthonormal rows, so for W' = (W S)_r S^-1
(the rank-r truncation of W S mapped back):

    ||(W - W') X^T||_F = ||(W S - (W S)_r) S^-1 X^T||_F = sqrt(sum_{i>r} sigma_i(W S)^2),

i.e. the loss caused by truncating singular value i is exactly sigma_i: truncating the smallest
singular values of W S is optimal for the layer's output error on its calibration data.

Two factors are offered, both computed in float64:
  cholesky: S = L, the lower Cholesky factor of H (SVD-LLM v1). If H is not positive definite
            (fewer tokens than columns, dead channels), H is shifted by a small multiple of I
            (see cholesky_factor) and the fallback is reported to the caller.
  eigen:    S = Q diag(sqrt(l)) for H = Q diag(l) Q^T (SVD-LLM v2), Cholesky-free; eigenvalues
            are clamped at a small floor relative to the largest.
Any two such S differ by an orthogonal factor on the right, so both give the same W'.
S^-1 is only ever applied through triangular solves (cholesky) or the orthogonal Q (eigen).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WHITENING_METHODS = ("cholesky", "eigen", "none")


@dataclass
class WhiteningFactor:
    """S with S S^T = H (float64), plus how it was obtained."""

    method: str
    factor: torch.Tensor  # S, (in x in)
    fallback: bool = False  # True when H had to be shifted / clamped to be usable
    eigvals: torch.Tensor | None = None  # eigen only: clamped eigenvalues
    eigvecs: torch.Tensor | None = None  # eigen only: Q
    shift: float | None = None  # cholesky fallback only: S S^T = H + shift I

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """W S (float64)."""
        return weight.to(torch.float64) @ self.factor

    def right_solve(self, matrix: torch.Tensor) -> torch.Tensor:
        """M S^-1 (float64), without forming the inverse."""
        matrix = matrix.to(torch.float64)
        if self.method == "cholesky":
            return torch.linalg.solve_triangular(self.factor, matrix, upper=False, left=False)
        # S^-1 = diag(1/sqrt(l)) Q^T
        return (matrix / self.eigvals.sqrt()) @ self.eigvecs.T


def cholesky_factor(gram: torch.Tensor, rel_eps: float = 1e-6, ladder_steps: int = 4) -> WhiteningFactor:
    """Lower Cholesky factor of H in float64, shifting H when it is not positive definite.

    SVD-LLM shifts H by (-lambda_min + eps) I, with lambda_min from a full eigenvalue solve (an
    absolute eps of 1e-6; here eps = rel_eps * mean(diag(H)), meaningful for any activation
    scale), which leaves a smallest eigenvalue of eps. A rank-deficient Gram's negative
    eigenvalues are round-off, of the order of eps (11008 wide, 4096 tokens: -0.7 eps), so the
    shifts s = eps, 10 eps, ... (`ladder_steps` of them) are tried first, one Cholesky each: the
    first s that factors proves lambda_min > -s, and H + (s + eps) I, factored once more, keeps
    SVD-LLM's margin of at least eps. Two or three Cholesky factorisations cost less than the
    eigenvalue solve alone (11008 wide, 2 CPU cores: 8 s each against 31 s). A Gram that needs
    more (a real negative eigenvalue: corrupted statistics) takes SVD-LLM's route.
    """
    gram = gram.to(torch.float64)
    gram = (gram + gram.T) / 2
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and torch.isfinite(factor).all():
        return WhiteningFactor("cholesky", factor)
    eps = rel_eps * float(gram.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for step in range(ladder_steps):
        probe = eps * 10.0 ** step
        _, info = torch.linalg.cholesky_ex(gram + probe * eye)
        if int(info) == 0:
            shift = probe + eps
            factor, info = torch.linalg.cholesky_ex(gram + shift * eye)
            if int(info) == 0 and torch.isfinite(factor).all():
                return WhiteningFactor("cholesky", factor, fallback=True, shift=shift)
    lambda_min = float(torch.linalg.eigvalsh(gram)[0])
    shift = max(-lambda_min, 0.0) + eps
    factor, info = torch.linalg.cholesky_ex(gram + shift * eye)
    if int(info) != 0:  # still indefinite through round-off: take a larger step
        shift += abs(lambda_min) + eps
        factor = torch.linalg.cholesky(gram + shift * eye)
    return WhiteningFactor("cholesky", factor, fallback=True, shift=shift)


def eigen_factor(gram: torch.Tensor, rel_floor: float = 1e-12) -> WhiteningFactor:
    """S = Q diag(sqrt(l)) with eigenvalues clamped at rel_floor * max eigenvalue.

    The floor sits just above float64 round-off of eigh (about n * 1e-16 * max): real activation
    Grams span 1e-10 of their largest eigenvalue, and clamping above that would change the
    problem rather than regularise it.
    """
    gram = gram.to(torch.float64)
    gram = (gram + gram.T) / 2
    eigvals, eigvecs = torch.linalg.eigh(gram)
    floor = rel_floor * float(eigvals[-1].clamp_min(1e-30))
    clamped = eigvals.clamp_min(floor)
    fallback = bool((eigvals < floor).any())
    return WhiteningFactor("eigen", eigvecs * clamped.sqrt(), fallback=fallback,
                           eigvals=clamped, eigvecs=eigvecs)


def whitening_factor(gram: torch.Tensor | None, method: str) -> WhiteningFactor | None:
    """Dispatch on --whitening; None for plain SVD."""
    if method == "none":
        return None
    if gram is None:
        raise ValueError(f"--whitening {method} needs calibration statistics (run step 1)")
    if method == "cholesky":
        return cholesky_factor(gram)
    if method == "eigen":
        return eigen_factor(gram)
    raise ValueError(f"unknown whitening {method!r}; choose one of {WHITENING_METHODS}")
