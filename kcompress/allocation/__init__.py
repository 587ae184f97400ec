"""Per-matrix choices under one budget: error curves, the knapsack, and the resolved per-matrix settings."""
