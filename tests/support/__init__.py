"""The harness shared by the test suite and the benchmarks: seeding, real processes."""
