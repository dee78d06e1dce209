"""Generation backends: loading a model, transformers and vLLM."""
