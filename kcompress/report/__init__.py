"""The Report of one compression and its renderings (text, allocation table, result checks)."""

from kcompress.report.record import Report

__all__ = ["Report"]
