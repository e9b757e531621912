"""Benchmarking shared by `igfast bench` and the scripts in benchmarks/: the built-in
workloads, interleaved timing, and the side-by-side report."""
