"""The embedded demo: a tiny aligned chat model built from scratch, its synthetic data, the demo run."""
