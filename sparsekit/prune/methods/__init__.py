"""Pruning methods that are procedures rather than a single score (one file each).

    slimming     network slimming: L1 penalty on BN scales, then bn_scale pruning (Liu et al. 2017)
    lottery      iterative magnitude pruning with rewinding (Frankle & Carbin 2019; seed 001 initialisations)
    alpha_blend  target-architecture pruning by alpha-blending a narrow branch, then einsum merge (seed 002)
    low_rank     SVD factorisation of Linear/Conv2d to a rank or an energy target (seed 000, sec. 4)
    width_search search of per-layer channel counts under a FLOPs/params budget (ABCPruner, Lin et al. 2020)
    dynamic      per-input channel gates computed through channel-compacted ops (seed 001 "dynamic")
"""

from .alpha_blend import AlphaBlend
from .dynamic import ChannelGate, add_channel_gates
from .lottery import LotteryTicket
from .low_rank import factorize, low_rank, svd_rank
from .slimming import bn_l1_penalty, slimming_pruner
from .width_search import SearchResult, abc_search

__all__ = ["bn_l1_penalty", "slimming_pruner", "LotteryTicket", "AlphaBlend", "factorize", "low_rank",
           "svd_rank", "abc_search", "SearchResult", "ChannelGate", "add_channel_gates"]
