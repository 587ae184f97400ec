"""The entry functions: compress a model, compress a file, search a budget, run a grid (and their trials and executors)."""
