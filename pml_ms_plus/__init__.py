"""pml_ms_plus: a faster, fuller Multi-Similarity loss for pytorch-metric-learning."""

__version__ = "0.1.0"

from . import functional, losses, miners  # noqa: E402

__all__ = ["functional", "losses", "miners", "__version__"]
