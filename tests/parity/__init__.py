"""Runners of the reference-parity fixtures: one module per method, each with ``run(case) -> dict``."""
