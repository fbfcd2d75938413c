"""The MS loss family as PML losses."""

from .memory import CrossBatchMemory
from .ms import MSLoss, MultiSimilarityLoss

__all__ = ["CrossBatchMemory", "MSLoss", "MultiSimilarityLoss"]
