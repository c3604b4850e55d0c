from component.column_preserved_linear import ColumnPreservedLinear, column_preserved_from
from component.low_rank_linear import LowRankLinear, largest_entry_fits
from component.quant_linear import QuantLinear, quant_linear_from, set_low_bit_kernel, set_weight_cache, unpack_codes

__all__ = ["ColumnPreservedLinear", "LowRankLinear", "column_preserved_from", "QuantLinear", "largest_entry_fits", "quant_linear_from", "set_low_bit_kernel", "set_weight_cache",
           "unpack_codes"]
