"""The benchmark harness: `python -m bench [scenario ...]` (see bench/README.md). Never run by the tests."""
