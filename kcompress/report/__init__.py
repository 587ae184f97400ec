"""The Report of one compression (:mod:`.record`, its rows in :mod:`.rows`) and its renderings (:mod:`.text`,
:mod:`.allocation_table`, :mod:`.checks`). Import ``Report`` from :mod:`kcompress.report.record` (or ``kcompress.Report``):
the package itself loads nothing, so the CLI's text helpers import without torch."""
