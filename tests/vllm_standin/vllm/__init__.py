"""NOT vLLM: a CPU stand-in for the small part of vLLM's offline API that safemerge uses, built on
transformers + peft, for safemerge's tests only (tests put ``tests/vllm_standin`` on PYTHONPATH).

It runs the real weights through Hugging Face models on CPU with vLLM's call shapes and checks
(``LLM``, ``SamplingParams``, ``TokensPrompt``, ``LoRARequest``), so tests can see which engine ran on
which weights with which LoRA requests; the start-up and shutdown telemetry is in ``vllm.standin``.
"""

from .llm import LLM, CompletionOutput, RequestOutput, SamplingParams

__version__ = "0.0.0+safemerge-standin"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
