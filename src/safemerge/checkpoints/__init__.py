"""Reading and writing checkpoints: safetensors shards, LoRA adapters, atomic publication."""
