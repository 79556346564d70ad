"""Benchmarks that ship with the package (so ``csm-ext bench`` can run them after install)."""
