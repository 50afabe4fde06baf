"""Benchmarks and calculators: FLOPs and KV-cache arithmetic (:mod:`vtprune.bench.flops`)."""
