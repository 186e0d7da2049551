"""Benchmarks, each run from the repository root as a module: python -m bench.train_step ..."""
