"""purenet's benchmarks: `python -m benchmarks --help`."""
