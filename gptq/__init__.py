"""Quantization of weight matrices (step 8 of the pipeline): pure tensor code, no models.

- ``quant``: the min-max integer grid, round-to-nearest (RTN) and ``QuantizedWeight``;
- ``gptq``: GPTQ's Hessian-aware column-by-column quantization with error feedback;
- ``pack``: dense bit packing of the codes and the theoretical size they should take.
"""
from .gptq import GPTQ
from .pack import pack, packed_nbytes, packed_row_bytes, unpack
from .quant import (PACK_BITS, QUANT_BITS, QuantizedWeight, QuantSpec, dequantize, group_params,
                    minmax_params, quantize_codes, rtn)

__all__ = [
    "GPTQ", "PACK_BITS", "QUANT_BITS", "QuantSpec", "QuantizedWeight", "dequantize", "group_params",
    "minmax_params", "pack", "packed_nbytes", "packed_row_bytes", "quantize_codes", "rtn", "unpack",
]
