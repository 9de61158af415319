"""`make bench`: benchmarks printed as a table and written to bench-results.json."""
