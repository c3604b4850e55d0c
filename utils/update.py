"""Closed-form update of u (SVD-LLM v1, step 2), solved from accumulated normal equations.

After layers before this one were compressed, a linear sees inputs X (tokens x in) that differ
from the original model's. Keeping v, the u that best reproduces the original linear on those
inputs solves
    min_u ||X W^T - X v^T u^T||_F^2 + lam ||u||_F^2
whose normal equations need only the Gram H = X^T X of the inputs:
    u = W H v^T (v H v^T + lam I)^-1.
(The bias is on both sides and cancels.) Everything is float64 and the same on every device:
SVD-LLM's torch.linalg.lstsq picks a different LAPACK driver on CPU and GPU and gave different
models (../shared/notes/closed-form-update.md). lam = ridge * trace(v H v^T) / r scales the
regulariser to the Gram's spectrum; where round-off leaves the normal matrix indefinite (fewer
tokens than the rank) the ridge is raised tenfold until it factors. An update is kept only if it lowers the output error on
held-out calibration windows and does not raise it on the windows it was fitted to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def output_error(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, gram: torch.Tensor) -> float:
    """||X W^T - X (u v)^T||_F^2 = trace((W - u v) H (W - u v)^T), from the Gram alone."""
    diff = weight.to(torch.float64) - u.to(torch.float64) @ v.to(torch.float64)
    return float(((diff @ gram.to(torch.float64)) * diff).sum())


@dataclass
class UpdateResult:
    u: torch.Tensor
    accepted: bool
    fit_error_before: float
    fit_error_after: float | None  # None: no candidate (the solve failed)
    holdout_error_before: float | None
    holdout_error_after: float | None
    ridge: float = 0.0  # the ridge the solve took (inf: none factored)


def closed_form_u(weight: torch.Tensor, v: torch.Tensor, gram: torch.Tensor,
                  ridge: float = 1e-6, max_ridge: float = 1e-2) -> tuple[torch.Tensor | None, float]:
    """argmin_u ||X W^T - X v^T u^T||^2 + lam ||u||^2 (float64) and the ridge it took.

    With fewer tokens than the rank, v H v^T is singular and round-off can leave it indefinite
    below the requested ridge: the ridge is raised tenfold (one Cholesky each) up to max_ridge;
    (None, inf) when even that does not factor, and the caller keeps u as it is."""
    weight, v, gram = (t.to(torch.float64) for t in (weight, v, gram))
    vh = v @ gram  # r x in
    normal = vh @ v.T  # v H v^T, r x r
    normal = (normal + normal.T) / 2
    scale = float(normal.trace()) / normal.shape[0]
    rhs = weight @ vh.T  # W H v^T, out x r
    eye = torch.eye(normal.shape[0], dtype=normal.dtype, device=normal.device)
    while ridge <= max_ridge * (1 + 1e-9):
        # u = rhs normal^-1  <=>  normal u^T = rhs^T (normal is symmetric positive definite)
        chol, info = torch.linalg.cholesky_ex(normal + ridge * scale * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.T, chol).T, ridge
        ridge = max(ridge * 10, 1e-9)
    return None, float("inf")


def update_u(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, gram_fit: torch.Tensor,
             gram_holdout: torch.Tensor | None = None, ridge: float = 1e-6) -> UpdateResult:
    """Solve for a new u on gram_fit; keep it only where it helps (see module docstring)."""
    candidate, used_ridge = closed_form_u(weight, v, gram_fit, ridge)
    fit_before = output_error(weight, u, v, gram_fit)
    ho_before = output_error(weight, u, v, gram_holdout) if gram_holdout is not None else None
    if candidate is None:  # the normal equations did not factor even with the largest ridge
        return UpdateResult(u.to(torch.float64), False, fit_before, None, ho_before, None, used_ridge)
    fit_after = output_error(weight, candidate, v, gram_fit)
    accepted = fit_after <= fit_before
    ho_after = None
    if gram_holdout is not None:
        ho_after = output_error(weight, candidate, v, gram_holdout)
        accepted = accepted and ho_after < ho_before
    return UpdateResult(candidate if accepted else u.to(torch.float64), accepted,
                        fit_before, fit_after, ho_before, ho_after, used_ridge)
