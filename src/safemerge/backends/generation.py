"""Generation backends behind one small interface: requests in, completions out.

A request is either chat messages (rendered with the model's own chat template, generation
prompt added) or raw text (tokenized as is, special tokens added: the judges' formats).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from safemerge.backends.stopping import StopWhenDecided

from safemerge.errors import ConfigError

PAPER_SYSTEM_PROMPT = "You are a helpful assistant."


MAX_NEW_TOKENS = 512  # the paper's longest response
SAFETY_REPETITION_PENALTY = 1.2  # the paper's, for safety generations


class GenerationSettings(BaseModel):
    """How responses are generated. The defaults are the paper's safety evaluation settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(SAFETY_REPETITION_PENALTY, gt=0)
    num_samples: int = Field(1, ge=1)  # completions per request (n of pass@k); > 1 needs do_sample
    seed: int = 0
    # a response ends as soon as its text (special tokens skipped) contains one of these: the judge's verdict is fixed
    stop_strings: tuple[str, ...] = ()
    # ... or as soon as its opening decides whether it starts with one of these (see opening_decided)
    stop_openings: tuple[str, ...] = ()

    def key(self) -> dict:
        """The settings as a cache key sees them: stop fields only when set, so the caches of full
        generations made before they existed stay valid."""
        return self.model_dump(exclude={name for name in ("stop_strings", "stop_openings") if not getattr(self, name)})

    @property
    def stops_when_decided(self) -> bool:
        return bool(self.stop_strings or self.stop_openings)


@dataclass(frozen=True)
class Request:
    id: str
    messages: tuple[dict, ...] | None = None  # chat turns: {"role": ..., "content": ...}
    text: str | None = None  # raw prompt, used verbatim
    # system prompt for chat requests: a system turn when the template has one, else folded into
    # the first user turn (Gemma); the backend records which it did
    system: str | None = None
    thinking: bool = False  # the template's enable_thinking (Qwen3); templates without a thinking mode ignore it

    def __post_init__(self):
        if (self.messages is None) == (self.text is None):
            raise ValueError("a Request has either messages or text")


@dataclass(frozen=True)
class Completion:
    id: str  # the request's id
    sample: int  # 0 .. num_samples-1
    prompt: str  # the prompt exactly as the model saw it (chat template applied)
    response: str
    prompt_tokens: int
    completion_tokens: int
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str  # "transformers", "vllm", ...
    model_id: str  # content fingerprint of the weights (part of every cache key)

    def render(self, request: Request) -> str:
        """The exact prompt text the model sees for a request."""

    def generate(self, requests: Sequence[Request], settings: GenerationSettings,
                 on_batch: Callable[[list[Completion]], None] | None = None) -> list[Completion]:
        """num_samples completions per request, grouped by request, in request order;
        on_batch sees each batch's completions as soon as they exist (for resumable caches)."""


# --- chat templating ---------------------------------------------------------------------


def system_prompt_mode(tokenizer) -> str:
    """Where the chat template puts a system prompt: "system_turn", a turn of its own (Llama 3, Qwen3);
    "template_folds", the template itself moves it into the first user turn (Gemma 3); "folded_into_user",
    the template rejects or drops the system role, so the text leads the first user message (Gemma 2)."""
    from jinja2 import TemplateError

    # plain words: a probe of control characters is whitespace to Python, and a template's `| trim` eats it
    probe, user = "safemerge-system-probe", "safemerge-user-probe"

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    try:
        with_system = render([{"role": "system", "content": probe}, {"role": "user", "content": user}])
    except TemplateError:  # raise_exception() in the template: the system role is not supported
        return "folded_into_user"
    if probe not in with_system:
        return "folded_into_user"
    user_only = render([{"role": "user", "content": user}])
    user_opening = user_only[:user_only.index(user)]
    inside_user_turn = with_system.startswith(user_opening) and with_system.index(probe) >= len(user_opening)
    return "template_folds" if inside_user_turn else "system_turn"


def chat_messages(request: Request, mode: str) -> list[dict]:
    messages = [dict(m) for m in request.messages]
    if request.system is None:
        return messages
    if mode in ("system_turn", "template_folds"):  # the template places it
        return [{"role": "system", "content": request.system}, *messages]
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[first]["content"] = f"{request.system}\n\n{messages[first]['content']}"
    return messages


THINK_END = "</think>"


def answer_of(response: str) -> str:
    """What a judge or scorer reads: the text after a reasoning block (<think>…</think>, Qwen3), which the
    tokenizer does not count as special tokens. An unclosed block is reasoning cut off: no answer yet."""
    if THINK_END in response:
        return response.rsplit(THINK_END, 1)[1].lstrip()
    return "" if response.lstrip().startswith("<think>") else response


def has_thinking_mode(tokenizer) -> bool:
    """Whether the chat template takes ``enable_thinking`` (Qwen3)."""
    return "enable_thinking" in (tokenizer.chat_template or "")


# --- the transformers backend ------------------------------------------------------------


class PromptRenderer:
    """Requests to the exact prompt text and token ids a model sees; every backend renders through it."""

    def __init__(self, tokenizer, model_id: str):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.system_mode = system_prompt_mode(tokenizer) if tokenizer.chat_template else "no_chat_template"
        self.has_thinking_mode = has_thinking_mode(tokenizer)

    def render(self, request: Request) -> str:
        if request.text is not None:
            return request.text
        if request.thinking and not self.has_thinking_mode:
            raise ConfigError("--thinking on, but the model's chat template has no thinking mode (enable_thinking); "
                              "use --thinking off")
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                chat_messages(request, self.system_mode), tokenize=False, add_generation_prompt=True,
                enable_thinking=request.thinking,
            )
        except TemplateError as e:  # raise_exception() in the template: a role or order it rejects
            raise ConfigError(f"the chat template of {self.model_id} cannot render prompt {request.id}: "
                              f"{str(e).splitlines()[0]}; give one that can with --chat-template FILE") from None

    def encode(self, request: Request) -> list[int]:
        # raw text gets the tokenizer's special tokens (BOS); a rendered chat template has them already
        ids = self.tokenizer(self.render(request), add_special_tokens=request.text is not None)["input_ids"]
        if not ids:
            raise ConfigError(f"prompt {request.id} encodes to no tokens with the tokenizer of {self.model_id}; "
                              "check that the model directory holds its own tokenizer")
        return ids


class TransformersBackend(PromptRenderer):
    """Batched generation with transformers: left padding, prompts sorted by length so a batch
    wastes little on padding, the model's own chat template, greedy unless asked to sample."""

    name = "transformers"

    def __init__(self, model, tokenizer, *, model_id: str, batch_size: int = 8, progress=None):
        super().__init__(tokenizer, model_id)
        self.model = model
        self.batch_size = batch_size
        self.progress = progress  # callable(done_prompts) or None
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def precision(self) -> str:
        """Where and in which dtype the model computes: the same weights give other tokens elsewhere."""
        return f"{self.device.type}/{str(self.model.dtype).removeprefix('torch.')}"

    def generate(self, requests: Sequence[Request], settings: GenerationSettings,
                 on_batch: Callable[[list[Completion]], None] | None = None) -> list[Completion]:
        import torch

        if settings.num_samples > 1 and not settings.do_sample:
            raise ValueError("num_samples > 1 needs do_sample")
        encoded = [self.encode(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))
        results: dict[int, list[Completion]] = {}
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            # a seed per batch position keeps sampling reproducible for a fixed batch size
            torch.manual_seed(settings.seed + start)
            outputs = self._generate_batch([encoded[i] for i in batch], settings)
            for i, (texts, counts) in zip(batch, outputs):
                prompt = self.render(requests[i])
                results[i] = [Completion(requests[i].id, s, prompt, t, len(encoded[i]), c)
                              for s, (t, c) in enumerate(zip(texts, counts))]
            if on_batch:
                on_batch([c for i in batch for c in results[i]])
            if self.progress:
                self.progress(len(batch))
        return [c for i in range(len(requests)) for c in results[i]]

    def _generate_batch(self, batch: list[list[int]], settings: GenerationSettings):
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
        decided = (StopWhenDecided(self.tokenizer, settings.stop_strings, settings.stop_openings, width)
                   if settings.stops_when_decided else None)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention,
                                      generation_config=self.generation_config(settings),
                                      stopping_criteria=[decided] if decided else None)
        new = out[:, width:].tolist()
        stops = self.stop_ids()
        results = []
        for b in range(len(batch)):
            texts, counts = [], []
            for s in range(settings.num_samples):
                row = b * settings.num_samples + s
                tokens = new[row][:decided.stopped_at.get(row)] if decided else new[row]
                # up to and including the first stop token: what follows is padding
                n = next((k + 1 for k, t in enumerate(tokens) if t in stops), len(tokens))
                texts.append(self.tokenizer.decode(tokens[:n], skip_special_tokens=True))
                counts.append(n)
            results.append((texts, counts))
        return results

    def generation_config(self, settings: GenerationSettings):
        """Exactly the requested settings: the model's own generation_config.json (often sampling at
        temperature 0.6) is not inherited, only its stop tokens."""
        from transformers import GenerationConfig

        sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
            repetition_penalty=settings.repetition_penalty, num_return_sequences=settings.num_samples,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.stop_ids()), **sampling,
        )

    def stop_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


# --- the response cache ------------------------------------------------------------------


class CachedBackend:
    """Any backend, with its completions cached on disk under a key over the model's content
    fingerprint, the backend, the rendered prompts and every generation setting. Asking again
    costs nothing; a run stopped part-way resumes from the batches it finished."""

    def __init__(self, backend: Backend, cache_dir: Path):
        self.backend = backend
        self.cache_dir = Path(cache_dir)
        self.name = backend.name
        self.model_id = backend.model_id
        self.hits = 0  # requests answered from the cache (for the record and tests)

    def render(self, request: Request) -> str:
        return self.backend.render(request)

    def key(self, requests: Sequence[Request], settings: GenerationSettings) -> str:
        payload = {
            "backend": self.backend.name,
            "model": self.backend.model_id,
            "batch_size": getattr(self.backend, "batch_size", None),
            "precision": getattr(self.backend, "precision", None),
            "settings": settings.key(),
            "prompts": [[r.id, r.text is not None, self.render(r)] for r in requests],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]

    def paths(self, requests: Sequence[Request], settings: GenerationSettings) -> tuple[Path, Path]:
        """The finished file and the partial file (a run in progress) of these requests."""
        key = self.key(requests, settings)
        return self.cache_dir / f"{key}.jsonl", self.cache_dir / f"{key}.partial.jsonl"

    def finished_part(self, partial_path: Path, settings: GenerationSettings) -> dict[str, list[Completion]]:
        finished = group_by_id(read_completions(partial_path)) if partial_path.exists() else {}
        return {i: c for i, c in finished.items() if len(c) == settings.num_samples}

    def missing(self, requests: Sequence[Request], settings: GenerationSettings) -> list[Request]:
        """The requests this cache cannot answer yet."""
        done_path, partial_path = self.paths(requests, settings)
        if done_path.exists():
            return []
        finished = self.finished_part(partial_path, settings)
        return [r for r in requests if r.id not in finished]

    @contextmanager
    def partial_sink(self, requests: Sequence[Request], settings: GenerationSettings,
                     on_batch: Callable[[list[Completion]], None] | None = None):
        """A function that appends new completions to the partial file as they come."""
        _, partial_path = self.paths(requests, settings)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(partial_path, "a") as sink:
            def keep(batch: list[Completion]) -> None:
                sink.writelines(json.dumps(completion_row(c)) + "\n" for c in batch)
                sink.flush()
                if on_batch:
                    on_batch(batch)

            yield keep

    def generate(self, requests: Sequence[Request], settings: GenerationSettings,
                 on_batch: Callable[[list[Completion]], None] | None = None) -> list[Completion]:
        done_path, partial_path = self.paths(requests, settings)
        if done_path.exists():
            self.hits += len(requests)
            completions = read_completions(done_path)
            if on_batch:
                on_batch(completions)
            return completions
        finished = self.finished_part(partial_path, settings)
        self.hits += len(finished)
        if finished and on_batch:
            on_batch([c for cs in finished.values() for c in cs])
        todo = [r for r in requests if r.id not in finished]
        with self.partial_sink(requests, settings, on_batch) as keep:
            fresh = group_by_id(self.backend.generate(todo, settings, keep)) if todo else {}
        by_id = {**finished, **fresh}
        completions = [c for r in requests for c in sorted(by_id[r.id], key=lambda c: c.sample)]
        write_completions(done_path, completions)
        partial_path.unlink(missing_ok=True)
        return completions


GridGenerate = Callable[[list[Request], GenerationSettings, list[int], Callable[[int, list[Completion]], None]], None]


def generate_shared(caches: Sequence[CachedBackend], requests: Sequence[Request], settings: GenerationSettings,
                    grid: GridGenerate) -> None:
    """Fill several caches (one per model) with the completions of the same requests, generating in
    shared engine calls: ``grid(todo, settings, members, on_batch)`` generates ``todo`` under the
    model of each cache index in ``members`` and hands each batch to ``on_batch(index, completions)``.
    Caches that already hold the answers are skipped; caches that miss the same requests (a fresh
    start, or runs stopped at the same point) generate them together; two caches of the same model
    (the same files) generate once."""
    groups: dict[tuple[str, ...], list[int]] = {}
    seen = set()
    for k, cache in enumerate(caches):
        path = cache.paths(requests, settings)[0]
        if path in seen:  # the same model twice (linear and task_arithmetic at one λ): generated once
            continue
        seen.add(path)
        todo = cache.missing(requests, settings)
        if todo:
            groups.setdefault(tuple(r.id for r in todo), []).append(k)
    for ids, members in groups.items():
        wanted = set(ids)
        todo = [r for r in requests if r.id in wanted]
        with ExitStack() as stack:
            sinks = {k: stack.enter_context(caches[k].partial_sink(requests, settings)) for k in members}
            grid(todo, settings, members, lambda k, batch: sinks[k](batch))
        for k in members:
            caches[k].generate(requests, settings)  # every answer is in the partial file: this only finishes it


def completion_row(c: Completion) -> dict:
    return {"id": c.id, "sample": c.sample, "prompt": c.prompt, "response": c.response,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}


def read_completions(path: Path) -> list[Completion]:
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(Completion(**json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                break  # a line cut short by a kill: everything before it is good
    return rows


def group_by_id(completions: Sequence[Completion]) -> dict[str, list[Completion]]:
    groups: dict[str, list[Completion]] = {}
    for c in completions:
        groups.setdefault(c.id, []).append(c)
    return groups


def write_completions(path: Path, completions: Sequence[Completion]) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(completion_row(c)) + "\n" for c in completions)
    os.replace(tmp, path)
