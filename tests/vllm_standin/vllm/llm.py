"""vllm.LLM and vllm.SamplingParams on CPU: Hugging Face models, decoded one prompt at a time."""

from __future__ import annotations

import copy
import gc
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from . import standin
from .lora.request import LoRARequest

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for max_lora_rank
DTYPES = {"auto": torch.float32, "float32": torch.float32, "float": torch.float32, "float16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16}
SAMPLING_EPS = 1e-5  # vLLM treats a smaller temperature as greedy


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False
    detokenize: bool = True

    def __post_init__(self):  # vLLM's own checks
        if self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling parameters: {self}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class LLM:
    def __init__(self, model: str, *, tokenizer: str | None = None, tensor_parallel_size: int = 1,
                 dtype: str | torch.dtype = "auto", seed: int = 0, gpu_memory_utilization: float = 0.92,
                 trust_remote_code: bool = False, enable_lora: bool = False, max_lora_rank: int = 16,
                 max_loras: int = 1, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if kwargs:
            raise TypeError(f"LLM() got unexpected keyword arguments {sorted(kwargs)}")
        if max_lora_rank not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank ({max_lora_rank}) must be one of {MAX_LORA_RANKS}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        # vLLM reserves its share of GPU memory at start-up: engines kept alive together must fit in one GPU
        taken = sum(e.gpu_memory_utilization for e in standin.ENGINES if not e.closed)
        if taken + gpu_memory_utilization > 1.0 + 1e-9:
            raise ValueError(f"not enough free GPU memory: live engines hold {taken:.2f} of it, this one asks "
                             f"for {gpu_memory_utilization:.2f}; shut the others down or lower gpu_memory_utilization")
        if not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]  # "auto" is float32 on CPU
        self.model, self.enable_lora, self.gpu_memory_utilization = str(model), enable_lora, gpu_memory_utilization
        self.tensor_parallel_size, self.seed, self.max_lora_rank = tensor_parallel_size, seed, max_lora_rank
        self.closed, self.calls = False, []
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype,
                                                       trust_remote_code=trust_remote_code).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
        # as vLLM: the tokenizer's eos and generation_config's eos_token_id always stop, besides stop_token_ids
        eos = self.hf.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.eos |= {self.tokenizer.eos_token_id} - {None}
        self.loras: dict[int, torch.nn.Module] = {}
        # transformers 5 renamed forward's past_key_values to cache; >= 4.56 is supported
        self.cache_kw = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(dtype=torch_dtype),
                                          engine_core=SimpleNamespace(shutdown=self._shutdown))
        standin.ENGINES.append(self)

    def _shutdown(self):
        self.closed, self.hf, self.loras = True, None, {}  # frees the weights, leaves the ledger
        gc.collect()
        standin.autodump()

    def generate(self, prompts, sampling_params: SamplingParams | None = None, *, use_tqdm=True,
                 lora_request=None) -> list[RequestOutput]:
        if self.closed:
            raise RuntimeError("the engine has been shut down")
        prompts = [prompts] if isinstance(prompts, dict) else list(prompts)
        params = sampling_params or SamplingParams()
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"{len(loras)} LoRA requests for {len(prompts)} prompts: lists must be the same length")
        models = [self._model_for(lora) for lora in loras]
        self.calls.append({"prompts": len(prompts), "loras": sorted({lora.lora_int_id if lora else 0 for lora in loras})})
        outputs = []
        for i, (prompt, model) in enumerate(zip(prompts, models)):
            ids = list(prompt["prompt_token_ids"])
            samples = [self._decode(model, ids, params, k) for k in range(params.n)]
            outputs.append(RequestOutput(str(i), ids, [self._output(k, t, params) for k, t in enumerate(samples)]))
        standin.autodump()
        return outputs

    def _model_for(self, lora: LoRARequest | None):
        """The base model, or its copy with the adapter applied UNMERGED (x·W + s·(x·A)·B), as vLLM runs
        LoRA: loaded once per lora_int_id, as vLLM caches adapters by id."""
        if lora is None:
            return self.hf
        if not self.enable_lora:
            raise ValueError(f"LoRA request {lora.lora_name!r} but LoRA is not enabled: start the LLM with enable_lora=True")
        if lora.lora_int_id not in self.loras:
            import peft

            config = json.loads((Path(lora.lora_path) / "adapter_config.json").read_text())
            rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
            if rank > self.max_lora_rank:
                raise ValueError(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}")
            self.loras[lora.lora_int_id] = peft.PeftModel.from_pretrained(copy.deepcopy(self.hf), lora.lora_path).eval()
        return self.loras[lora.lora_int_id]

    def _output(self, k: int, tokens: list[int], params: SamplingParams) -> CompletionOutput:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if params.detokenize else ""
        hit = self._stop_string(text, params)
        if hit and not params.include_stop_str_in_output:  # as vLLM: the text ends before the stop string
            text = text[:text.index(hit)]
        stopped = hit or (tokens and tokens[-1] in self._stops(params))
        return CompletionOutput(k, text, tokens, "stop" if stopped else "length")

    @staticmethod
    def _stop_string(text: str, params: SamplingParams) -> str | None:
        return next((s for s in params.stop or () if s in text), None)

    def _stops(self, params: SamplingParams) -> set[int]:
        return self.eos | set(params.stop_token_ids or ())

    @torch.inference_mode()
    def _decode(self, model, prompt: list[int], params: SamplingParams, index: int) -> list[int]:
        """One sample as Hugging Face's greedy / sampling decode computes it (KV cache, logits of the last
        position): repetition penalty, then temperature, then top_p, as both HF and vLLM order them."""
        greedy = params.temperature < SAMPLING_EPS
        seed = params.seed if params.seed is not None else self.seed
        generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)  # same sample every run
        stops, seen, new, cache = self._stops(params), list(prompt), [], None
        # no max_tokens: as vLLM, up to the model's context length
        limit = params.max_tokens or self.hf.config.max_position_embeddings - len(prompt)
        inputs = torch.tensor([prompt])
        while len(new) < limit:
            out = model(input_ids=inputs, attention_mask=torch.ones(1, len(seen), dtype=torch.long), use_cache=True,
                        logits_to_keep=1, **{self.cache_kw: cache})
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            logits = out.logits[0, -1].float()
            if params.repetition_penalty != 1.0:  # HF's RepetitionPenaltyLogitsProcessor, over prompt + output
                idx = torch.tensor(seen)
                score = logits[idx]
                logits[idx] = torch.where(score < 0, score * params.repetition_penalty, score / params.repetition_penalty)
            if greedy:
                token = int(logits.argmax())
            else:
                logits = logits / params.temperature
                if params.top_p < 1.0:  # HF's TopPLogitsWarper: drop the least likely tokens below 1 - top_p
                    ordered, order = torch.sort(logits)
                    drop = ordered.softmax(-1).cumsum(-1) <= 1 - params.top_p
                    drop[-1] = False
                    logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
                token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            new.append(token)
            seen.append(token)
            if token in stops:
                break
            # as vLLM's detokenizer: a stop string in the text so far (special tokens skipped) ends the sample
            if params.stop and self._stop_string(self.tokenizer.decode(new, skip_special_tokens=True), params):
                break
            inputs = torch.tensor([[token]])
        return new
