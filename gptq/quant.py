"""Min-max integer quantization of a weight matrix (out x in), per output row and input group.

This is the grid both GPTQ and round-to-nearest (RTN) quantize onto. A weight entry w in row r and
group g is stored as an unsigned code c in [0, 2^bits - 1] and read back as

    w_hat = scale[r, g] * (c - zero[r, g])

``scale`` is rounded (up) to the dtype it is stored in (``QuantSpec.scale_dtype``, float16 for the packed
layers) as soon as the grid is made, and ``zero`` is an integer kept in float32 (exact in float16 too,
being at most 255), so the dequantized value is a single float32 multiply of two exactly known,
exactly stored numbers: the solve (whose error feedback and recorded loss use it), ``QuantizedWeight.
dequantize`` and the stored layer compute the same expression and agree bit for bit.

Groups are ``groupsize`` consecutive input columns (the last one may be shorter);
``groupsize=-1`` means one group per output row (per-channel). A per-column group index ``g_idx``
overrides that layout: GPTQ with act_order forms groups in the order it quantizes the columns,
so the members of one group are scattered over the original columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

#: bit widths the quantizer (RTN, GPTQ) accepts; int6 is ASVD's ``rtn_int6`` baseline
QUANT_BITS = (2, 3, 4, 6, 8)
#: bit widths ``gptq.pack`` can store densely (6 bits would need a 4-codes-in-3-bytes layout)
PACK_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: ``bits`` per code, ``groupsize`` input columns per (scale, zero) pair
    (-1: one pair per output row), ``sym``: zero fixed at 2^(bits-1) so the grid is symmetric
    around 0 (asymmetric min-max otherwise)."""

    bits: int
    groupsize: int = -1
    sym: bool = False
    scale_dtype: torch.dtype = torch.float16  # what the scales are stored in (QuantLinear: float16)

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {QUANT_BITS}, got {self.bits}")
        if self.groupsize != -1 and self.groupsize < 1:
            raise ValueError(f"groupsize must be -1 or positive, got {self.groupsize}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.groupsize == -1 else -(-in_features // self.groupsize)


def stored_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale`` (float32) rounded UP to the nearest value of ``dtype``, returned as float32: the
    scale that will be stored, never smaller than the one asked for, so the grid still covers the
    range it was made for (rounding to nearest would clip the extreme entries of a row by up to
    maxq x half a float16 step)."""
    if dtype == torch.float32:
        return scale
    low = scale.to(dtype)
    # scales are positive: the next representable value up is the bit pattern plus one (any device)
    up = (low.view(torch.int16) + 1).view(dtype)
    return torch.where(low.float() < scale, up, low).float()


def minmax_params(w: Tensor, bits: int, sym: bool = False,
                  scale_dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """Scale and zero (each of shape (rows,), float32) covering every entry of each row of ``w``.

    The scale is rounded up to ``scale_dtype`` (the precision it will be stored in, ``stored_scale``)
    before the zero is chosen, so the grid the caller quantizes onto is the grid that is stored.

    Asymmetric: the range is [min(w, 0), max(w, 0)], so 0 is always exactly representable
    (a zeroed dead column dequantizes to exactly 0). Symmetric: zero = 2^(bits-1) and
    scale = max|w| / (2^(bits-1) - 1), so +-max|w| are both on the grid. (The reference GPTQ uses
    scale = 2 max|w| / maxq, which clips +max|w| by half a step, and keeps min = 0 for an all-positive
    row while still putting zero at mid-range, wasting half the codes; we avoid both.)
    An all-zero row gets scale 1 instead of a division by zero.
    """
    w = w.float()
    maxq = 2 ** bits - 1
    if sym:
        half = 2 ** (bits - 1)
        absmax = w.abs().amax(dim=1)
        scale = absmax / (half - 1)
        scale = stored_scale(torch.where(absmax > 0, scale, torch.ones_like(scale)), scale_dtype)
        zero = torch.full_like(scale, float(half))
        return scale, zero
    wmin = w.amin(dim=1).clamp(max=0)
    wmax = w.amax(dim=1).clamp(min=0)
    scale = (wmax - wmin) / maxq
    flat = scale == 0
    scale = stored_scale(torch.where(flat, torch.ones_like(scale), scale), scale_dtype)
    zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def group_params(w: Tensor, spec: QuantSpec) -> Tuple[Tensor, Tensor]:
    """Scale and zero of shape (out, n_groups) for groups of ``spec.groupsize`` consecutive columns."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out x in), got shape {tuple(w.shape)}")
    step = w.shape[1] if spec.groupsize == -1 else spec.groupsize
    pairs = [minmax_params(w[:, i:i + step], spec.bits, spec.sym, spec.scale_dtype) for i in range(0, w.shape[1], step)]
    return torch.stack([p[0] for p in pairs], dim=1), torch.stack([p[1] for p in pairs], dim=1)


def column_group_index(in_features: int, groupsize: int, device=None) -> Tensor:
    """Group of each input column in the plain layout: column j is in group j // groupsize."""
    cols = torch.arange(in_features, device=device)
    return torch.zeros_like(cols) if groupsize == -1 else cols // groupsize


def expand_params(p: Tensor, in_features: int, groupsize: int, g_idx: Optional[Tensor] = None) -> Tensor:
    """(out, n_groups) -> (out, in): the parameter that applies to each column."""
    idx = g_idx if g_idx is not None else column_group_index(in_features, groupsize, p.device)
    return p[:, idx.to(p.device).long()]


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int,
                   groupsize: int = -1, g_idx: Optional[Tensor] = None) -> Tensor:
    """uint8 codes clamp(round(w / scale) + zero, 0, 2^bits - 1).

    ``scale``/``zero`` are (out, n_groups) with the group layout given by ``groupsize`` or
    ``g_idx``, or already (out, 1) / (out, in) for one column or a pre-expanded layout
    (pass ``groupsize=-1`` then).
    """
    w = w.float()
    if scale.shape[1] not in (1, w.shape[1]) or g_idx is not None:
        scale = expand_params(scale, w.shape[1], groupsize, g_idx)
        zero = expand_params(zero, w.shape[1], groupsize, g_idx)
    q = torch.round(w / scale) + zero
    return q.clamp_(0, 2 ** bits - 1).to(torch.uint8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor,
               groupsize: int = -1, g_idx: Optional[Tensor] = None) -> Tensor:
    """float32 scale * (codes - zero), parameters laid out as in ``quantize_codes``."""
    if scale.shape[1] not in (1, codes.shape[1]) or g_idx is not None:
        scale = expand_params(scale, codes.shape[1], groupsize, g_idx)
        zero = expand_params(zero, codes.shape[1], groupsize, g_idx)
    return scale * (codes.float() - zero)


@dataclass
class QuantizedWeight:
    """A quantized (out x in) weight.

    ``codes`` (uint8, out x in) are in the ORIGINAL input column order, whatever order the solve
    quantized the columns in. ``scale``/``zero`` are (out, n_groups) float32, the scales holding values
    of ``QuantSpec.scale_dtype`` (float16) so that storing them loses nothing. Column j uses group
    ``g_idx[j]`` when ``g_idx`` is set (GPTQ act_order with dynamic groups: groups are runs of
    ``groupsize`` columns in quantization order), else group j // groupsize. ``perm`` is the
    act_order permutation (``perm[k]`` = original index of the k-th quantized column) or None;
    it is informational: dequantization needs only ``g_idx``, which equals
    ``argsort(perm) // groupsize`` in that mode and so costs no storage beyond ``perm``.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    groupsize: int = -1
    sym: bool = False
    perm: Optional[Tensor] = None
    g_idx: Optional[Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def group_index(self) -> Tensor:
        """Group of each original input column."""
        if self.g_idx is not None:
            return self.g_idx
        return column_group_index(self.codes.shape[1], self.groupsize, self.codes.device)

    def dequantize(self) -> Tensor:
        """The float32 weight, original column order, exactly as the solve's error feedback saw it."""
        return dequantize(self.codes, self.scale, self.zero, self.groupsize, self.g_idx)


def rtn(w: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest onto the min-max grid of each (row, group): the baseline GPTQ must beat,
    and ASVD's ``--weight_quant rtn_int8`` / ``rtn_int6`` (bits=8 / bits=6, groupsize=-1)."""
    w = w.detach().float()
    scale, zero = group_params(w, spec)
    codes = quantize_codes(w, scale, zero, spec.bits, spec.groupsize)
    return QuantizedWeight(codes, scale, zero, spec.bits, spec.groupsize, spec.sym)
