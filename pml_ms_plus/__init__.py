"""pml_ms_plus: a faster, fuller Multi-Similarity loss for pytorch-metric-learning."""

from importlib.metadata import PackageNotFoundError, version

try:  # the version is set once, in pyproject.toml, and read from the installed metadata
    __version__: str = version("pml_ms_plus")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from . import functional, losses, miners  # noqa: E402

__all__ = ["functional", "losses", "miners", "__version__"]
