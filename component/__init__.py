from component.low_rank_linear import LowRankLinear, largest_entry_fits
from component.quant_linear import QuantLinear, quant_linear_from, set_weight_cache, unpack_codes

__all__ = ["LowRankLinear", "QuantLinear", "largest_entry_fits", "quant_linear_from", "set_weight_cache",
           "unpack_codes"]
