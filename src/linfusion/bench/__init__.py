"""Benchmarks shipped with the package, so that ``linfusion bench ...`` works from any install."""
