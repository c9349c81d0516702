"""Pure-torch analyses (no Lightning imports): model views, probe sets, one module per phenomenon,
the offline runner and plots. Importing this package registers every analysis."""

from dynascope.analysis import basic, frequency, outliers, regions, sparsity, vocab  # noqa: F401  (registers them)
from dynascope.analysis.base import REGISTRY, Analysis, build, resolve

__all__ = ["REGISTRY", "Analysis", "build", "resolve"]
