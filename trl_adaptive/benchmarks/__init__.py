"""Built-in benchmarks (offline)."""
