"""Salala benchmarks: `make bench` prints a table and writes JSON to bench/results/."""
