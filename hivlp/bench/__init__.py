"""Benchmarks: measured speed and quality of retrieval, written as JSON + plots under bench/results/."""
