"""Dense bit packing of uint8 codes, so a b-bit weight really takes b bits per entry on disk.

Layout: each row (last dimension) is packed on its own, as a little-endian bit stream, LSB first:
code k of a row occupies bits [b*k, b*k + b) of the row's stream, and stream bit t is bit t % 8 of
byte t // 8. Rows are padded with zero codes to a whole packing unit:

- 8 bits: 1 code per byte, the codes as they are;
- 4 bits: 2 codes per byte, code 2i in the low nibble, code 2i+1 in the high nibble;
- 2 bits: 4 codes per byte, code 4i+k in bits 2k..2k+1;
- 3 bits: 8 codes c0..c7 in 3 bytes, v = sum c_k << 3k (24 bits) stored as bytes
  v & 0xFF, (v >> 8) & 0xFF, v >> 16; so byte 0 = c0 | c1 << 3 | (c2 & 3) << 6,
  byte 1 = c2 >> 2 | c3 << 1 | c4 << 4 | (c5 & 1) << 7, byte 2 = c5 >> 1 | c6 << 2 | c7 << 5.

A row of n codes takes ceil(n / k) * m bytes for k codes per m-byte unit. 6 bits is not packed
(it would need 4 codes in 3 bytes; the int6 RTN baseline is a quality reference, not a format).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

from .quant import PACK_BITS

#: bits -> (codes per unit, bytes per unit)
_UNITS = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (8, 3)}


def _unit(bits: int) -> Tuple[int, int]:
    if bits not in PACK_BITS:
        raise ValueError(f"packing supports bits {PACK_BITS}, got {bits}")
    return _UNITS[bits]


def packed_row_bytes(n_codes: int, bits: int) -> int:
    """Bytes one packed row of ``n_codes`` codes takes (the padding to a whole unit included)."""
    k, m = _unit(bits)
    return -(-n_codes // k) * m


def pack(codes: Tensor, bits: int) -> Tuple[Tensor, torch.Size]:
    """Pack uint8 ``codes`` (any shape, rows = last dimension) into (rows, packed_row_bytes) uint8.

    Returns the packed bytes and the original shape, which ``unpack`` needs to drop the padding.
    """
    k, m = _unit(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension")
    shape = codes.shape
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise ValueError(f"a code {int(codes.max())} does not fit in {bits} bits")
    cols = shape[-1]
    rows = codes.reshape(-1, cols) if cols else codes.reshape(math.prod(shape[:-1]), 0)
    if bits == 8:
        return rows.clone(), shape
    units = -(-cols // k)
    padded = torch.zeros(rows.shape[0], units * k, dtype=torch.int32, device=codes.device)
    padded[:, :cols] = rows.to(torch.int32)
    shifts = torch.arange(k, device=codes.device, dtype=torch.int32) * bits
    v = (padded.reshape(rows.shape[0], units, k) << shifts).sum(dim=2, dtype=torch.int32)
    byte_shifts = torch.arange(m, device=codes.device, dtype=torch.int32) * 8
    packed = (v[..., None] >> byte_shifts) & 0xFF
    return packed.reshape(rows.shape[0], units * m).to(torch.uint8), shape


def unpack(packed: Tensor, bits: int, shape: Sequence[int]) -> Tensor:
    """The exact inverse of ``pack``: uint8 codes of ``shape``."""
    k, m = _unit(bits)
    shape = torch.Size(shape)
    cols = shape[-1]
    n_rows = math.prod(shape[:-1])
    if packed.shape != (n_rows, packed_row_bytes(cols, bits)):
        raise ValueError(f"packed shape {tuple(packed.shape)} does not match codes of shape {tuple(shape)}")
    if bits == 8:
        return packed.clone().reshape(shape)
    units = packed.shape[1] // m
    byte_shifts = torch.arange(m, device=packed.device, dtype=torch.int32) * 8
    v = (packed.reshape(n_rows, units, m).to(torch.int32) << byte_shifts).sum(dim=2, dtype=torch.int32)
    shifts = torch.arange(k, device=packed.device, dtype=torch.int32) * bits
    codes = (v[..., None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(n_rows, units * k)[:, :cols].to(torch.uint8).reshape(shape)


def packed_nbytes(shape: Sequence[int], bits: int, groupsize: int = -1) -> int:
    """Theoretical bytes of an (out x in) quantized weight: out*in*bits/8 (rounded up) for the codes,
    plus a float16 scale and a float16 zero per (row, group). No padding, no permutation
    (act_order's perm adds in_features small integers, negligible for real layers)."""
    out, inp = int(shape[0]), int(shape[1])
    n_groups = 1 if groupsize == -1 else -(-inp // groupsize)
    return -(-out * inp * bits // 8) + 2 * 2 * out * n_groups
