"""Benchmarks: each module is a command (`python -m benchmarks.<name>`) printing a table and writing JSON."""
