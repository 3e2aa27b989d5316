"""The installed package's version: results and tuned VAEs record it (a leaf module, imported by any layer)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attndistill")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"
