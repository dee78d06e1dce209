"""The sweep: trials over methods, λ and seeds, their executors (local, Ray, vLLM) and the choice."""
