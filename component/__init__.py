from component.low_rank_linear import LowRankLinear

__all__ = ["LowRankLinear"]
