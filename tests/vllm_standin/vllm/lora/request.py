"""vllm.lora.request.LoRARequest: vLLM tells adapters apart by lora_int_id and loads each once."""

from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if self.lora_int_id < 1:  # vLLM reserves 0 for "no LoRA"
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError("lora_path cannot be empty")
