"""The one low-rank linear layer of the toolkit.

W (out x in) is replaced by u @ v with v: in -> rank (no bias) and u: rank -> out (carrying
the original bias), so y = u(v(x)). Parameters: rank * (in + out) (+ out for the bias). Step 8 may replace u and/or v by
component.quant_linear.QuantLinear (packed codes); the forward is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


def largest_entry_fits(dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[bool, float]:
    """(every entry is finite and within `dtype`'s range, the largest |entry|); float16 tops out
    at 65504. Checked on the (float64) source before a cast that would turn it into inf."""
    largest = max(float(t.detach().abs().max()) for t in tensors)
    return (not dtype.is_floating_point or largest <= torch.finfo(dtype).max), largest  # NaN fails too


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.u = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype, device: torch.device | str) -> "LowRankLinear":
        """Build from u (out x r) and v (r x in); the bias (out,) goes on u. ValueError when an
        entry is not finite or does not fit in `dtype` (float16 tops out at 65504)."""
        fits, largest = largest_entry_fits(dtype, u, v)
        if not fits:
            raise ValueError(f"low-rank factors with largest |entry| {largest:.4g} do not fit in {dtype}; "
                             f"use --dtype float32 or bfloat16")
        out_features, rank = u.shape
        module = cls(v.shape[1], out_features, rank, bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            module.u.weight.copy_(u)
            module.v.weight.copy_(v)
            if bias is not None:
                module.u.bias.copy_(bias)
        return module

    @property
    def weight_product(self) -> torch.Tensor:
        """The dense matrix u @ v this module stands for (for tests and analysis); quantized factors
        (component.quant_linear.QuantLinear) count as their de-quantized float32 weights."""
        def dense(factor: nn.Module) -> torch.Tensor:
            return factor.dequantized_weight() if hasattr(factor, "dequantized_weight") else factor.weight
        u, v = dense(self.u), dense(self.v)
        return u.to(v.dtype) @ v if u.dtype != v.dtype else u @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.u.bias is not None}")
