"""The MS loss family as PML losses."""

from .adaptive import AdaptiveMSLoss
from .gathered import GatheredMSLoss
from .memory import CrossBatchMemory
from .ms import MSLoss, MultiSimilarityLoss
from .problem import MSProblem, Thresholds

__all__ = [
    "AdaptiveMSLoss",
    "CrossBatchMemory",
    "GatheredMSLoss",
    "MSLoss",
    "MSProblem",
    "MultiSimilarityLoss",
    "Thresholds",
]
