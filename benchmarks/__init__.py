"""Benchmarks of tfnegcache: `python -m benchmarks.<name> [--quick]` from the repository root.

Each writes `results/benchmarks/<name>.json` and `<name>.png` and prints a table.
"""
