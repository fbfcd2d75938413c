"""The MS loss family as PML losses."""

from .ms import MSLoss, MultiSimilarityLoss

__all__ = ["MSLoss", "MultiSimilarityLoss"]
