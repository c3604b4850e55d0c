"""A linear layer whose weight is stored quantized: packed integer codes plus per-group scales.

W (out x in) is held as b-bit codes c, packed row by row as in gptq/pack.py (LSB-first bit stream;
8 bits: one code per byte; 4: two; 2: four; 3: eight codes in three bytes), and per (row, group)
float16 ``scales`` and ``zeros``; it reads back as W = scale * (c - zero), computed in float32
exactly as gptq.quant.dequantize does (the expression GPTQ's error feedback used). Column j uses
group g_idx[j] when the layer carries ``g_idx`` (GPTQ's act_order with groups), else j // groupsize.
The buffers are the layer's state: qweight (uint8), scales, zeros (float16), g_idx (int32, only
with act_order groups), and a bias parameter in the model's dtype.

De-quantization is per forward by default: each call unpacks the codes into a temporary float
weight, so the layer keeps only its packed bytes in memory (4-bit, group 128: 0.27 of float16).
``cache_weight=True`` (or ``set_weight_cache(model, True)``) instead keeps the de-quantized weight
after the first call as a non-persistent buffer: as fast as a dense layer, as large in memory, and
never saved. Measured costs: docs/quantization.md.

A LowRankLinear whose u and/or v are QuantLinear is a quantized low-rank layer: nothing else changes.

Only torch is used here: utils/hf_remote.py copies `unpack_codes` and `QuantLinear` verbatim into
the modeling file of every saved directory, so transformers' trust_remote_code loader runs this
very code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unpack_codes(packed: torch.Tensor, bits: int, columns: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The codes (rows x columns) of rows packed by gptq.pack (its exact inverse), as `dtype`
    (float32 straight from the bytes when the caller computes with them)."""
    rows, width = packed.shape
    if bits == 8:
        return packed[:, :columns].to(dtype)
    if bits in (4, 2):  # code k of byte b is (b >> bits * k) & mask, LSB first
        per_byte, mask = 8 // bits, 2 ** bits - 1
        codes = torch.empty(rows, width, per_byte, dtype=dtype, device=packed.device)
        for k in range(per_byte):
            codes[..., k] = (packed >> (bits * k)) & mask
        codes = codes.view(rows, width * per_byte)
        return codes if codes.shape[1] == columns else codes[:, :columns].contiguous()
    if bits == 3:  # 8 codes in 3 bytes: v = b0 | b1 << 8 | b2 << 16, code k = (v >> 3k) & 7
        triples = packed.reshape(rows, -1, 3).to(torch.int32)
        v = triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        codes = ((v[..., None] >> shifts) & 7).reshape(rows, -1)[:, :columns]
        return codes.to(dtype).contiguous()
    raise ValueError(f"no packed layout for {bits} bits (2, 3, 4 and 8 are packed)")


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as packed ``bits``-bit codes and float16 scales / zeros."""

    def __init__(self, in_features: int, out_features: int, bits: int, groupsize: int = -1,
                 bias: bool = False, g_idx: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, cache_weight: bool = False):
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"QuantLinear stores 2, 3, 4 or 8 bits, got {bits}")
        if groupsize != -1 and groupsize < 1:
            raise ValueError(f"groupsize must be -1 or positive, got {groupsize}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.groupsize = bits, groupsize
        self.n_groups = 1 if groupsize == -1 else -(-in_features // groupsize)
        per_unit, unit_bytes = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (8, 3)}[bits]
        row_bytes = -(-in_features // per_unit) * unit_bytes
        self.register_buffer("qweight", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, self.n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, self.n_groups, dtype=torch.float16, device=device))
        if g_idx:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        else:
            self.register_buffer("g_idx", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.cache_weight = cache_weight
        self.register_buffer("weight_cache", None, persistent=False)

    def codes(self) -> torch.Tensor:
        """The uint8 codes (out x in)."""
        return unpack_codes(self.qweight, self.bits, self.in_features).clone()

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight scale * (codes - zero), original column order (computed in place on
        the float codes: one (out x in) float32 temporary)."""
        weight = unpack_codes(self.qweight, self.bits, self.in_features, torch.float32)
        scales, zeros = self.scales.float(), self.zeros.float()
        if self.g_idx is not None:
            index = self.g_idx.long()
            return weight.sub_(zeros[:, index]).mul_(scales[:, index])
        step = self.in_features if self.n_groups == 1 else self.groupsize
        groups = self.in_features // step
        full = groups * step
        if groups:  # whole groups as an (out, groups, step) view: no index tensor
            grouped = weight[:, :full].unflatten(1, (groups, step))
            grouped.sub_(zeros[:, :groups, None]).mul_(scales[:, :groups, None])
        if full < self.in_features:  # the last, shorter group
            weight[:, full:].sub_(zeros[:, groups:]).mul_(scales[:, groups:])
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_cache
        if weight is None or weight.dtype != x.dtype:
            weight = self.dequantized_weight().to(x.dtype)
            if self.cache_weight:
                self.weight_cache = weight
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _apply(self, fn, recurse=True):
        # a dtype cast of the model (model.half(), .to(bfloat16)) must not round the float16
        # scales and zeros: they move with the module but keep their dtype and values
        kept = {name: self._buffers[name] for name in ("scales", "zeros")}
        self.weight_cache = None
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            moved = self._buffers[name]
            if moved.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(moved.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.weight_cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groupsize={self.groupsize}, g_idx={self.g_idx is not None}, bias={self.bias is not None}")


# ------------------------------------------------------------------------------------ toolkit side
# (not copied into the modeling file: it needs gptq/)

def quant_linear_from(quantized, bias: torch.Tensor | None, dtype: torch.dtype,
                      device: torch.device | str | None = None, cache_weight: bool = False) -> QuantLinear:
    """A QuantLinear holding a gptq.QuantizedWeight: codes packed, scales and zeros in float16.

    ValueError when a scale does not fit in float16 (|w| beyond 65504 * 2^bits)."""
    from gptq import pack
    out_features, in_features = quantized.codes.shape
    scales = quantized.scale.to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"a quantization scale does not fit in float16 (weights beyond about 65504 x "
                         f"2^{quantized.bits}); scale the layer down or keep it unquantized")
    module = QuantLinear(in_features, out_features, quantized.bits, quantized.groupsize, bias is not None,
                         quantized.g_idx is not None, dtype=dtype, device=device, cache_weight=cache_weight)
    packed, _ = pack(quantized.codes.contiguous(), quantized.bits)
    with torch.no_grad():
        module.qweight.copy_(packed)
        module.scales.copy_(scales)
        module.zeros.copy_(quantized.zero)  # integers 0..255: exact in float16
        if quantized.g_idx is not None:
            module.g_idx.copy_(quantized.g_idx)
        if bias is not None:
            module.bias.copy_(bias)
    return module


def set_weight_cache(model: nn.Module, enabled: bool) -> int:
    """Switch every QuantLinear of `model` to cached (dense after the first call) or per-forward
    de-quantization; returns how many layers were switched. Turning it off frees the caches."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.cache_weight = enabled
            if not enabled:
                module.weight_cache = None
            count += 1
    return count
