"""Duo-SVD's column-preserving low-rank layer, beside LowRankLinear.

W (out x in) is kept as a low-rank part on most input columns plus a few input columns exactly:

    y = u(v(x[..., svd_idx])) + c(x[..., col_idx])   (+ the bias, on u)

v: (in - k) -> rank, u: rank -> out, c: k -> out (no bias), svd_idx / col_idx: int64 buffers
(ascending, disjoint, together every input channel). With k = 0 there is no c and no index: the
layer is exactly LowRankLinear (same tensors, same forward). The class uses only torch, so the
Hugging Face export (utils/hf_remote.py) copies its source into the modeling file verbatim.
"""
from __future__ import annotations

import torch
from torch import nn


class ColumnPreservedLinear(nn.Module):
    """y = u(v(x[..., svd_idx])) + c(x[..., col_idx]); tensors v.weight, u.weight, u.bias, c.weight,
    svd_idx, col_idx (no c / indices when no column is kept)."""

    def __init__(self, in_features: int, out_features: int, rank: int, columns: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not 0 <= columns < in_features:
            raise ValueError(f"kept columns must be in [0, {in_features}), got {columns}")
        self.in_features, self.out_features, self.rank, self.columns = in_features, out_features, rank, columns
        self.v = nn.Linear(in_features - columns, rank, bias=False, dtype=dtype, device=device)
        self.u = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)
        if columns:
            self.c = nn.Linear(columns, out_features, bias=False, dtype=dtype, device=device)
            self.register_buffer("svd_idx", torch.arange(in_features - columns, dtype=torch.int64, device=device))
            self.register_buffer("col_idx", torch.arange(in_features - columns, in_features, dtype=torch.int64,
                                                         device=device))
        else:
            self.c = None

    @property
    def weight_product(self) -> torch.Tensor:
        """The dense matrix this module stands for (tests and analysis; float factors only)."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.u.weight.dtype, device=self.u.weight.device)
        low_rank = self.u.weight @ self.v.weight
        if self.c is None:
            return low_rank
        dense[:, self.svd_idx] = low_rank
        dense[:, self.col_idx] = self.c.weight
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.c is None:
            return self.u(self.v(x))
        return self.u(self.v(x.index_select(-1, self.svd_idx))) + self.c(x.index_select(-1, self.col_idx))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"columns={self.columns}, bias={self.u.bias is not None}")


def column_preserved_from(u: torch.Tensor, v: torch.Tensor, columns: torch.Tensor, svd_idx: torch.Tensor,
                          col_idx: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                          device: torch.device | str) -> ColumnPreservedLinear:
    """Build from u (out x r), v (r x (in - k)), the kept columns (out x k) and their indices.
    ValueError when an entry is not finite or does not fit in `dtype`."""
    from component.low_rank_linear import largest_entry_fits
    fits, largest = largest_entry_fits(dtype, u, v, *([columns] if columns.numel() else []))
    if not fits:
        raise ValueError(f"column-preserved factors with largest |entry| {largest:.4g} do not fit in {dtype}; "
                         f"use --dtype float32 or bfloat16")
    k = int(col_idx.numel())
    in_features = int(svd_idx.numel()) + k
    if sorted(torch.cat([svd_idx, col_idx]).tolist()) != list(range(in_features)):
        raise ValueError("svd_idx and col_idx must together cover every input channel once")
    module = ColumnPreservedLinear(in_features, u.shape[0], u.shape[1], k, bias is not None, dtype=dtype,
                                   device=device)
    with torch.no_grad():
        module.u.weight.copy_(u)
        module.v.weight.copy_(v)
        if bias is not None:
            module.u.bias.copy_(bias)
        if k:
            module.c.weight.copy_(columns)
            module.svd_idx.copy_(svd_idx)
            module.col_idx.copy_(col_idx)
    return module
