"""Benchmarks (not tests): ``python -m bench quant|layer|all [--quick]``. Rows go to ``bench/results/*.jsonl``."""
