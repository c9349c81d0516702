"""The installed dynascope's version, which pages and the CLI state."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dynascope")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "unknown"
