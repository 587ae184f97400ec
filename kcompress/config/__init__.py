"""The typed settings of a compression, built once at the edge and passed down unchanged."""

from kcompress.config.compress import CONFIG_VERSION, CompressConfig

__all__ = ["CONFIG_VERSION", "CompressConfig"]
