"""Warnings about a finished compression that a user should not miss: a fit that explains almost nothing of
its matrix (of its weight, or after calibration of its outputs on the held-out calibration inputs: what the
calibrated fit minimises), compressed matrices that hold more values than the dense ones, and recurrent
matrices that ``targets`` left dense (with the whole-model ratio that leaves)."""

from __future__ import annotations

from typing import cast

from kcompress.report.record import Report

#: a fit whose relative error is at least this explains almost nothing of its matrix
UNEXPLAINED_ERROR = 0.95


def result_warnings(report: Report) -> list[str]:
    """The warnings for ``report``'s rows and totals (``compress`` adds them to ``report.warnings``)."""
    messages = []
    compressed = [row for row in report.matrices if row.compressed]
    for row in compressed:
        # after calibration the held-out output error; else the weight's (a finished compression's rows carry floats)
        error = row.output_error_after if row.output_error_after is not None else cast(float, row.relative_error)
        what = "relative error" if row.output_error_after is None else "held-out output error"
        if error >= UNEXPLAINED_ERROR:
            messages.append(f"{row.name}: the fit explains almost nothing ({what} {error:.3f}); "
                            f"use a larger rank or another format")
    grown = [row.name for row in compressed if row.params_after > row.params_before]
    if grown:
        names = ", ".join(grown[:3]) + (", ..." if len(grown) > 3 else "")
        messages.append(f"compressed is larger than dense: {report.compressed_params_after:,} vs "
                        f"{report.compressed_params_before:,} parameters ({report.compression_ratio:.2f}x; grown: "
                        f"{names}); use a smaller rank or a larger --ratio")
    dense = [row for row in report.matrices if not row.compressed and row.rank_used is None
             and row.matrix.startswith(("weight_ih", "weight_hh"))]
    if dense:
        kept = sum(row.params_before for row in dense)
        messages.append(f"{len(dense)} recurrent matrices left dense by targets={report.options.get('selection', {}).get('targets')!r} "
                        f"({kept:,} parameters, e.g. {dense[0].name}): the model ratio is "
                        f"{report.model_compression_ratio:.2f}x; targets='ih,hh' compresses them too")
    return messages
