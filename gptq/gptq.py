"""GPTQ (Frantar et al., ICLR 2023): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse input Hessian.

For a linear y = x W^T on calibration inputs X, the layer's squared output error is
tr((W - Q) H (W - Q)^T) / 2 with H = 2 X^T X / n. Quantizing column j to q_j and updating the
remaining columns by -(w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j+1:} is the optimal (OBS) compensation;
using the rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U) instead of H^-1 itself gives
the same updates for the shrinking Hessians in one factorization. Columns are processed in blocks
of ``blocksize``: inside a block every column updates the block eagerly, the rest of the matrix
gets the block's accumulated error in one matmul ("lazy batch" updates).

Differences from IST-DASLab/gptq, each for correctness rather than speed:
- dynamic group parameters are computed on the CURRENT values of the group's columns; the
  reference reads them from W, which lacks the eager in-block updates of the current block.
- with act_order and groups, groups are runs of ``groupsize`` columns in quantization order and
  the result stores ``g_idx`` (each original column's group) and returns codes in the original
  column order, so dequantization cannot mix up group membership; ``static_groups`` instead
  fixes groups on the original columns from the unmodified weight, before any update.
- H is accumulated in float64 and factorized there; a failed Cholesky retries with 10x damping.
- the scales are rounded to the precision they are stored in (``spec.scale_dtype``, float16) before
  any column is quantized, so the Q the error feedback and ``last_loss`` use is the stored weight.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .quant import QuantSpec, QuantizedWeight, group_params, minmax_params


class GPTQ:
    """Accumulates the input Hessian of one linear layer, then quantizes a weight against it.

    ``add_batch`` keeps the running mean of the reference: after n tokens H = 2/n sum x x^T
    (H *= n/(n+b); H += 2/(n+b) x^T x), in ``dtype`` (float64 by default: a sum over millions of
    tokens in float32 loses the small eigenvalues GPTQ's updates depend on). Tokens are counted
    as rows of x (the reference counts sequences; the scale of H does not matter to the solve,
    whose damping is relative, but a per-token mean is what the name says).
    """

    def __init__(self, in_features: int, device: Optional[torch.device | str] = None,
                 dtype: torch.dtype = torch.float64) -> None:
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.H = torch.zeros(in_features, in_features, device=self.device, dtype=dtype)
        self.nsamples = 0
        self.last_loss: Optional[float] = None
        self.q_used: Optional[Tensor] = None

    @classmethod
    def from_hessian(cls, H: Tensor, nsamples: int) -> "GPTQ":
        """A solver for a layer whose H = 2/n sum x x^T is already known (n = ``nsamples``), e.g.
        the input Hessian of u in y = u(v x), which is V H_x V^T for the Hessian H_x of x."""
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"expected a square Hessian, got {tuple(H.shape)}")
        if nsamples < 1:
            raise ValueError(f"nsamples must be positive, got {nsamples}")
        solver = cls(H.shape[0], H.device, H.dtype)
        solver.H = H.clone()
        solver.nsamples = int(nsamples)
        return solver

    def add_batch(self, x: Tensor) -> None:
        """Add inputs x (..., in_features) of the layer to H."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(self.device, self.H.dtype)
        b = x.shape[0]
        if b == 0:
            return
        total = self.nsamples + b
        self.H *= self.nsamples / total
        self.H.addmm_(x.T, x, alpha=2.0 / total)
        self.nsamples = total

    def free(self) -> None:
        self.H = None
        self.q_used = None

    def _upper_cholesky_of_inverse(self, H: Tensor, percdamp: float) -> Tensor:
        """U with U^T U = (H + damp I)^-1, damp = percdamp * mean(diag H), raised 10x on failure."""
        damp = percdamp * torch.mean(torch.diag(H))
        eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
        for _ in range(4):
            L, info = torch.linalg.cholesky_ex(H + damp * eye)
            if int(info) == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if int(info) == 0:
                    return U
            damp = damp * 10 if damp > 0 else torch.mean(torch.diag(H)) * 1e-2
        raise torch.linalg.LinAlgError("GPTQ: H + damp I is not positive definite even with 1000x damping")

    def solve(self, weight: Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
              act_order: bool = False, static_groups: bool = False,
              keep_q: bool = False) -> QuantizedWeight:
        """Quantize ``weight`` (out x in_features) with GPTQ; H is not modified (solve may be rerun).

        act_order: quantize columns by decreasing H_jj (the most "active" inputs first, while the
        most columns remain to absorb their error). static_groups: group parameters from the
        original weight in original column groups (what a kernel without g_idx needs).
        keep_q: keep the float Q the error feedback used (original order) in ``self.q_used``.
        Sets ``self.last_loss``, GPTQ's estimate sum (w - q)^2 / (2 [U]_jj^2) of the output error.
        """
        if self.H is None or self.nsamples == 0:
            raise RuntimeError("GPTQ.solve needs add_batch calls first")
        if weight.dim() != 2 or weight.shape[1] != self.in_features:
            raise ValueError(f"expected a weight (out x {self.in_features}), got {tuple(weight.shape)}")
        W = weight.detach().to(self.device, torch.float32).clone()
        rows, cols = W.shape
        gs = spec.groupsize
        grouped = gs != -1 and gs < cols

        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        # parameters fixed before the loop: one group per row, or static groups on original columns
        if not grouped:
            fixed_scale, fixed_zero = minmax_params(W, spec.bits, spec.sym, spec.scale_dtype)
            fixed_scale, fixed_zero = fixed_scale[:, None], fixed_zero[:, None]
        elif static_groups:
            fixed_scale, fixed_zero = group_params(W, spec)

        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
        U = self._upper_cholesky_of_inverse(H, percdamp).to(torch.float32)
        del H

        codes = torch.empty(rows, cols, dtype=torch.uint8, device=self.device)
        Q = torch.empty(rows, cols, dtype=torch.float32, device=self.device)
        losses = torch.zeros(rows, device=self.device, dtype=torch.float64)
        dyn_scale, dyn_zero = [], []
        s = z = None
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                if not grouped:
                    s, z = fixed_scale[:, 0], fixed_zero[:, 0]
                elif static_groups:
                    g = int(perm[j]) // gs if perm is not None else j // gs
                    s, z = fixed_scale[:, g], fixed_zero[:, g]
                elif j % gs == 0:
                    # the group's columns as they are now: eager in-block values, plus the block's
                    # pending lazy update for the columns past this block
                    end = min(j + gs, cols)
                    current = W1[:, i:min(end, i2) - i1]
                    if end > i2:
                        ahead = W[:, i2:end] - Err1[:, :i] @ U[i1:j, i2:end]
                        current = torch.cat([current, ahead], dim=1)
                    s, z = minmax_params(current, spec.bits, spec.sym, spec.scale_dtype)
                    dyn_scale.append(s)
                    dyn_zero.append(z)
                w = W1[:, i]
                d = U1[i, i]
                c = torch.round(w / s).add_(z).clamp_(0, spec.maxq).to(torch.uint8)
                q = s * (c.float() - z)  # the exact expression of quant.dequantize
                codes[:, j] = c
                Q[:, j] = q
                err = (w - q) / d
                losses += (err.double() ** 2) / 2
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

        g_idx = None
        if perm is not None:
            inv = torch.argsort(perm)
            codes = codes[:, inv]
            Q = Q[:, inv]
            if grouped and not static_groups:
                g_idx = (inv // gs).to(torch.int32)
        if grouped and not static_groups:
            scale, zero = torch.stack(dyn_scale, dim=1), torch.stack(dyn_zero, dim=1)
        else:
            scale, zero = fixed_scale, fixed_zero
        self.last_loss = float(losses.sum())
        self.q_used = Q if keep_q else None
        return QuantizedWeight(codes.contiguous(), scale.contiguous(), zero.contiguous(), spec.bits,
                               gs, spec.sym, perm, g_idx)
