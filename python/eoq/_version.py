"""The package version, in one place (the folders eoq writes record it)."""

__version__ = "0.1.0"
