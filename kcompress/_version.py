"""The package version (one place; the artifact and the report record it)."""

__version__ = "0.1.0"
