"""The embedded EViP demo: bundled synthetic data, base LM, evaluation and the `make demo` pipeline."""
