"""Experiment scripts and configs built on jqlm (benchmarks, sweeps)."""
