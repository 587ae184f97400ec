"""Data, evaluation, fine-tuning and layer matching."""
