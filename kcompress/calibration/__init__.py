"""Data-aware fitting: second moments of each matrix's inputs (hooks), gate-row weights, the calibrated fit over candidates, distillation."""
