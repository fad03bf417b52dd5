"""audience-sync: SQL-defined audiences synced to Everflow and Refersion."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("audience-sync")
except PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0.0.0"
