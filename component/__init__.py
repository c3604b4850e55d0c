from component.low_rank_linear import LowRankLinear, largest_entry_fits

__all__ = ["LowRankLinear", "largest_entry_fits"]
