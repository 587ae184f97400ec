"""Plan every targeted matrix (errors before any fit), fit it, and put the compressed layer in place."""
