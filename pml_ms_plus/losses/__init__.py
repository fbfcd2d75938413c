"""The MS loss family as PML losses."""

from .adaptive import AdaptiveMSLoss
from .memory import CrossBatchMemory
from .ms import MSLoss, MultiSimilarityLoss

__all__ = ["AdaptiveMSLoss", "CrossBatchMemory", "MSLoss", "MultiSimilarityLoss"]
