"""Standalone benchmarks (not part of the test suite): `make bench`."""
