"""Benchmarks run by `tqstore bench ...`; each reports ratios against a same-run baseline."""
