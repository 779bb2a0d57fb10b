"""Benchmark scripts, one per published claim; each prints its tables (see docs/benchmarks.md)."""
