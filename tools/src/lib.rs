//! Helper programs for tests and benchmarks (see src/bin).
